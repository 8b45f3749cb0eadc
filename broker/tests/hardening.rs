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
    let b =
        Broker::start_with(|c| c.http.http_body_timeout = std::time::Duration::from_secs(1)).await;
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
        c.http.http_body_timeout = std::time::Duration::from_secs(1);
        c.http.http_body_min_rate = 1000;
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
        c.http.http_write_timeout = std::time::Duration::from_secs(1);
        c.http.max_file_size = 16 * 1024 * 1024;
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
        c.http.max_http_connections = 6;
        c.http.max_http_connections_per_ip = 4;
        c.conn.handshake_timeout = std::time::Duration::from_secs(2);
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

/// Issue 15.3: an empty or short API key is refused at start (flag and
/// env var), and the key is accepted only in the Authorization header.
#[tokio::test]
async fn the_api_key_is_never_empty_and_only_in_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flag, env) in [(Some(""), None), (None, Some("")), (Some("short"), None)] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.args(["--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path())
            .env("SHOAL_JWT_SECRET", SECRET)
            .env_remove("SHOAL_API_KEY");
        if let Some(k) = flag {
            cmd.args(["--api-key", k]);
        }
        if let Some(k) = env {
            cmd.env("SHOAL_API_KEY", k);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("run shoal");
        assert!(!out.status.success(), "{flag:?} {env:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--api-key"), "{err}");
    }
    let key = "an-api-key-0123456789";
    let b = Broker::start_with(|c| c.auth.api_key = Some(key.into())).await;
    let body = json!({"room": "news", "body": "hi"});
    let url = |q: &str| b.url(&format!("/api/publish{q}"));
    let status = |r: reqwest::Response| r.status().as_u16();
    let in_query = b.http.post(url(&format!("?token={key}"))).json(&body);
    assert_eq!(status(in_query.send().await.expect("http")), 401);
    let empty = b.http.post(url("?token=")).json(&body);
    assert_eq!(status(empty.send().await.expect("http")), 401);
    let empty_bearer = b.http.post(url("")).bearer_auth("").json(&body);
    assert_eq!(status(empty_bearer.send().await.expect("http")), 401);
    let ok = b.http.post(url("")).bearer_auth(key).json(&body);
    assert_eq!(status(ok.send().await.expect("http")), 201);
    assert!(
        b.metric("shoal_auth_failures_total{reason=\"bad_api_key\"")
            .await
            >= 3.0
    );
    bystander_served(&b).await;
}

/// Issue 15.4: nobody may be `server` (the server API's sender name), and
/// a user's cid cannot shadow a server-API publish, on one node and in a
/// cluster.
#[tokio::test]
async fn system_names_are_reserved_and_the_api_has_its_own_idempotency_space() {
    let key = "an-api-key-0123456789";
    let redis = Redis::start().await;
    for cluster in [false, true] {
        let url = redis.url();
        let b = Broker::start_with(|c| {
            c.auth.api_key = Some(key.into());
            if cluster {
                c.cluster.bus = shoal_broker::config::BusKind::Redis;
                c.cluster.redis_url = Some(url.parse().expect("redis url"));
            }
        })
        .await;
        b.health_becomes(200).await;
        for name in ["server", "Server", "SYSTEM", "shoal", "admin"] {
            let (s, v) = b.register(name).await;
            assert_eq!(s, 400, "{name}: {v}");
            assert!(
                v["message"].as_str().unwrap_or("").contains("reserved"),
                "{v}"
            );
        }
        let refused = b
            .try_connect_raw(&token_for("server"), Encoding::Json)
            .await;
        assert_eq!(refused.err().map(|e| e.0), Some(401));

        let room = format!("news{cluster}");
        let mut alice = b.connect(&token_for("alice"), Encoding::Json).await;
        alice.join(&room).await;
        let first = alice
            .publish_cid(&room, Some("X"), json!("from alice"))
            .await;
        assert!(
            matches!(first, ServerFrame::Ack { seq: 1, .. }),
            "{first:?}"
        );
        let api = |body: serde_json::Value| {
            b.http
                .post(b.url(&format!("/api/rooms/{room}/messages")))
                .bearer_auth(key)
                .json(&body)
                .send()
        };
        for _ in 0..2 {
            // The same cid from the API is a new message (then a retry).
            let r = api(json!({"body": "from the server", "cid": "X"}))
                .await
                .expect("http");
            assert_eq!(r.status(), 201);
            let v: serde_json::Value = r.json().await.expect("json");
            assert_eq!(v["seq"], 2, "{v}");
        }
        let delivered = alice
            .recv_until(|f| matches!(f, ServerFrame::Msg { seq: 2, .. }))
            .await;
        assert!(
            matches!(&delivered, ServerFrame::Msg { from, .. } if from == "server"),
            "{delivered:?}"
        );
        bystander_served(&b).await;
    }
}

