//! The bad-input catalogue: hostile inputs, each with its expected outcome
//! (an error frame and code, a close code, or an HTTP status), and after
//! every one a check that a bystander is still served and the broker's
//! memory stays bounded.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;
use shoal_proto::{ClientFrame, CloseCode, Encoding, ServerFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// An error frame with this code; the connection stays open.
    Error(u16),
    /// The connection is closed with this code.
    Close(u16),
    /// HTTP status (REST or refused handshake).
    Http(u16),
}

/// Send `bytes` as one data message on a fresh JSON or msgpack connection
/// and return the first error frame's code, or the close code.
async fn ws_message(b: &Broker, token: &str, enc: Encoding, msg: Vec<u8>) -> Expect {
    let mut c = b.connect(token, enc).await;
    let m = match enc {
        Encoding::Json => tokio_tungstenite::tungstenite::Message::Text(
            String::from_utf8_lossy(&msg).to_string().into(),
        ),
        Encoding::MsgPack => tokio_tungstenite::tungstenite::Message::Binary(msg.into()),
    };
    let _ = c.send_raw(m).await;
    outcome(&mut c).await
}

async fn ws_frame(b: &Broker, token: &str, enc: Encoding, f: ClientFrame) -> Expect {
    let mut c = b.connect(token, enc).await;
    c.send(&f).await;
    outcome(&mut c).await
}

async fn outcome(c: &mut Client) -> Expect {
    loop {
        match c.try_recv(Duration::from_secs(10)).await {
            Ok(ServerFrame::Error { code, .. }) => return Expect::Error(code),
            Ok(_) => continue,
            Err(End::Closed(Some(code))) => return Expect::Close(code),
            Err(e) => panic!("no outcome: {e:?}"),
        }
    }
}

async fn raw_frames(b: &Broker, token: &str, frames: &[(u8, Vec<u8>, bool)]) -> Expect {
    let mut r = Raw::connect(b, token, "shoal.v1.json").await;
    for (first, payload, masked) in frames {
        r.frame(*first, payload, *masked).await;
    }
    match r.close_code().await {
        Some(c) => Expect::Close(c),
        None => panic!("connection ended without a close code"),
    }
}

fn join_frame(room: impl Into<String>) -> ClientFrame {
    ClientFrame::Join {
        id: Some(1),
        room: room.into(),
        since: None,
    }
}

fn dm_frame(to: &str) -> ClientFrame {
    ClientFrame::Pub {
        id: Some(1),
        room: None,
        to: Some(to.into()),
        cid: None,
        body: json!(1),
        reply_to: None,
    }
}

/// Join `room` on a fresh connection, then send `f`; the outcome of `f`.
async fn joined_then(b: &Broker, token: &str, room: &str, f: ClientFrame) -> Expect {
    let mut c = b.connect(token, Encoding::Json).await;
    c.join(room).await;
    c.send(&f).await;
    outcome(&mut c).await
}

