//! Rooms, ordering, DMs, typing, presence, limits and shutdown over real
//! WebSocket connections in both encodings.
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use shoal_proto::{ClientFrame, CloseCode, Encoding, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

fn msg_seq(f: &ServerFrame) -> Option<(u64, String, serde_json::Value)> {
    match f {
        ServerFrame::Msg {
            seq, from, body, ..
        } => Some((*seq, from.clone(), body.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn ordering_under_concurrent_publishers_both_encodings() {
    let b = Broker::start_with(|c| c.conn.rate_limit = 10_000.0).await;
    let mut receivers = Vec::new();
    for (i, enc) in [Encoding::MsgPack, Encoding::Json].into_iter().enumerate() {
        let t = b.user(&format!("recv{i}")).await;
        let mut c = b.connect(&t, enc).await;
        assert_eq!(c.join("lobby").await, 0);
        receivers.push(c);
    }
    const PUBS: usize = 4;
    const N: u64 = 100;
    let mut tasks = Vec::new();
    for p in 0..PUBS {
        let t = b.user(&format!("pub{p}")).await;
        let enc = if p % 2 == 0 {
            Encoding::MsgPack
        } else {
            Encoding::Json
        };
        let mut c = b.connect(&t, enc).await;
        c.join("lobby").await;
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..N {
                let id = Some(i + 1);
                c.send(&ClientFrame::Pub {
                    id,
                    room: Some("lobby".into()),
                    to: None,
                    cid: None,
                    body: json!({"p": p, "i": i}),
                    reply_to: None,
                })
                .await;
            }
            while acked.len() < N as usize {
                if let ServerFrame::Ack { seq, .. } = c.recv().await {
                    acked.push(seq);
                }
            }
            acked
        }));
    }
    let mut all_acks = Vec::new();
    for t in tasks {
        let acks = t.await.expect("publisher");
        assert!(
            acks.windows(2).all(|w| w[0] < w[1]),
            "acks of one publisher increase"
        );
        all_acks.extend(acks);
    }
    all_acks.sort_unstable();
    assert_eq!(
        all_acks,
        (1..=PUBS as u64 * N).collect::<Vec<_>>(),
        "every seq assigned once, no gaps"
    );
    for mut r in receivers {
        let mut last_i = [None::<u64>; PUBS];
        for want in 1..=PUBS as u64 * N {
            let f = r.recv_until(|f| matches!(f, ServerFrame::Msg { .. })).await;
            let (seq, _, body) = msg_seq(&f).expect("msg");
            assert_eq!(seq, want, "{:?}: in seq order, no gap", r.enc);
            let p = body["p"].as_u64().expect("p") as usize;
            let i = body["i"].as_u64().expect("i");
            assert!(last_i[p].is_none_or(|l| l < i), "per-publisher order kept");
            last_i[p] = Some(i);
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn multi_tab_users_and_dms() {
    let b = Broker::start().await;
    let alice = b.user("alice").await;
    let bob = b.user("bob").await;
    let carol = b.user("carol").await;
    let mut a1 = b.connect(&alice, Encoding::Json).await;
    let mut a2 = b.connect(&alice, Encoding::MsgPack).await;
    let mut b1 = b.connect(&bob, Encoding::Json).await;
    let mut b2 = b.connect(&bob, Encoding::MsgPack).await;
    let mut c1 = b.connect(&carol, Encoding::Json).await;

    // Room message reaches every tab of every member.
    a1.join("team").await;
    a2.join("team").await;
    b1.join("team").await;
    let ack = a1.publish("team", json!("hello")).await;
    assert!(matches!(ack, ServerFrame::Ack { seq: 1, .. }), "{ack:?}");
    for c in [&mut a2, &mut b1] {
        let f = c.recv_until(|f| matches!(f, ServerFrame::Msg { .. })).await;
        assert_eq!(msg_seq(&f), Some((1, "alice".into(), json!("hello"))));
    }

    // A DM reaches both of bob's tabs (and alice's other tab) without a join.
    let id = a1.id();
    a1.send(&ClientFrame::Pub {
        id,
        room: None,
        to: Some("bob".into()),
        cid: None,
        body: json!({"text": "psst"}),
        reply_to: None,
    })
    .await;
    let ack = a1
        .recv_until(|f| matches!(f, ServerFrame::Ack { .. }))
        .await;
    assert!(
        matches!(&ack, ServerFrame::Ack { room, seq: 1, .. } if room == "dm:alice:bob"),
        "{ack:?}"
    );
    for c in [&mut b1, &mut b2, &mut a2] {
        let f = c
            .recv_until(|f| matches!(f, ServerFrame::Msg { room, .. } if room == "dm:alice:bob"))
            .await;
        assert_eq!(
            msg_seq(&f),
            Some((1, "alice".into(), json!({"text": "psst"})))
        );
    }
    // DM privacy: carol got nothing and may not join.
    assert_eq!(
        c1.try_recv(Duration::from_millis(300)).await.err(),
        Some(End::Timeout)
    );
    let id = c1.id();
    c1.send(&ClientFrame::Join {
        id,
        room: "dm:alice:bob".into(),
        since: None,
    })
    .await;
    assert!(matches!(c1.recv().await, ServerFrame::Error { code: 403, id: i, .. } if i == id));
    // Bad DM targets.
    for (to, code) in [("alice", 400), ("no one", 400)] {
        let id = a1.id();
        a1.send(&ClientFrame::Pub {
            id,
            room: None,
            to: Some(to.into()),
            cid: None,
            body: json!(1),
            reply_to: None,
        })
        .await;
        let f = a1
            .recv_until(|f| matches!(f, ServerFrame::Error { .. }))
            .await;
        assert!(
            matches!(f, ServerFrame::Error { code: c, .. } if c == code),
            "{to}: {f:?}"
        );
    }
    // pub with both room and to, or neither.
    let id = a1.id();
    a1.send(&ClientFrame::Pub {
        id,
        room: Some("team".into()),
        to: Some("bob".into()),
        cid: None,
        body: json!(1),
        reply_to: None,
    })
    .await;
    assert!(matches!(
        a1.recv_until(|f| matches!(f, ServerFrame::Error { .. }))
            .await,
        ServerFrame::Error { code: 400, .. }
    ));
    b.stop().await;
}

#[tokio::test]
async fn typing_presence_members() {
    let b =
        Broker::start_with(|c| c.conn.typing_interval = std::time::Duration::from_millis(60_000))
            .await;
    let alice = b.user("alice").await;
    let bob = b.user("bob").await;
    let mut a = b.connect(&alice, Encoding::Json).await;
    let mut bb = b.connect(&bob, Encoding::MsgPack).await;
    a.join("room1").await;
    bb.join("room1").await;
    assert_eq!(
        a.recv().await,
        ServerFrame::Presence {
            room: "room1".into(),
            user: "bob".into(),
            online: true
        }
    );
    let id = a.id();
    a.send(&ClientFrame::Members {
        id,
        room: "room1".into(),
    })
    .await;
    assert_eq!(
        a.recv().await,
        ServerFrame::Members {
            id,
            room: "room1".into(),
            users: vec!["alice".into(), "bob".into()],
            receipts: vec![],
        }
    );

    bb.send(&ClientFrame::Typing {
        id: None,
        room: "room1".into(),
    })
    .await;
    assert_eq!(
        a.recv().await,
        ServerFrame::Typing {
            room: "room1".into(),
            user: "bob".into()
        }
    );
    // Second typing within the interval is refused and not forwarded.
    let id = bb.id();
    bb.send(&ClientFrame::Typing {
        id,
        room: "room1".into(),
    })
    .await;
    assert!(matches!(
        bb.recv().await,
        ServerFrame::Error { code: 429, .. }
    ));
    // The typer does not see its own typing.
    assert_eq!(
        bb.try_recv(Duration::from_millis(200)).await.err(),
        Some(End::Timeout)
    );
    assert_eq!(
        a.try_recv(Duration::from_millis(200)).await.err(),
        Some(End::Timeout)
    );

    // Leave -> offline; rejoin -> online; disconnect -> offline.
    let id = bb.id();
    bb.send(&ClientFrame::Leave {
        id,
        room: "room1".into(),
    })
    .await;
    assert_eq!(
        bb.recv().await,
        ServerFrame::Left {
            id,
            room: "room1".into(),
            reason: None,
        }
    );
    assert_eq!(
        a.recv().await,
        ServerFrame::Presence {
            room: "room1".into(),
            user: "bob".into(),
            online: false
        }
    );
    bb.join("room1").await;
    assert!(matches!(
        a.recv().await,
        ServerFrame::Presence { online: true, .. }
    ));
    drop(bb);
    assert_eq!(
        a.recv().await,
        ServerFrame::Presence {
            room: "room1".into(),
            user: "bob".into(),
            online: false
        }
    );

    // Requests on rooms not joined, bad names.
    let id = a.id();
    a.send(&ClientFrame::Members {
        id,
        room: "elsewhere".into(),
    })
    .await;
    assert!(matches!(
        a.recv().await,
        ServerFrame::Error { code: 404, .. }
    ));
    let id = a.id();
    a.send(&ClientFrame::Join {
        id,
        room: "bad room!".into(),
        since: None,
    })
    .await;
    assert!(matches!(
        a.recv().await,
        ServerFrame::Error { code: 400, .. }
    ));
    assert!(matches!(
        a.publish("elsewhere", json!(1)).await,
        ServerFrame::Error { code: 404, .. }
    ));
    b.stop().await;
}

#[tokio::test]
async fn rate_limit_then_policy_close() {
    let b = Broker::start_with(|c| {
        c.conn.rate_limit = 5.0;
        c.conn.rate_burst = 5.0;
        c.conn.rate_strikes = 20;
    })
    .await;
    let t = b.user("spammer").await;
    let mut c = b.connect(&t, Encoding::Json).await;
    for _ in 0..10 {
        c.send(&ClientFrame::Ping { id: Some(1) }).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..10 {
        match c.recv().await {
            ServerFrame::Pong { .. } => pongs += 1,
            ServerFrame::Error { code: 429, .. } => limited += 1,
            f => panic!("{f:?}"),
        }
    }
    assert!(
        pongs >= 5 && limited >= 4,
        "pongs {pongs}, limited {limited}"
    );
    // Keep flooding: closed with 1008.
    for _ in 0..40 {
        if c.send_raw(Message::Text(r#"{"t":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(
        c.closed().await,
        End::Closed(Some(CloseCode::Policy.as_u16()))
    );
    assert!(b.metric("shoal_rate_limited_total{node=").await >= 0.0);
    assert!(b.metrics().await.contains("reason=\"policy\"} 1"));
}

#[tokio::test]
async fn max_rooms_and_room_capacity() {
    let b = Broker::start_with(|c| {
        c.conn.max_rooms_per_connection = 3;
        c.rooms.namespaces = vec!["small:max_members=1".parse().expect("spec")];
    })
    .await;
    let t = b.user("joiner").await;
    let mut c = b.connect(&t, Encoding::MsgPack).await;
    for r in ["r1", "r2", "r3"] {
        c.join(r).await;
    }
    let id = c.id();
    c.send(&ClientFrame::Join {
        id,
        room: "r4".into(),
        since: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        ServerFrame::Error { code: 429, .. }
    ));
    let t2 = b.user("other").await;
    let mut c2 = b.connect(&t2, Encoding::Json).await;
    c2.join("small:a").await;
    let id = c.id();
    c.send(&ClientFrame::Leave {
        id,
        room: "r1".into(),
    })
    .await;
    c.recv().await;
    let id = c.id();
    c.send(&ClientFrame::Join {
        id,
        room: "small:a".into(),
        since: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        ServerFrame::Error { code: 409, .. }
    ));
}

#[tokio::test]
async fn oversized_and_malformed_frames_leave_others_unharmed() {
    let b = Broker::start_with(|c| c.conn.max_message_size = 1024).await;
    let good = b.user("good").await;
    let bad = b.user("bad").await;
    let mut g = b.connect(&good, Encoding::Json).await;
    g.join("r").await;
    let mut x = b.connect(&bad, Encoding::MsgPack).await;
    x.join("r").await;
    g.recv().await; // presence of bad

    // Malformed msgpack: error 400, the connection stays usable.
    for garbage in [&b"\xc1"[..], b"\x81\xa1t\xa3zzz", b"\x92\x01"] {
        x.send_raw(Message::Binary(garbage.to_vec().into()))
            .await
            .expect("send");
        assert!(matches!(
            x.recv().await,
            ServerFrame::Error {
                code: 400,
                id: None,
                ..
            }
        ));
    }
    let id = x.id();
    x.send(&ClientFrame::Ping { id }).await;
    assert_eq!(x.recv().await, ServerFrame::Pong { id });
    // A JSON text on a msgpack connection is malformed, not a crash.
    x.send_raw(Message::Text(r#"{"t":"ping"}"#.into()))
        .await
        .expect("send");
    assert!(matches!(
        x.recv().await,
        ServerFrame::Error { code: 400, .. }
    ));
    // Exactly at the limit is fine; one byte over closes with 1009.
    let at_limit = format!(r#"{{"t":"ping","pad":"{}"}}"#, "x".repeat(1024 - 21));
    assert_eq!(at_limit.len(), 1024);
    let mut j = b.connect(&bad, Encoding::Json).await;
    j.send_raw(Message::Text(at_limit.clone().into()))
        .await
        .expect("send");
    assert!(matches!(j.recv().await, ServerFrame::Pong { .. }));
    j.send_raw(Message::Text(format!("{at_limit} ").into()))
        .await
        .expect("send");
    assert_eq!(
        j.closed().await,
        End::Closed(Some(CloseCode::TooBig.as_u16()))
    );
    x.send_raw(Message::Binary(vec![0u8; 10 * 1024 * 1024].into()))
        .await
        .ok();
    assert_eq!(
        x.closed().await,
        End::Closed(Some(CloseCode::TooBig.as_u16()))
    );

    // The bystander is still served.
    let ack = g.publish("r", json!("still here")).await;
    assert!(matches!(ack, ServerFrame::Ack { .. }), "{ack:?}");
    b.stop().await;
}

#[tokio::test]
async fn slow_consumer_is_closed_and_others_keep_up() {
    let b = Broker::start_with(|c| {
        c.conn.outbound_queue = 16;
        c.conn.rate_limit = 100_000.0;
        c.conn.rate_burst = 100_000.0;
        c.auth.api_key = Some("key-0123456789abcdef".into());
    })
    .await;
    let ts = b.user("sloth").await;
    let tf = b.user("fast").await;
    let mut slow = b.connect(&ts, Encoding::MsgPack).await;
    let mut fast = b.connect(&tf, Encoding::MsgPack).await;
    for c in [&mut slow, &mut fast] {
        c.join("firehose").await;
    }
    let payload = "z".repeat(32 * 1024);
    const N: u64 = 600; // ~19 MiB: far more than loopback socket buffers hold
    let fast_task = tokio::spawn(async move {
        let mut next = 1;
        while next <= N {
            if let ServerFrame::Msg { seq, .. } = fast.recv().await {
                assert_eq!(seq, next);
                next += 1;
            }
        }
    });
    // Published through the server API so the producer is not itself a
    // member that has to read the firehose.
    for _ in 0..N {
        let (s, _) = b
            .post(
                "/api/rooms/firehose/messages",
                json!({"body": payload}),
                Some("key-0123456789abcdef"),
            )
            .await;
        assert_eq!(s, 201);
    }
    tokio::time::timeout(Duration::from_secs(30), fast_task)
        .await
        .expect("fast consumer keeps up")
        .expect("fast");
    // The sloth (never read anything) was closed with 4003.
    for _ in 0..50 {
        if b.metrics().await.contains("reason=\"slow_consumer\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.metrics().await.contains("reason=\"slow_consumer\"} 1"));
    // The backlog was queued and drained in batches (the fast consumer's
    // writes did not all go straight to its socket).
    let m = b.metrics().await;
    assert!(sample(&m, "shoal_outbound_queue_depth_count") > 0.0);
    assert!(sample(&m, "shoal_write_batch_frames_count") > 0.0);
    assert_eq!(
        slow.closed().await,
        End::Closed(Some(CloseCode::SlowConsumer.as_u16()))
    );
}

#[tokio::test]
async fn namespace_publish_policy_and_server_api() {
    let b = Broker::start_with(|c| {
        c.auth.api_key = Some("k-123-0123456789abcdef".into());
        c.rooms.namespaces = vec!["news:publish=api,presence=off".parse().expect("spec")];
    })
    .await;
    let t = b.user("reader").await;
    let mut c = b.connect(&t, Encoding::Json).await;
    c.join("news:eu").await;
    assert!(matches!(
        c.publish("news:eu", json!("x")).await,
        ServerFrame::Error { code: 403, .. }
    ));
    let (s, _) = b
        .post(
            "/api/rooms/news:eu/messages",
            json!({"body": "hi"}),
            Some("wrong"),
        )
        .await;
    assert_eq!(s, 401);
    let (s, v) = b
        .post(
            "/api/rooms/news:eu/messages",
            json!({"body": {"headline": "hi"}}),
            Some("k-123-0123456789abcdef"),
        )
        .await;
    assert_eq!(
        (s, v["seq"].as_u64(), v["recipients"].as_u64()),
        (201, Some(1), Some(1))
    );
    let f = c.recv().await;
    assert_eq!(
        msg_seq(&f),
        Some((1, "server".into(), json!({"headline": "hi"})))
    );
    let (s, _) = b
        .post(
            "/api/rooms/bad%20room/messages",
            json!({"body": 1}),
            Some("k-123-0123456789abcdef"),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn idle_timeout_closes_silent_clients() {
    let b = Broker::start_with(|c| {
        c.conn.ping_interval = std::time::Duration::from_secs(1);
        c.conn.idle_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let t = b.user("quiet").await;
    let c = b.connect(&t, Encoding::Json).await;
    // Do not read (so no pongs are sent) for longer than the idle timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = c;
    assert_eq!(
        c.closed().await,
        End::Closed(Some(CloseCode::IdleTimeout.as_u16()))
    );
    // A client that reads (and so answers pings) stays connected.
    let mut live = b.connect(&t, Encoding::Json).await;
    assert_eq!(
        live.try_recv(Duration::from_secs(3)).await.err(),
        Some(End::Timeout)
    );
    let id = live.id();
    live.send(&ClientFrame::Ping { id }).await;
    assert_eq!(live.recv().await, ServerFrame::Pong { id });
}

#[tokio::test]
async fn graceful_shutdown_sends_1001_and_flushes() {
    let b = Broker::start().await;
    let t = b.user("stayer").await;
    let mut c = b.connect(&t, Encoding::MsgPack).await;
    c.join("r").await;
    let started = std::time::Instant::now();
    b.srv.stop.cancel();
    assert_eq!(
        c.closed().await,
        End::Closed(Some(CloseCode::GoingAway.as_u16()))
    );
    let task = {
        let mut b = b;
        b.srv.task.take()
    };
    tokio::time::timeout(Duration::from_secs(15), task.expect("task"))
        .await
        .expect("exits in time")
        .expect("join")
        .expect("ok");
    assert!(started.elapsed() < Duration::from_secs(12));
}