/// Issue 15.5: pongs and empty continuation frames take rate-limit tokens
/// like every other frame: a flood of them is refused and then closed
/// with 1008, and a bystander is served meanwhile (its p99 is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pong_and_continuation_floods_are_rate_limited() {
    let b = Broker::start().await;
    let pong = (0x8A, vec![], true);
    let empty_continuation = (0x00, vec![], true);
    let mut flooders = vec![];
    for k in 0..3 {
        let mut r = Raw::connect(&b, &token_for(&format!("flood{k}")), "shoal.v1.json").await;
        let f = if k == 2 {
            empty_continuation.clone()
        } else {
            pong.clone()
        };
        flooders.push(tokio::spawn(async move {
            if k == 2 {
                // Open a fragmented message, then never finish it.
                r.frame(0x01, b"{", true).await;
            }
            let started = Instant::now();
            let mut sent = 0u64;
            // Far past the burst (200) plus the strikes (200).
            while sent < 20_000 && started.elapsed() < Duration::from_secs(10) {
                r.frame(f.0, &f.1, f.2).await;
                sent += 1;
            }
            (r.close_code().await, sent, started.elapsed())
        }));
    }
    let mut c = b.connect(&token_for("bystander"), Encoding::Json).await;
    c.join("calm").await;
    let mut rtts = vec![];
    for i in 0..100 {
        let t = Instant::now();
        assert!(matches!(
            c.publish("calm", json!(i)).await,
            ServerFrame::Ack { .. }
        ));
        rtts.push(t.elapsed());
    }
    rtts.sort_unstable();
    eprintln!(
        "bystander publish round trip under the flood: p50 {:?} p99 {:?}",
        rtts[50], rtts[98]
    );
    for f in flooders {
        let (code, sent, took) = f.await.expect("join");
        eprintln!("flooder closed with {code:?} after {sent} frames sent in {took:?}");
        assert_eq!(code, Some(1008), "flood closed for policy");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    assert!(b.metric("shoal_rate_limited_total{kind=\"frame\"").await >= 600.0);
}

/// Issue 15.7: a validly signed token with `exp = 2^64-1` works like any
/// other, and the connection's cleanup runs when it ends.
#[tokio::test]
async fn a_token_that_never_expires_does_not_panic_the_connection() {
    let b = Broker::start().await;
    b.user("eternal").await;
    let token = mint(
        json!({"sub": "eternal", "exp": u64::MAX, "jti": "j-eternal"}),
        jsonwebtoken::Algorithm::HS256,
        SECRET.as_bytes(),
    );
    let mut c = b.connect(&token, Encoding::Json).await;
    c.join("r").await;
    assert!(matches!(
        c.publish("r", json!("forever")).await,
        ServerFrame::Ack { .. }
    ));
    let (_, health) = b.get("/health", None).await;
    assert_eq!(health["connections"], 1);
    drop(c);
    let viewer = token_for("viewer");
    let mut gone = false;
    for _ in 0..100 {
        let (_, health) = b.get("/health", None).await;
        let (_, users) = b.get("/api/users", Some(&viewer)).await;
        let online = users["users"]
            .as_array()
            .expect("users")
            .iter()
            .any(|u| u["username"] == "eternal" && u["online"] == true);
        if health["connections"] == 0 && !online {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "cleanup ran: not counted, not online");
    bystander_served(&b).await;
}

/// Issue 15.8: control characters in a search are a 400, never a 5xx;
/// a message whose text holds a NUL is stored and found by its words.
#[tokio::test]
async fn search_with_control_characters_is_a_bad_request() {
    let b = Broker::start().await;
    let token = token_for("seeker");
    let mut c = b.connect(&token, Encoding::Json).await;
    c.join("r").await;
    assert!(matches!(
        c.publish("r", json!({"text": "needle\u{0}haystack"})).await,
        ServerFrame::Ack { .. }
    ));
    let (s, v) = b.get("/api/rooms/r/search?q=a%00b", Some(&token)).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = b.get("/api/rooms/r/search?q=%01", Some(&token)).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = b.get("/api/rooms/r/search?q=needle", Some(&token)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1), "{v}");
    bystander_served(&b).await;
}

