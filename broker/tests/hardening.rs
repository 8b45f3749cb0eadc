//! Holes found by hostile testing (issue 15), one test per hole, each
//! against a real broker (a broker process where its memory is measured),
//! each ending with a bystander check: a client that did nothing wrong is
//! still served.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use serde_json::json;
use shoal_proto::{Encoding, ServerFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::Instant,
};

/// A bystander joins a room, publishes and receives its own message.
async fn bystander_served(e: &impl Endpoint) {
    let mut c = e.connect(&token_for("bystander"), Encoding::Json).await;
    c.join("calm").await;
    assert!(matches!(
        c.publish("calm", json!("still here")).await,
        ServerFrame::Ack { .. }
    ));
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind((from, 0).into()).expect("bind");
    s.connect(to).await.expect("connect")
}

/// Read until EOF or `within`; (bytes read, whether EOF came).
async fn read_to_close(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(resp: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(resp);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Issue 15.2: a request body that stalls is answered 408 and its
/// connection closed, instead of being held forever (no login needed).
#[tokio::test]
async fn a_stalled_request_body_gets_408_and_is_closed() {
    let b = Broker::start_with(|c| c.http_body_timeout_secs = 1).await;
    let mut s = tcp_from([127, 0, 0, 1], b.addr).await;
    s.write_all(
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"username\"",
    )
    .await
    .expect("write");
    let started = Instant::now();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), 408, "{}", String::from_utf8_lossy(&resp));
    assert!(String::from_utf8_lossy(&resp).contains("\"error\":\"timeout\""));
    assert!(closed, "connection closed after the 408");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        b.metric("shoal_http_timeouts_total{kind=\"body\"").await,
        1.0
    );
    bystander_served(&b).await;
}

/// Issue 15.2: a body that trickles in under the minimum rate is cut off
/// after the grace, though each part arrives within the body timeout.
#[tokio::test]
async fn a_body_under_the_minimum_rate_is_cut_off() {
    let b = Broker::start_with(|c| {
        c.http_body_timeout_secs = 1;
        c.http_body_min_rate = 1000;
    })
    .await;
    let mut s = tcp_from([127, 0, 0, 1], b.addr).await;
    s.write_all(
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 60000\r\n\r\n",
    )
    .await
    .expect("write");
    let started = Instant::now();
    // 100 bytes every 300 ms: ~333 B/s, each part well within 1 s.
    let mut answered = vec![];
    while started.elapsed() < Duration::from_secs(8) {
        if s.write_all(&[b' '; 100]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
        {
            answered.extend_from_slice(&buf[..n]);
            if n == 0 || !answered.is_empty() {
                break;
            }
        }
    }
    assert_eq!(
        status_of(&answered),
        408,
        "{}",
        String::from_utf8_lossy(&answered)
    );
    // Grace 1 s, then 1000 B/s against ~333 B/s received: cut near 1.5 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    bystander_served(&b).await;
}

/// Issue 15.2: ten uploads stalled just short of the file limit: those
/// within the node's upload budget are cut off after the body timeout,
/// the rest refused at once, so their memory is bounded by the budget
/// and freed (the figure in the issue note).
#[tokio::test]
async fn stalled_uploads_are_bounded_by_the_upload_budget_and_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Proc::start(
        dir.path(),
        &[
            "--http-body-timeout",
            "2",
            "--max-upload-memory",
            "31457280",
        ],
    )
    .await;
    let token = token_for("uploader");
    let mut c = p.connect(&token, Encoding::Json).await;
    c.join("files").await;
    let rss = |text: String| sample(&text, "shoal_process_resident_memory_bytes");
    let before = rss(p.metrics().await);
    let almost = 5 * 1024 * 1024 - 4096;
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.resize(almost, 0);
    let mut stalled = vec![];
    for _ in 0..10 {
        let mut s = tcp_from([127, 0, 0, 1], p.addr).await;
        let head = format!(
            "POST /api/files?room=files&name=a.png HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {token}\r\nContent-Type: image/png\r\n\
             Content-Length: {}\r\n\r\n",
            5 * 1024 * 1024
        );
        s.write_all(head.as_bytes()).await.expect("head");
        // A refused upload is answered and closed; the write may fail.
        let _ = s.write_all(&png).await;
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss(p.metrics().await);
    let mut statuses = vec![];
    for s in &mut stalled {
        let (resp, closed) = read_to_close(s, Duration::from_secs(6)).await;
        statuses.push(status_of(&resp));
        assert!(closed);
    }
    statuses.sort_unstable();
    // 30 MiB of budget: six 5 MiB uploads; the other four refused.
    assert_eq!(statuses, [408, 408, 408, 408, 408, 408, 503, 503, 503, 503]);
    let m = p.metrics().await;
    assert_eq!(sample(&m, "shoal_http_timeouts_total{kind=\"body\""), 6.0);
    let after = rss(m);
    eprintln!(
        "RSS before {:.1} MB, with 10 stalled uploads {:.1} MB, after they were cut off {:.1} MB",
        before / 1e6,
        during / 1e6,
        after / 1e6
    );
    assert!(
        during - before < 45e6,
        "bounded by the 30 MiB budget: {during} vs {before}"
    );
    // The budget is back: a real upload goes through.
    let mut small = b"\x89PNG\r\n\x1a\n".to_vec();
    small.resize(1000, 1);
    let resp = p
        .http
        .post(p.url("/api/files?room=files&name=ok.png"))
        .bearer_auth(&token)
        .header("content-type", "image/png")
        .body(small)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 201);
    bystander_served(&p).await;
}

