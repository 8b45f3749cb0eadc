//! Native TLS with a real rustls client: HTTPS and `wss://` on the broker's
//! port, plain HTTP refused cleanly, and a certificate reload on SIGHUP.

mod common;

use std::{path::Path, sync::Arc, time::Duration};

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// A self-signed certificate for 127.0.0.1 / localhost, written as PEM.
fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).expect("write key");
    ck.cert.der().clone()
}

fn connector(trust: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls(
    b: &Broker,
    trust: &CertificateDer<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(b.addr).await?;
    connector(trust)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
}

/// Read until `\r\n\r\n`; returns the head and what followed it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut buf = vec![];
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf[i + 4..].to_vec();
            return (String::from_utf8_lossy(&buf[..i]).to_string(), rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .expect("read in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Read one unmasked server text frame (small) after `pending` bytes.
async fn read_text<S: AsyncRead + Unpin>(s: &mut S, pending: &mut Vec<u8>) -> String {
    let mut tmp = [0u8; 4096];
    loop {
        if pending.len() >= 2 {
            let len = (pending[1] & 0x7f) as usize;
            let (len, off) = if len == 126 && pending.len() >= 4 {
                (u16::from_be_bytes([pending[2], pending[3]]) as usize, 4)
            } else {
                (len, 2)
            };
            if (len < 126 || off == 4) && pending.len() >= off + len {
                let text = String::from_utf8_lossy(&pending[off..off + len]).to_string();
                pending.drain(..off + len);
                return text;
            }
        }
        let n = s.read(&mut tmp).await.expect("read");
        assert!(n > 0, "closed");
        pending.extend_from_slice(&tmp[..n]);
    }
}

async fn write_masked<S: AsyncWrite + Unpin>(s: &mut S, text: &str) {
    let key = [7u8, 1, 2, 3];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&key);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]));
    s.write_all(&f).await.expect("write");
}

#[tokio::test]
async fn https_and_wss_with_a_real_tls_client_and_reload_on_sighup() {
    let certs = tempfile::tempdir().expect("tempdir");
    let first = write_cert(certs.path());
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let b = Broker::start_with(|c| {
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;
    let token = {
        // Register over HTTPS with a raw request on the TLS stream.
        let mut s = tls(&b, &first).await.expect("tls");
        let body = r#"{"username":"alice","password":"password123"}"#;
        s.write_all(
            format!(
                "POST /api/register HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let (head, _) = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 201"), "{head}");
        mint(
            serde_json::json!({"sub": "alice", "exp": now() + 600, "jti": "t1"}),
            jsonwebtoken::Algorithm::HS256,
            SECRET.as_bytes(),
        )
    };

    // wss://: upgrade over TLS, get hello, ping/pong.
    let mut s = tls(&b, &first).await.expect("tls");
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: shoal.v1.json\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (head, mut pending) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let hello = read_text(&mut s, &mut pending).await;
    assert!(
        hello.contains("\"t\":\"hello\"") && hello.contains("alice"),
        "{hello}"
    );
    write_masked(&mut s, r#"{"t":"ping","id":7}"#).await;
    assert_eq!(
        read_text(&mut s, &mut pending).await,
        r#"{"t":"pong","id":7}"#
    );

    // Plain HTTP on the TLS port is refused cleanly: no HTTP answer, closed.
    let mut plain = TcpStream::connect(b.addr).await.expect("tcp");
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP answered on the TLS port"
    );
    let mut m = tls(&b, &first).await.expect("tls");
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut text = vec![];
    let _ = m.read_to_end(&mut text).await;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.lines().any(|l| l.starts_with("shoal_handshakes_total")
            && l.contains("tls_failed")
            && !l.ends_with(" 0")),
        "failed TLS handshakes are counted"
    );

    // New certificate + SIGHUP: new handshakes present it; the open wss
    // connection is untouched.
    let second = write_cert(certs.path());
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tls(&b, &second).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tls(&b, &first).await.is_err(),
        "old certificate still served"
    );
    write_masked(&mut s, r#"{"t":"ping","id":8}"#).await;
    assert_eq!(
        read_text(&mut s, &mut pending).await,
        r#"{"t":"pong","id":8}"#
    );

    // A broken certificate file on reload keeps the working one.
    std::fs::write(&cert, "not a certificate").expect("write");
    std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tls(&b, &second).await.is_ok(),
        "a bad reload dropped the certificate"
    );
}