/// Issue 15.9: user names are unique regardless of letter case, `.` and
/// `..` are not names, and logging in with another spelling gets the
/// name as registered.
#[tokio::test]
async fn user_names_are_unique_regardless_of_case() {
    let b = Broker::start().await;
    b.user("alice").await;
    for name in ["Alice", "ALICE", "aLiCe"] {
        let (s, v) = b.register(name).await;
        assert_eq!(s, 409, "{name}: {v}");
    }
    for name in [".", ".."] {
        let (s, v) = b.register(name).await;
        assert_eq!(s, 400, "{name}: {v}");
    }
    let (s, v) = b
        .post(
            "/api/login",
            json!({"username": "ALICE", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["username"], "alice");
    let mut c = b
        .connect(v["token"].as_str().expect("token"), Encoding::Json)
        .await;
    c.join("r").await;
    match c.publish("r", json!(1)).await {
        ServerFrame::Ack { .. } => {}
        f => panic!("{f:?}"),
    }
    let (s, v) = b
        .get("/api/rooms/r/messages", Some(&token_for("alice")))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["messages"][0]["from"], "alice", "{v}");
    bystander_served(&b).await;
}

/// Issue 15.10: with an Origin allow-list, an Origin header that is not
/// valid text is refused like a foreign one, not treated as absent.
#[tokio::test]
async fn an_unreadable_origin_is_not_an_absent_one() {
    let b =
        Broker::start_with(|c| c.auth.allowed_origins = vec!["https://chat.example".into()]).await;
    let token = token_for("browser");
    let upgrade = |origin: &[u8]| {
        let mut req = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: shoal.v1.json\r\nAuthorization: Bearer {token}\r\n"
        )
        .into_bytes();
        if !origin.is_empty() {
            req.extend_from_slice(b"Origin: ");
            req.extend_from_slice(origin);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        let addr = b.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.expect("tcp");
            s.write_all(&req).await.expect("write");
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.expect("read");
            status_of(&buf[..n])
        }
    };
    assert_eq!(upgrade(b"https://chat.example").await, 101);
    assert_eq!(upgrade(b"").await, 101, "no Origin: not a browser");
    assert_eq!(upgrade(b"https://evil.example").await, 403);
    assert_eq!(upgrade(b"https://chat.example\xff").await, 403);
    assert_eq!(upgrade(b"\xc3\x28").await, 403);
    assert!(
        b.metric("shoal_handshakes_total{result=\"forbidden_origin\"")
            .await
            >= 3.0
    );
    bystander_served(&b).await;
}

/// Issue 15.11: close frames are validated (RFC 6455 §7.4): a code no
/// endpoint may send or a 1-byte body is answered with 1002, a reason
/// that is not UTF-8 with 1007, a valid close with 1000.
#[tokio::test]
async fn close_frames_are_validated() {
    let b = Broker::start().await;
    let token = token_for("closer");
    let mut cases: Vec<(Vec<u8>, u16)> = vec![
        (vec![], 1000),
        (1000u16.to_be_bytes().to_vec(), 1000),
        (4000u16.to_be_bytes().to_vec(), 1000),
        (1012u16.to_be_bytes().to_vec(), 1000),
        ([&1001u16.to_be_bytes()[..], b"bye"].concat(), 1000),
        (vec![0x03], 1002),
        ([&1000u16.to_be_bytes()[..], b"\xff\xfe"].concat(), 1007),
    ];
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        cases.push((bad.to_be_bytes().to_vec(), 1002));
    }
    for (payload, expected) in cases {
        let mut r = Raw::connect(&b, &token, "shoal.v1.json").await;
        r.frame(0x88, &payload, true).await;
        assert_eq!(r.close_code().await, Some(expected), "{payload:?}");
    }
    bystander_served(&b).await;
}