fn pub_frame(room: &str) -> ClientFrame {
    ClientFrame::Pub {
        id: Some(1),
        room: Some(room.into()),
        to: None,
        cid: None,
        body: json!("x"),
        reply_to: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_catalogue() {
    let rsa_pub = rsa_public_pem();
    let b = Broker::start_with(|c| {
        c.conn.max_message_size = 64 * 1024;
        c.auth.allowed_origins = vec!["https://chat.example".into()];
        c.conn.handshake_timeout = std::time::Duration::from_secs(1);
        c.conn.rate_strikes = 20;
        c.auth.jwt_rsa_public_key = Some(rsa_pub.clone());
    })
    .await;
    let t = b.user("mallory").await;
    let bys = b.user("bystander").await;
    let mut by = b.connect(&bys, Encoding::MsgPack).await;
    by.join("safe").await;
    let mut pubr = b.connect(&b.user("poster").await, Encoding::Json).await;
    pubr.join("safe").await;
    let rss0 = b.metric("shoal_process_resident_memory_bytes").await;

    let deep_mp = {
        let mut v = b"\x83\xa1t\xa3pub\xa4room\xa1r\xa4body".to_vec();
        v.extend(std::iter::repeat_n(0x91u8, 30_000));
        v.push(0xc0);
        v
    };
    let deep_json = format!(
        "{{\"t\":\"pub\",\"room\":\"r\",\"body\":{}1{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    )
    .into_bytes();
    let mut cases: Vec<(&str, Expect)> = vec![];
    macro_rules! case {
        ($name:expr, $expect:expr, $got:expr) => {{
            let got = $got;
            assert_eq!(got, $expect, "case `{}`", $name);
            cases.push(($name, $expect));
            // After every case: the bystander is served and memory is bounded.
            let seq = match pubr.publish("safe", json!($name)).await {
                ServerFrame::Ack { seq, .. } => seq,
                f => panic!("bystander publish after `{}`: {f:?}", $name),
            };
            loop {
                match by.recv().await {
                    ServerFrame::Msg { seq: s, .. } if s == seq => break,
                    _ => continue,
                }
            }
        }};
    }
    use Encoding::{Json as J, MsgPack as M};
    use Expect::*;

    // Decoding: every malformed frame is a 400 and the connection stays.
    case!(
        "empty message",
        Error(400),
        ws_message(&b, &t, M, vec![]).await
    );
    case!(
        "truncated msgpack",
        Error(400),
        ws_message(&b, &t, M, b"\x82\xa1t".to_vec()).await
    );
    case!(
        "garbage msgpack",
        Error(400),
        ws_message(&b, &t, M, b"\xc1\xc1\xc1".to_vec()).await
    );
    case!(
        "huge declared map",
        Error(400),
        ws_message(&b, &t, M, b"\xdf\xff\xff\xff\xff".to_vec()).await
    );
    case!(
        "huge declared string",
        Error(400),
        ws_message(&b, &t, M, b"\x81\xa1t\xdb\xff\xff\xff\xff".to_vec()).await
    );
    case!(
        "huge declared array",
        Error(400),
        ws_message(&b, &t, M, b"\xdd\xff\xff\xff\xff".to_vec()).await
    );
    case!(
        "deep nesting msgpack",
        Error(400),
        ws_message(&b, &t, M, deep_mp.clone()).await
    );
    case!(
        "deep nesting json",
        Error(400),
        ws_message(&b, &t, J, deep_json.clone()).await
    );
    case!(
        "trailing bytes",
        Error(400),
        ws_message(&b, &t, M, b"\x81\xa1t\xa4ping\x00".to_vec()).await
    );
    case!(
        "json on a msgpack connection",
        Error(400),
        ws_message(&b, &t, M, br#"{"t":"ping"}"#.to_vec()).await
    );
    case!(
        "truncated json",
        Error(400),
        ws_message(&b, &t, J, br#"{"t":"pi"#.to_vec()).await
    );
    case!(
        "unknown frame type",
        Error(400),
        ws_message(&b, &t, J, br#"{"t":"shutdown"}"#.to_vec()).await
    );
    case!(
        "missing type",
        Error(400),
        ws_message(&b, &t, J, br#"{"room":"x"}"#.to_vec()).await
    );
    case!(
        "room of wrong type",
        Error(400),
        ws_message(&b, &t, J, br#"{"t":"join","room":5}"#.to_vec()).await
    );
    case!(
        "negative id",
        Error(400),
        ws_message(&b, &t, J, br#"{"t":"ping","id":-1}"#.to_vec()).await
    );
    case!(
        "since of wrong type",
        Error(400),
        ws_message(
            &b,
            &t,
            J,
            br#"{"t":"join","room":"a","since":"0"}"#.to_vec()
        )
        .await
    );
    case!(
        "binary msgpack body value",
        Error(400),
        ws_message(
            &b,
            &t,
            M,
            b"\x83\xa1t\xa3pub\xa4room\xa1r\xa4body\xc4\x01\x00".to_vec()
        )
        .await
    );
    // Names.
    case!(
        "control character in room",
        Error(400),
        ws_frame(&b, &t, J, join_frame("a\u{1}b")).await
    );
    case!(
        "invalid utf-8 ish room (replacement char)",
        Error(400),
        ws_frame(&b, &t, J, join_frame("a\u{fffd}b")).await
    );
    case!(
        "room name too long",
        Error(400),
        ws_frame(&b, &t, J, join_frame("r".repeat(200))).await
    );
    case!(
        "room with path characters",
        Error(400),
        ws_frame(&b, &t, J, join_frame("../etc")).await
    );
    case!(
        "bad DM user name",
        Error(400),
        ws_frame(&b, &t, J, dm_frame("bad user")).await
    );
    case!(
        "DM to yourself",
        Error(400),
        ws_frame(&b, &t, J, dm_frame("mallory")).await
    );
    case!(
        "pub with room and to",
        Error(400),
        ws_frame(
            &b,
            &t,
            J,
            ClientFrame::Pub {
                id: Some(1),
                room: Some("a".into()),
                to: Some("bystander".into()),
                cid: None,
                body: json!(1),
                reply_to: None,
            }
        )
        .await
    );
    case!(
        "pub to a room not joined",
        Error(404),
        ws_frame(&b, &t, J, pub_frame("safe")).await
    );
    case!(
        "join another pair's DM room",
        Error(403),
        ws_frame(&b, &t, J, join_frame("dm:bystander:poster")).await
    );
    case!(
        "history of another pair's DM room",
        Error(403),
        ws_frame(
            &b,
            &t,
            J,
            ClientFrame::History {
                id: Some(1),
                room: "dm:bystander:poster".into(),
                before: None,
                limit: Some(u32::MAX)
            }
        )
        .await
    );
    case!(
        "oversized cid",
        Error(400),
        joined_then(
            &b,
            &t,
            "m1",
            ClientFrame::Pub {
                id: Some(9),
                room: Some("m1".into()),
                to: None,
                cid: Some("c".repeat(100)),
                body: json!(1),
                reply_to: None,
            }
        )
        .await
    );
    case!(
        "mark beyond the room's last seq",
        Error(400),
        joined_then(
            &b,
            &t,
            "m2",
            ClientFrame::Mark {
                id: Some(9),
                room: "m2".into(),
                seq: u64::MAX,
                state: shoal_proto::MarkState::Read,
            }
        )
        .await
    );
    case!(
        "delete a message that does not exist",
        Error(404),
        joined_then(
            &b,
            &t,
            "m3",
            ClientFrame::Delete {
                id: Some(9),
                room: "m3".into(),
                seq: 12345,
            }
        )
        .await
    );
    // Limits and floods.
    case!("thousands of joins from one socket", Error(429), {
        let mut c = b.connect(&t, M).await;
        let mut got = None;
        for i in 0..300 {
            let join = ClientFrame::Join {
                id: Some(i),
                room: format!("many{i}"),
                since: None,
            };
            if c.try_send(&join).await.is_err() {
                break;
            }
        }
        while got.is_none() {
            if let ServerFrame::Error { code, .. } = c.recv().await {
                got = Some(code);
            }
        }
        Error(got.unwrap_or(0))
    });
    case!(
        "join storm on one room",
        Close(CloseCode::Policy.as_u16()),
        {
            let mut c = b.connect(&t, M).await;
            for _ in 0..2000 {
                let join = ClientFrame::Join {
                    id: None,
                    room: "storm".into(),
                    since: None,
                };
                if c.try_send(&join).await.is_err() {
                    break;
                }
            }
            match c.closed().await {
                End::Closed(Some(code)) => Close(code),
                e => panic!("{e:?}"),
            }
        }
    );
    case!("ping flood", Close(CloseCode::Policy.as_u16()), {
        let mut r = Raw::connect(&b, &t, "shoal.v1.json").await;
        for _ in 0..2000 {
            r.frame(0x89, b"ping", true).await;
        }
        Close(r.close_code().await.unwrap_or(0))
    });
    case!(
        "10 MB message",
        Close(1009),
        ws_message(&b, &t, M, vec![0x90; 10 * 1024 * 1024]).await
    );
    case!(
        "one byte over the limit",
        Close(1009),
        ws_message(&b, &t, M, vec![0x90; 64 * 1024 + 1]).await
    );
    case!("endless continuation frames", Close(1009), {
        let mut frames = vec![(0x01u8, vec![b' '; 1000], true)];
        frames.extend(std::iter::repeat_n((0x00u8, vec![b' '; 8000], true), 20));
        raw_frames(&b, &t, &frames).await
    });
    // WebSocket protocol violations.
    case!(
        "unmasked client frame",
        Close(1002),
        raw_frames(&b, &t, &[(0x81, br#"{"t":"ping"}"#.to_vec(), false)]).await
    );
    case!(
        "unmasked frame after masked ones",
        Close(1002),
        raw_frames(
            &b,
            &t,
            &[
                (0x81, br#"{"t":"ping"}"#.to_vec(), true),
                (0x81, br#"{"t":"ping"}"#.to_vec(), false)
            ]
        )
        .await
    );
    case!(
        "continuation without a start",
        Close(1002),
        raw_frames(&b, &t, &[(0x80, b"x".to_vec(), true)]).await
    );
    case!(
        "reserved opcode",
        Close(1002),
        raw_frames(&b, &t, &[(0x83, b"x".to_vec(), true)]).await
    );
    case!(
        "reserved bits set",
        Close(1002),
        raw_frames(&b, &t, &[(0xc1, b"{}".to_vec(), true)]).await
    );
    case!(
        "oversized ping",
        Close(1002),
        raw_frames(&b, &t, &[(0x89, vec![0; 200], true)]).await
    );
    case!(
        "fragmented ping",
        Close(1002),
        raw_frames(&b, &t, &[(0x09, b"x".to_vec(), true)]).await
    );
    case!(
        "invalid utf-8 in a text message",
        Close(1007),
        raw_frames(&b, &t, &[(0x81, b"\xff\xfe".to_vec(), true)]).await
    );
    case!(
        "new message inside a fragmented one",
        Close(1002),
        raw_frames(
            &b,
            &t,
            &[(0x01, b"{".to_vec(), true), (0x81, b"{}".to_vec(), true)]
        )
        .await
    );
    // Handshake and tokens: refused with 401 before any upgrade.
    let now = now();
    let secret = SECRET.as_bytes();
    for (name, token) in [
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"mallory","exp":{}}}"#, now + 600))
            ),
        ),
        (
            "expired token",
            mint(
                json!({"sub": "mallory", "exp": now - 120, "jti": "x1"}),
                Algorithm::HS256,
                secret,
            ),
        ),
        (
            "not-yet-valid token",
            mint(
                json!({"sub": "mallory", "exp": now + 600, "nbf": now + 300, "jti": "x2"}),
                Algorithm::HS256,
                secret,
            ),
        ),
        (
            "forged signature",
            mint(
                json!({"sub": "mallory", "exp": now + 600}),
                Algorithm::HS256,
                b"another-secret-another-secret-0123",
            ),
        ),
        (
            "HS256 signed with the RSA public key (alg confusion)",
            mint(
                json!({"sub": "mallory", "exp": now + 600}),
                Algorithm::HS256,
                &std::fs::read(&rsa_pub).expect("pem"),
            ),
        ),
        ("garbage token", "a.b.c".to_string()),
    ] {
        case!(
            name,
            Http(401),
            Http(
                b.try_connect(&token, J)
                    .await
                    .err()
                    .map(|e| e.0)
                    .unwrap_or(101)
            )
        );
    }
    case!("revoked token reused", Http(401), {
        let tok = b.user("revokee").await;
        let (s, _) = b.post("/api/logout", json!({}), Some(&tok)).await;
        assert_eq!(s, 200);
        Http(
            b.try_connect(&tok, J)
                .await
                .err()
                .map(|e| e.0)
                .unwrap_or(101),
        )
    });
    case!(
        "cross-site handshake from a disallowed Origin",
        Http(403),
        {
            let r = b
                .http
                .get(b.url("/ws"))
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", "13")
                .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("Origin", "https://evil.example")
                .bearer_auth(&t)
                .send()
                .await
                .expect("http");
            Http(r.status().as_u16())
        }
    );
    case!("slowloris handshake", Http(408), {
        let mut s = TcpStream::connect(b.addr).await.expect("tcp");
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        // Never finish the headers: the server must hang up on its own.
        let mut buf = vec![0u8; 1024];
        let r = tokio::time::timeout(Duration::from_secs(8), async {
            let mut all = vec![];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("the server kept a half-sent handshake open");
        let head = String::from_utf8_lossy(&r).to_string();
        Http(if head.is_empty() {
            408
        } else {
            head[9..12].parse().unwrap_or(0)
        })
    });
    // REST.
    case!(
        "SQL/FTS metacharacters in search",
        Http(200),
        Http(
            b.get(
                "/api/rooms/safe/search?q=%22%29%20OR%201%3D1%3B--%20NEAR%28*",
                Some(&t)
            )
            .await
            .0
        )
    );
    case!(
        "path traversal in a static request",
        Http(404),
        Http(b.get("/..%2f..%2fetc%2fpasswd", None).await.0)
    );
    case!(
        "path traversal in a file id",
        Http(404),
        Http(b.get("/api/files/..%2f..%2fshoal.db", Some(&t)).await.0)
    );
    case!("malformed JSON body", Http(400), {
        let r = b
            .http
            .post(b.url("/api/login"))
            .body("{\"username\":")
            .send()
            .await
            .expect("http");
        Http(r.status().as_u16())
    });
    case!("oversized JSON body", Http(413), {
        let r = b
            .http
            .post(b.url("/api/register"))
            .body(vec![b'{'; 200 * 1024])
            .send()
            .await
            .expect("http");
        Http(r.status().as_u16())
    });
    case!(
        "wrong field types in a REST body",
        Http(400),
        Http(
            b.post(
                "/api/register",
                json!({"username": 5, "password": []}),
                None
            )
            .await
            .0
        )
    );
    case!("wrong method", Http(405), {
        let r = b
            .http
            .delete(b.url("/api/users"))
            .send()
            .await
            .expect("http");
        Http(r.status().as_u16())
    });

    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let rss1 = b.metric("shoal_process_resident_memory_bytes").await;
    assert!(
        rss1 < rss0 + 256.0 * 1024.0 * 1024.0,
        "memory grew from {rss0} to {rss1} bytes"
    );
    assert!(b.metric("shoal_errors_total{code=\"bad_request\"").await >= 0.0);
}

fn b64(s: &str) -> String {
    // URL-safe base64 without padding, as JWT segments use.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An RSA public key file for the alg-confusion case (the broker trusts
/// RS256 tokens verified with it; HS256 tokens "signed" with it must fail).
fn rsa_public_pem() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-rsa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join("rsa.pub.pem");
    std::fs::write(&p, RSA_PUB).expect("write");
    p
}

const RSA_PUB: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAw7Y0ur8VCoKSZyCz7FC8
MNFoSWiYVNvsjrWHMgRNgNRu6UGh8psukTjwngIqkEXi6se/Hf5zJ5vWdGGwqnyz
au6bH5yrZS43L1BAhsJJASGb8ghEu3pYR8kDcTsDDumOKBwv+f26XHkAtJsWVL/k
jZdXhOYHFxfR2hlkIhMafA6fs7mhSQps1lBKJPfNkWxrEf0Xkv0W1fcQUCUGhnLL
VnN6IsletfKNNKLwkha/jA+tIILJRx1lT8HvcPaahg1ykeTnAzzHhaKYYX9Qb7Ns
p6n5vKjqRMAolKZxQqzYJsnchIoCdVKXSf0eekzmoVvtjEIsMkZrsXZOutYzISDH
uQIDAQAB
-----END PUBLIC KEY-----
";