/// Issue 15.2: a client that never reads a download is dropped after the
/// write timeout instead of being served for as long as it likes.
#[tokio::test]
async fn a_download_nobody_reads_is_dropped_after_the_write_timeout() {
    let b = Broker::start_with(|c| {
        c.http_write_timeout_secs = 1;
        c.max_file_size = 16 * 1024 * 1024;
    })
    .await;
    let token = token_for("sharer");
    let mut c = b.connect(&token, Encoding::Json).await;
    c.join("files").await;
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.resize(12 * 1024 * 1024, 7);
    let resp = b
        .http
        .post(b.url("/api/files?room=files&name=big.png"))
        .bearer_auth(&token)
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 201);
    let id = resp.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = sock.connect(b.addr).await.expect("connect");
    let req =
        format!("GET /api/files/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("request");
    // Never read. The broker gives up after ~1 s without progress.
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if b.metric("shoal_http_timeouts_total{kind=\"write\"").await >= 1.0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "write timeout never fired");
    let mut open = 1.0;
    for _ in 0..50 {
        open = b.metric("shoal_http_connections").await;
        // The /metrics request itself is one.
        if open <= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open, 1.0, "the stalled download's connection was freed");
    bystander_served(&b).await;
}

/// Issue 15.2: open HTTP connections are capped per client address and in
/// total (503 with a JSON body), an idle keep-alive connection is closed
/// after the header timeout, and upgraded WebSockets do not count.
#[tokio::test]
async fn http_connections_are_capped_per_address_and_in_total() {
    let b = Broker::start_with(|c| {
        c.max_http_connections = 6;
        c.max_http_connections_per_ip = 4;
        c.handshake_timeout_secs = 2;
    })
    .await;
    // WebSockets from 127.0.0.1 beyond the per-address cap: not HTTP.
    let mut ws = vec![];
    for _ in 0..6 {
        ws.push(b.connect(&token_for("wsuser"), Encoding::Json).await);
    }
    let mut held = vec![];
    for _ in 0..4 {
        held.push(tcp_from([127, 0, 0, 1], b.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = tcp_from([127, 0, 0, 1], b.addr).await;
    let (resp, closed) = read_to_close(&mut fifth, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(status_of(&resp), 503, "{text}");
    assert!(text.contains("from your address"), "{text}");
    assert!(closed);
    // Another address may open up to the total.
    for _ in 0..2 {
        held.push(tcp_from([127, 0, 0, 2], b.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = tcp_from([127, 0, 0, 3], b.addr).await;
    let (resp, _) = read_to_close(&mut over, Duration::from_secs(2)).await;
    assert_eq!(status_of(&resp), 503);
    assert!(String::from_utf8_lossy(&resp).contains("too many open HTTP connections"));
    // The held connections sent nothing: closed after the header timeout,
    // which frees their slots.
    let started = Instant::now();
    for s in &mut held {
        let (_, closed) = read_to_close(s, Duration::from_secs(5)).await;
        assert!(closed);
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        b.metric("shoal_http_refused_total{reason=\"per_address\"")
            .await,
        1.0
    );
    assert_eq!(
        b.metric("shoal_http_refused_total{reason=\"total\"").await,
        1.0
    );
    // An idle keep-alive connection after a request is closed the same way.
    let mut ka = tcp_from([127, 0, 0, 1], b.addr).await;
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (resp, closed) = read_to_close(&mut ka, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), 200);
    assert!(closed, "idle keep-alive closed");
    assert!(b.metric("shoal_http_timeouts_total{kind=\"header\"").await >= 5.0);
    bystander_served(&b).await;
    drop(ws);
}