/// Issue 15 (bounds): logins are rate limited per client address and per
/// user name (429 with Retry-After, before any password is hashed), so a
/// flood from one address neither guesses passwords quickly nor slows a
/// legitimate login from another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_floods_are_rate_limited_per_address_and_per_user() {
    let b = Broker::start_with(|c| {
        c.auth.login_rate_per_ip = 20;
        c.auth.login_rate_per_user = 5;
    })
    .await;
    b.user("victim").await; // one registration and one login from 127.0.0.1
    let login = |from: [u8; 4], user: &'static str, password: &'static str| {
        let addr = b.addr;
        async move {
            let mut s = tcp_from(from, addr).await;
            let body = format!(r#"{{"username":"{user}","password":"{password}"}}"#);
            let req = format!(
                "POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.expect("write");
            let (resp, _) = read_to_close(&mut s, Duration::from_secs(20)).await;
            String::from_utf8_lossy(&resp).to_string()
        }
    };
    // Password guessing against one user from many addresses: 5 a minute.
    let mut statuses = vec![];
    for k in 0..8u8 {
        let r = login([127, 0, 1, k + 1], "victim", "wrong-password").await;
        statuses.push(status_of(r.as_bytes()));
        if status_of(r.as_bytes()) == 429 {
            assert!(r.to_ascii_lowercase().contains("retry-after: "), "{r}");
        }
    }
    // One of the user's five was the login in `b.user`.
    assert_eq!(statuses, [401, 401, 401, 401, 429, 429, 429, 429]);
    // A flood from one address: 20 a minute, the rest refused unhashed.
    let flood: Vec<_> = (0..60)
        .map(|k| {
            let name: &'static str = Box::leak(format!("nobody{k}").into_boxed_str());
            tokio::spawn(login([127, 0, 2, 1], name, "password123"))
        })
        .collect();
    let legit = Instant::now();
    b.user("legit").await;
    let took = legit.elapsed();
    let mut refused = 0;
    for f in flood {
        let r = f.await.expect("join");
        match status_of(r.as_bytes()) {
            429 => refused += 1,
            401 => {}
            s => panic!("{s}: {r}"),
        }
    }
    eprintln!("60 flood logins: {refused} refused with 429; a legitimate registration + login from another address took {took:?}");
    assert_eq!(refused, 40);
    assert!(
        b.metric("shoal_rate_limited_total{kind=\"login_address\"")
            .await
            >= 40.0
    );
    assert!(
        b.metric("shoal_rate_limited_total{kind=\"login_user\"")
            .await
            >= 4.0
    );
    bystander_served(&b).await;
}

/// Upload `len` bytes of PNG into `room` as `token`'s user; the status.
async fn upload(b: &Broker, token: &str, room: &str, len: usize) -> (u16, serde_json::Value) {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.resize(len, 3);
    let r = b
        .http
        .post(b.url(&format!("/api/files?room={room}&name=f.png")))
        .bearer_auth(token)
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .expect("upload");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

/// Issue 15 (bounds): a user's stored attachments are capped
/// (`--user-file-quota`, 413), and attachments leave with their room's
/// retention age.
#[tokio::test]
async fn uploads_have_a_per_user_quota_and_expire_with_retention() {
    let b = Broker::start_with(|c| {
        c.http.user_file_quota = 3000;
        c.rooms.namespaces = vec!["eph:retain_age=1".parse().expect("spec")];
        c.store.retention_interval = std::time::Duration::from_secs(1);
    })
    .await;
    let (hoarder, other) = (token_for("hoarder"), token_for("other"));
    for (t, room) in [(&hoarder, "files"), (&hoarder, "eph:x"), (&other, "files")] {
        let mut c = b.connect(t, Encoding::Json).await;
        c.join(room).await;
    }
    assert_eq!(upload(&b, &hoarder, "files", 1000).await.0, 201);
    assert_eq!(upload(&b, &hoarder, "files", 1000).await.0, 201);
    let (s, v) = upload(&b, &hoarder, "files", 1500).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (413, Some("quota_exceeded")),
        "{v}"
    );
    assert_eq!(
        upload(&b, &other, "files", 1500).await.0,
        201,
        "quotas are per user"
    );
    assert_eq!(
        upload(&b, &hoarder, "files", 900).await.0,
        201,
        "up to the quota"
    );

    let (s, v) = upload(&b, &other, "eph:x", 100).await;
    assert_eq!(s, 403, "not a member of eph:x yet: {v}");
    let (s, v) = upload(&b, &hoarder, "eph:x", 50).await;
    assert_eq!(s, 201, "{v}");
    let url = v["url"].as_str().expect("url").to_string();
    let fetch = |url: String| {
        let (b, t) = (&b, hoarder.clone());
        async move {
            b.http
                .get(b.url(&url))
                .bearer_auth(t)
                .send()
                .await
                .expect("get")
                .status()
                .as_u16()
        }
    };
    assert_eq!(fetch(url.clone()).await, 200);
    let mut gone = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if fetch(url.clone()).await == 404 {
            gone = true;
            break;
        }
    }
    assert!(gone, "the attachment expired with its room's retention");
    assert!(b.metric("shoal_files_expired_total").await >= 1.0);
    bystander_served(&b).await;
}

/// Issue 15 (bounds): durable memberships per user are capped
/// (`--max-rooms-per-user`, `error 409`); rejoining a room you are in is
/// always fine, and leaving frees a slot.
#[tokio::test]
async fn memberships_per_user_are_capped() {
    let b = Broker::start_with(|c| c.rooms.max_rooms_per_user = 3).await;
    let mut c = b.connect(&token_for("joiner"), Encoding::Json).await;
    for r in ["a", "b", "c"] {
        c.join(r).await;
    }
    c.send(&shoal_proto::ClientFrame::Join {
        id: Some(77),
        room: "d".into(),
        since: None,
    })
    .await;
    match c
        .recv_until(|f| {
            matches!(
                f,
                ServerFrame::Error { id: Some(77), .. } | ServerFrame::Joined { id: Some(77), .. }
            )
        })
        .await
    {
        ServerFrame::Error { code, .. } => assert_eq!(code, 409),
        f => panic!("{f:?}"),
    }
    // Another connection of the same user rejoins a held room.
    let mut again = b.connect(&token_for("joiner"), Encoding::Json).await;
    again.join("b").await;
    c.send(&shoal_proto::ClientFrame::Leave {
        id: Some(78),
        room: "a".into(),
    })
    .await;
    c.recv_until(|f| matches!(f, ServerFrame::Left { .. }))
        .await;
    again.join("d").await;
    bystander_served(&b).await;
}

/// Issue 15.6: a DM to a name nobody holds is refused with 404 and kept
/// nowhere, so whoever registers the name later reads nothing; a user
/// seen with a valid token (an external issuer's) can receive DMs
/// offline, and their name cannot be registered by anyone else.
#[tokio::test]
async fn direct_messages_to_unknown_names_are_refused() {
    let b = Broker::start().await;
    let alice_token = b.user("alice").await;
    let mut alice = b.connect(&alice_token, Encoding::Json).await;
    let dm = |to: &str, id: u64| shoal_proto::ClientFrame::Pub {
        id: Some(id),
        room: None,
        to: Some(to.into()),
        cid: None,
        body: json!("secret for you"),
        reply_to: None,
    };
    alice.send(&dm("squatter", 1)).await;
    match alice
        .recv_until(|f| {
            matches!(
                f,
                ServerFrame::Error { id: Some(1), .. } | ServerFrame::Ack { id: Some(1), .. }
            )
        })
        .await
    {
        ServerFrame::Error { code, .. } => assert_eq!(code, 404),
        f => panic!("{f:?}"),
    }
    // The squatter registers the name afterwards: nothing was kept.
    let squatter = b.user("squatter").await;
    let (s, v) = b.get("/api/rooms", Some(&squatter)).await;
    assert_eq!(s, 200);
    assert_eq!(v["rooms"].as_array().map(Vec::len), Some(0), "{v}");
    let (s, v) = b
        .get("/api/rooms/dm:alice:squatter/messages", Some(&squatter))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(0), "{v}");
    // Now that the name is held, DMs to it go through.
    alice.send(&dm("squatter", 2)).await;
    assert!(matches!(
        alice
            .recv_until(|f| matches!(
                f,
                ServerFrame::Error { id: Some(2), .. } | ServerFrame::Ack { id: Some(2), .. }
            ))
            .await,
        ServerFrame::Ack { .. }
    ));

    // An external issuer's user, seen once, then offline.
    drop(b.connect(&token_for("external"), Encoding::Json).await);
    let mut delivered = false;
    for attempt in 0..50u64 {
        alice.send(&dm("external", 10 + attempt)).await;
        let id = 10 + attempt;
        match alice
            .recv_until(|f| matches!(f, ServerFrame::Error { id: Some(i), .. } | ServerFrame::Ack { id: Some(i), .. } if *i == id))
            .await
        {
            ServerFrame::Ack { .. } => {
                delivered = true;
                break;
            }
            // Recorded in the background, just after the connection.
            ServerFrame::Error { code: 404, .. } => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            f => panic!("{f:?}"),
        }
    }
    assert!(delivered);
    let (s, v) = b.register("External").await;
    assert_eq!(s, 409, "a seen name cannot be registered: {v}");
    bystander_served(&b).await;
}
