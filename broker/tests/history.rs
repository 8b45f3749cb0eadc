//! Durable history against a real broker: crash safety, recovery with
//! `since`, gaps, idempotent retries, history paging, receipts, unread
//! counts, search, soft delete and the publish API.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use serde_json::{json, Value};
use shoal_proto::{ClientFrame, Encoding, EventKind, MarkState, ServerFrame};

fn ack_seq(f: &ServerFrame) -> u64 {
    match f {
        ServerFrame::Ack { seq, .. } => *seq,
        other => panic!("expected ack, got {other:?}"),
    }
}

#[tokio::test]
async fn acked_messages_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Proc::start(dir.path(), &["--rate-burst", "1000"]).await;
    let token = p.user("alice").await;
    let mut a = p.connect(&token, Encoding::MsgPack).await;
    a.join("journal").await;
    // Pipeline 300 publishes, then kill the broker as soon as 200 acks are in.
    for i in 0..300u32 {
        let id = Some(1000 + u64::from(i));
        a.send(&ClientFrame::Pub {
            id,
            room: Some("journal".into()),
            to: None,
            cid: None,
            body: json!({ "text": format!("entry {i}") }),
            reply_to: None,
        })
        .await;
    }
    let mut acked = BTreeSet::new();
    while acked.len() < 200 {
        if let ServerFrame::Ack { seq, .. } = a.recv().await {
            acked.insert(seq);
        }
    }
    p.kill9();
    drop(a);

    let p = Proc::start(dir.path(), &[]).await;
    let token = p.user("alice").await;
    let stored: BTreeSet<u64> = p.stored_seqs(&token, "journal").await.into_iter().collect();
    let missing: Vec<_> = acked.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "acked but lost after kill -9: {missing:?}"
    );
    // Stored seqs have no gap, and new publishes continue after them.
    let max = stored.iter().max().copied().unwrap_or(0);
    assert_eq!(stored.len() as u64, max, "no gap in stored seqs");
    let mut a = p.connect(&token, Encoding::Json).await;
    assert_eq!(a.join("journal").await, max);
    assert_eq!(
        ack_seq(&a.publish("journal", json!("after")).await),
        max + 1
    );
}

#[tokio::test]
async fn reconnect_with_since_misses_nothing_under_concurrent_publishing() {
    let b = Broker::start_with(|c| c.conn.rate_burst = 2000.0).await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut pubber = b.connect(&ta, Encoding::MsgPack).await;
    pubber.join("live").await;
    const N: u64 = 400;
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            pubber
                .send(&ClientFrame::Pub {
                    id: None,
                    room: Some("live".into()),
                    to: None,
                    cid: None,
                    body: json!(i),
                    reply_to: None,
                })
                .await;
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Wait for every ack so the run ends with all N committed.
        let mut acks = 0;
        while acks < N {
            if let ServerFrame::Ack { .. } = pubber.recv().await {
                acks += 1;
            }
        }
        pubber
    });
    let mut seen: Vec<u64> = vec![];
    let mut enc = Encoding::Json;
    // Drop the connection three times mid-stream, rejoining with since.
    for round in 0..4 {
        let mut c = b.connect(&tb, enc).await;
        let since = seen.last().copied().unwrap_or(0);
        let (replayed, joined_at) = c.join_since("live", Some(since)).await;
        seen.extend(replayed.iter().filter_map(msg_seq));
        assert_eq!(
            seen.last().copied().unwrap_or(0),
            joined_at,
            "joined at the replay's end"
        );
        let take = if round < 3 { 60 } else { u64::MAX };
        let mut got = 0;
        while got < take && seen.last().copied().unwrap_or(0) < N {
            if let Some(s) = msg_seq(&c.recv().await) {
                seen.push(s);
                got += 1;
            }
        }
        drop(c);
        enc = if enc == Encoding::Json {
            Encoding::MsgPack
        } else {
            Encoding::Json
        };
    }
    publisher.await.expect("publisher");
    assert_eq!(
        seen,
        (1..=N).collect::<Vec<_>>(),
        "no gap, no duplicate, in order"
    );
}

#[tokio::test]
async fn gap_frame_when_retention_dropped_the_range() {
    let b = Broker::start_with(|c| {
        c.rooms.namespaces = vec!["short:retain_messages=5".parse().expect("spec")];
        c.store.retention_interval = std::time::Duration::from_secs(1);
    })
    .await;
    let t = b.user("alice").await;
    let mut a = b.connect(&t, Encoding::Json).await;
    a.join("short:feed").await;
    for i in 0..20 {
        ack_seq(&a.publish("short:feed", json!(i)).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.metric("shoal_retention_removed_total").await < 15.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = b.connect(&t, Encoding::MsgPack).await;
    let (frames, seq) = c.join_since("short:feed", Some(2)).await;
    assert_eq!(seq, 20);
    assert_eq!(
        frames[0],
        ServerFrame::Gap {
            room: "short:feed".into(),
            from: 3,
            to: 15
        }
    );
    let seqs: Vec<u64> = frames.iter().filter_map(msg_seq).collect();
    assert_eq!(seqs, (16..=20).collect::<Vec<_>>());
    // No gap when the client is already within what is kept.
    let mut d = b.connect(&t, Encoding::Json).await;
    let (frames, _) = d.join_since("short:feed", Some(18)).await;
    assert_eq!(
        frames.iter().filter_map(msg_seq).collect::<Vec<_>>(),
        vec![19, 20]
    );
}

#[tokio::test]
async fn idempotent_retry_is_acked_once_and_delivered_once() {
    let b = Broker::start().await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut a = b.connect(&ta, Encoding::Json).await;
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    a.join("r").await;
    o.join("r").await;
    let s1 = ack_seq(&a.publish_cid("r", Some("m-1"), json!("hello")).await);
    let s2 = ack_seq(&a.publish_cid("r", Some("m-1"), json!("hello")).await);
    let s3 = ack_seq(&a.publish_cid("r", Some("m-2"), json!("again")).await);
    assert_eq!((s1, s2, s3), (1, 1, 2));
    let mut got = vec![];
    while got.len() < 2 {
        if let Some(s) = msg_seq(&o.recv().await) {
            got.push(s);
        }
    }
    assert_eq!(got, vec![1, 2]);
    assert!(
        o.try_recv(Duration::from_millis(300)).await.is_err(),
        "the retry was delivered again"
    );
    // A retry after reconnecting (even on a new connection) still dedups.
    drop(a);
    let mut a = b.connect(&ta, Encoding::MsgPack).await;
    a.join("r").await;
    assert_eq!(
        ack_seq(&a.publish_cid("r", Some("m-2"), json!("again")).await),
        2
    );
    let too_long = "x".repeat(65);
    assert!(matches!(
        a.publish_cid("r", Some(&too_long), json!(1)).await,
        ServerFrame::Error { code: 400, .. }
    ));
    assert!(b.metric("shoal_idempotent_retries_total").await >= 2.0);
}

#[tokio::test]
async fn history_paging_and_privacy_over_ws_and_rest() {
    let b = Broker::start().await;
    let (ta, tc) = (b.user("alice").await, b.user("carol").await);
    b.user("bob").await; // a DM goes only to a name someone holds
    let mut a = b.connect(&ta, Encoding::Json).await;
    a.join("paged").await;
    for i in 1..=7 {
        ack_seq(&a.publish("paged", json!({ "text": format!("m{i}") })).await);
    }
    // WS: pages of 3, newest first, until `more` is false.
    let mut before = None;
    let mut pages = vec![];
    loop {
        let id = a.id();
        a.send(&ClientFrame::History {
            id,
            room: "paged".into(),
            before,
            limit: Some(3),
        })
        .await;
        match a
            .recv_until(|f| matches!(f, ServerFrame::History { .. }))
            .await
        {
            ServerFrame::History {
                id: i,
                messages,
                more,
                ..
            } => {
                assert_eq!(i, id);
                let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
                before = seqs.last().copied();
                pages.push(seqs);
                if !more {
                    break;
                }
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(pages, vec![vec![7, 6, 5], vec![4, 3, 2], vec![1]]);
    // Stable under concurrent publishing: a page below 5 ignores newer messages.
    ack_seq(&a.publish("paged", json!("new")).await);
    let (s, v) = b
        .get("/api/rooms/paged/messages?before=5&limit=2", Some(&ta))
        .await;
    assert_eq!(s, 200);
    let seqs: Vec<u64> = v["messages"]
        .as_array()
        .expect("arr")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!((seqs, v["more"].as_bool()), (vec![4, 3], Some(true)));
    assert_eq!(v["messages"][0]["body"]["text"], "m4");
    assert_eq!(v["messages"][0]["from"], "alice");
    // Edges: before=1 is empty; limit 0 is clamped to 1; bad numbers are 400.
    let (_, v) = b.get("/api/rooms/paged/messages?before=1", Some(&ta)).await;
    assert_eq!(v["messages"], json!([]));
    let (_, v) = b.get("/api/rooms/paged/messages?limit=0", Some(&ta)).await;
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1));
    let (s, v) = b
        .get("/api/rooms/paged/messages?before=-3", Some(&ta))
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
    // Privacy: no token 401; a DM room of others 403, over REST and WS.
    let (s, _) = b.get("/api/rooms/paged/messages", None).await;
    assert_eq!(s, 401);
    a.send_dm("bob", json!("secret")).await;
    a.recv_until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let (s, _) = b.get("/api/rooms/dm:alice:bob/messages", Some(&tc)).await;
    assert_eq!(s, 403);
    let (s, v) = b.get("/api/rooms/dm:alice:bob/messages", Some(&ta)).await;
    assert_eq!(
        (s, v["messages"][0]["body"].as_str()),
        (200, Some("secret"))
    );
    let mut c = b.connect(&tc, Encoding::MsgPack).await;
    let id = c.id();
    c.send(&ClientFrame::History {
        id,
        room: "dm:alice:bob".into(),
        before: None,
        limit: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        ServerFrame::Error { code: 403, .. }
    ));
}

#[tokio::test]
async fn receipts_members_and_unread_counts() {
    let b = Broker::start().await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut a = b.connect(&ta, Encoding::Json).await;
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    a.join("team").await;
    o.join("team").await;
    for i in 1..=4 {
        ack_seq(&a.publish("team", json!(format!("hi {i}"))).await);
    }
    ack_seq(&o.publish("team", json!("bob here")).await);
    // Bob has 4 unread (his own message does not count).
    let (s, v) = b.get("/api/rooms", Some(&tb)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["rooms"],
        json!([{"room": "team", "last_seq": 5, "delivered": 0, "read": 0, "unread": 4, "mentions": 0}])
    );
    o.send(&ClientFrame::Mark {
        id: None,
        room: "team".into(),
        seq: 3,
        state: MarkState::Read,
    })
    .await;
    let mark = a
        .recv_until(|f| matches!(f, ServerFrame::Mark { .. }))
        .await;
    assert_eq!(
        mark,
        ServerFrame::Mark {
            room: "team".into(),
            user: "bob".into(),
            seq: 3,
            state: MarkState::Read
        }
    );
    // A lower watermark changes nothing and sends nothing; a future seq is 400.
    o.send(&ClientFrame::Mark {
        id: None,
        room: "team".into(),
        seq: 2,
        state: MarkState::Delivered,
    })
    .await;
    let id = o.id();
    o.send(&ClientFrame::Mark {
        id,
        room: "team".into(),
        seq: 99,
        state: MarkState::Read,
    })
    .await;
    assert!(matches!(
        o.recv_until(|f| matches!(f, ServerFrame::Error { .. }))
            .await,
        ServerFrame::Error { code: 400, .. }
    ));
    let id = a.id();
    a.send(&ClientFrame::Members {
        id,
        room: "team".into(),
    })
    .await;
    match a
        .recv_until(|f| matches!(f, ServerFrame::Members { .. }))
        .await
    {
        ServerFrame::Members {
            users, receipts, ..
        } => {
            assert_eq!(users, vec!["alice", "bob"]);
            assert_eq!(
                receipts,
                vec![shoal_proto::Receipt {
                    user: "bob".into(),
                    delivered: 3,
                    read: 3
                }]
            );
        }
        _ => unreachable!(),
    }
    let (_, v) = b.get("/api/rooms", Some(&tb)).await;
    assert_eq!(v["rooms"][0]["unread"], 1);
    assert_eq!(v["rooms"][0]["read"], 3);
    // Alice's view: bob's one message is unread for her.
    let (_, v) = b.get("/api/rooms", Some(&ta)).await;
    assert_eq!(v["rooms"][0]["unread"], 1);
    // A DM makes both parties members of the DM room.
    a.send_dm("bob", json!("psst")).await;
    a.recv_until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let (_, v) = b.get("/api/rooms", Some(&tb)).await;
    let rooms: Vec<&str> = v["rooms"]
        .as_array()
        .expect("arr")
        .iter()
        .map(|r| r["room"].as_str().expect("room"))
        .collect();
    assert_eq!(rooms, vec!["dm:alice:bob", "team"]);
    assert_eq!(v["rooms"][0]["unread"], 1);
}

#[tokio::test]
async fn search_ranks_and_respects_privacy() {
    let b = Broker::start().await;
    let (ta, tc) = (b.user("alice").await, b.user("carol").await);
    let mut a = b.connect(&ta, Encoding::Json).await;
    a.join("kitchen").await;
    for text in [
        "apple pie recipe",
        "banana bread",
        "apple apple apple crumble with apple",
        "unrelated",
    ] {
        ack_seq(&a.publish("kitchen", json!({ "text": text })).await);
    }
    let (s, v) = b.get("/api/rooms/kitchen/search?q=apple", Some(&tc)).await;
    assert_eq!(s, 200, "{v}");
    let seqs: Vec<u64> = v["messages"]
        .as_array()
        .expect("arr")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![3, 1], "best match first");
    let (_, v) = b
        .get(
            "/api/rooms/kitchen/search?q=apple&limit=1&offset=1",
            Some(&tc),
        )
        .await;
    assert_eq!(v["messages"][0]["seq"], 1);
    // FTS and SQL metacharacters are searched as text, never as syntax.
    for q in [
        "%22",
        "apple%22%20OR%20*",
        "NEAR(apple",
        "'%3B%20DROP%20TABLE%20messages%3B--",
        "text%3Aapple",
    ] {
        let (s, v) = b
            .get(&format!("/api/rooms/kitchen/search?q={q}"), Some(&tc))
            .await;
        assert_eq!(s, 200, "{q}: {v}");
    }
    let (s, _) = b.get("/api/rooms/kitchen/search?q=", Some(&tc)).await;
    assert_eq!(s, 400);
    // Another pair's DM room is not searchable.
    let (s, _) = b
        .get("/api/rooms/dm:alice:bob/search?q=apple", Some(&tc))
        .await;
    assert_eq!(s, 403);
    let (s, _) = b.get("/api/rooms/kitchen/search?q=apple", None).await;
    assert_eq!(s, 401);
    // History still intact after the hostile queries.
    let (_, v) = b.get("/api/rooms/kitchen/messages", Some(&ta)).await;
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(4));
}

#[tokio::test]
async fn soft_delete_own_messages_only() {
    let b = Broker::start().await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut a = b.connect(&ta, Encoding::Json).await;
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    a.join("r").await;
    o.join("r").await;
    ack_seq(&a.publish("r", json!({"text": "oops typo"})).await);
    ack_seq(&a.publish("r", json!({"text": "fixed"})).await);
    // Bob cannot delete alice's message.
    let id = o.id();
    o.send(&ClientFrame::Delete {
        id,
        room: "r".into(),
        seq: 1,
    })
    .await;
    assert!(matches!(
        o.recv_until(|f| matches!(f, ServerFrame::Error { .. }))
            .await,
        ServerFrame::Error { code: 404, .. }
    ));
    let id = a.id();
    a.send(&ClientFrame::Delete {
        id,
        room: "r".into(),
        seq: 1,
    })
    .await;
    assert_eq!(
        a.recv_until(|f| matches!(f, ServerFrame::Deleted { .. }))
            .await,
        ServerFrame::Deleted {
            id,
            room: "r".into(),
            seq: 1
        }
    );
    // Members get the deletion as an entry of the room's log.
    match o
        .recv_until(|f| matches!(f, ServerFrame::Msg { kind: Some(_), .. }))
        .await
    {
        ServerFrame::Msg {
            seq, kind, target, ..
        } => assert_eq!((seq, kind, target), (3, Some(EventKind::Delete), Some(1))),
        f => panic!("{f:?}"),
    }
    let (_, v) = b.get("/api/rooms/r/messages", Some(&tb)).await;
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1));
    let (_, v) = b.get("/api/rooms/r/search?q=typo", Some(&tb)).await;
    assert_eq!(v["messages"], json!([]));
    // Replay tells a rejoining client the message is gone.
    let mut c = b.connect(&tb, Encoding::Json).await;
    let (frames, _) = c.join_since("r", Some(0)).await;
    // ...and the deletion itself is the log's third entry.
    assert!(
        matches!(
            frames.get(2),
            Some(ServerFrame::Msg {
                seq: 3,
                kind: Some(EventKind::Delete),
                target: Some(1),
                ..
            })
        ),
        "{frames:?}"
    );
    assert_eq!(
        frames[..2],
        [
            ServerFrame::Deleted {
                id: None,
                room: "r".into(),
                seq: 1
            },
            ServerFrame::Msg {
                room: "r".into(),
                seq: 2,
                from: "alice".into(),
                ts: match &frames[1] {
                    ServerFrame::Msg { ts, .. } => *ts,
                    _ => 0,
                },
                body: json!({"text": "fixed"}),
                kind: None,
                target: None,
                reply_to: None,
                mentions: vec![],
            }
        ]
    );
}

#[tokio::test]
async fn publish_api_auth_and_delivery() {
    let disabled = Broker::start().await;
    let (s, v) = disabled
        .post(
            "/api/publish",
            json!({"room": "news", "body": "x"}),
            Some("k"),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")));

    let b = Broker::start_with(|c| c.auth.api_key = Some("the-api-key-0123456789".into())).await;
    for key in [None, Some("wrong"), Some("the-api-key-012345678")] {
        let (s, v) = b
            .post("/api/publish", json!({"room": "news", "body": "x"}), key)
            .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("unauthorized")),
            "{key:?}"
        );
    }
    let key = Some("the-api-key-0123456789");
    let (s, _) = b.post("/api/publish", json!({"body": "x"}), key).await;
    assert_eq!(s, 400);
    let (s, _) = b
        .post("/api/publish", json!({"room": "bad room", "body": 1}), key)
        .await;
    assert_eq!(s, 400);
    let t = b.user("alice").await;
    let mut a = b.connect(&t, Encoding::MsgPack).await;
    a.join("news").await;
    let (s, v) = b
        .post(
            "/api/publish",
            json!({"room": "news", "body": {"text": "breaking"}, "cid": "n-1"}),
            key,
        )
        .await;
    assert_eq!(
        (s, v["seq"].as_u64(), v["recipients"].as_u64()),
        (201, Some(1), Some(1))
    );
    match a.recv().await {
        ServerFrame::Msg { from, seq, .. } => assert_eq!((from.as_str(), seq), ("server", 1)),
        f => panic!("{f:?}"),
    }
    let (s, v) = b
        .post(
            "/api/publish",
            json!({"room": "news", "body": {"text": "breaking"}, "cid": "n-1"}),
            key,
        )
        .await;
    assert_eq!(
        (s, v["seq"].as_u64()),
        (201, Some(1)),
        "API retries are idempotent too"
    );
    assert!(b.metric("shoal_auth_failures_total{node=").await >= 0.0);
}

/// A local HTTP receiver that answers 500 to the first `fail_first`
/// requests and 200 after, recording every JSON body.
async fn receiver(fail_first: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use http_body_util::BodyExt;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/push", listener.local_addr().expect("addr"));
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let g = g.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let n = {
                                let mut g = g.lock().expect("lock");
                                g.push(v);
                                g.len()
                            };
                            let status = if n <= fail_first { 500 } else { 200 };
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            ));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, got)
}

#[tokio::test]
async fn offline_dm_is_kept_and_webhook_retried() {
    let (url, got) = receiver(2).await;
    let b = Broker::start_with(|c| {
        c.rooms.offline_webhook = Some(url);
        c.rooms.webhook_backoff = std::time::Duration::from_millis(50);
    })
    .await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut a = b.connect(&ta, Encoding::Json).await;
    a.send_dm("bob", json!({"text": "are you there?"})).await;
    a.recv_until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.lock().expect("lock").len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook not retried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = json!({"user": "bob", "room": "dm:alice:bob", "seq": 1, "from": "alice", "preview": "are you there?"});
    assert_eq!(
        *got.lock().expect("lock"),
        vec![expected.clone(), expected.clone(), expected]
    );
    assert_eq!(b.metric("shoal_webhook_sent_total").await, 1.0);
    assert_eq!(b.metric("shoal_webhook_failed_attempts_total").await, 2.0);

    // Bob logs in later: the DM room shows unread, and joining with his
    // delivered watermark brings the message.
    let (_, v) = b.get("/api/rooms", Some(&tb)).await;
    assert_eq!(v["rooms"][0]["room"], "dm:alice:bob");
    assert_eq!(v["rooms"][0]["unread"], 1);
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    let since = v["rooms"][0]["delivered"].as_u64();
    let (frames, _) = o.join_since("dm:alice:bob", since).await;
    assert_eq!(
        frames.iter().filter_map(msg_seq).collect::<Vec<_>>(),
        vec![1]
    );

    // Online now: a DM reaches him live and triggers no webhook.
    a.send_dm("bob", json!("live")).await;
    assert_eq!(
        msg_seq(&o.recv_until(|f| matches!(f, ServerFrame::Msg { .. })).await),
        Some(2)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(got.lock().expect("lock").len(), 3);
}

#[tokio::test]
async fn attachments_size_type_and_privacy() {
    let b = Broker::start_with(|c| c.http.max_file_size = 64 * 1024).await;
    let (ta, tb, tc) = (
        b.user("alice").await,
        b.user("bob").await,
        b.user("carol").await,
    );
    let mut a = b.connect(&ta, Encoding::Json).await;
    let mut o = b.connect(&tb, Encoding::Json).await;
    a.join("photos").await;
    o.join("photos").await;
    let png: Vec<u8> = [
        &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a][..],
        &[0u8; 64][..],
    ]
    .concat();
    let upload = |token: &str, room: &str, ctype: &str, body: Vec<u8>| {
        b.http()
            .post(b.url(&format!("/api/files?room={room}&name=../../etc/cat.png")))
            .bearer_auth(token)
            .header("Content-Type", ctype)
            .body(body)
            .send()
    };
    let r = upload(&ta, "photos", "image/png", png.clone())
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 201);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["content_type"], "image/png");
    assert_eq!(v["name"], "etccat.png", "path parts are stripped");
    let url = v["url"].as_str().expect("url").to_string();
    // A message can reference it; members fetch it with the right headers.
    ack_seq(
        &a.publish("photos", json!({"text": "look", "file": v["id"]}))
            .await,
    );
    let r = b
        .http()
        .get(b.url(&url))
        .bearer_auth(&tb)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert!(r.headers()["content-disposition"]
        .to_str()
        .expect("str")
        .starts_with("inline; filename=\"etccat.png\""));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.bytes().await.expect("bytes").to_vec(), png);
    // Token in the query works too (for <img src>).
    let r = b
        .http()
        .get(b.url(&format!("{url}?token={tb}")))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    // Not a member: 403. No token: 401. Unknown id: 404.
    let r = b
        .http()
        .get(b.url(&url))
        .bearer_auth(&tc)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 403);
    let r = b.http().get(b.url(&url)).send().await.expect("http");
    assert_eq!(r.status().as_u16(), 401);
    let r = b
        .http()
        .get(b.url("/api/files/00000000000000000000000000000000"))
        .bearer_auth(&ta)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 404);
    // Type must match the bytes; unknown binary is refused; size is capped.
    for (ctype, body, status) in [
        ("image/jpeg", png.clone(), 415),
        ("text/html", b"<script>alert(1)</script>".to_vec(), 415),
        ("application/octet-stream", vec![0u8, 1, 2, 3], 415),
        ("text/plain", vec![b'a'; 70 * 1024], 413),
        ("text/plain", b"notes".to_vec(), 201),
    ] {
        let r = upload(&ta, "photos", ctype, body).await.expect("http");
        assert_eq!(r.status().as_u16(), status, "{ctype}");
        let v: Value = r.json().await.expect("json");
        if status != 201 {
            assert!(v["error"].is_string(), "{v}");
        }
    }
    // Carol is not a member of the room, nor a party of the DM.
    let r = upload(&tc, "photos", "image/png", png.clone())
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 403);
    let r = upload(&tc, "dm:alice:bob", "image/png", png.clone())
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 403);
    let r = upload(&ta, "dm:alice:bob", "image/png", png)
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 201);
    let v: Value = r.json().await.expect("json");
    let r = b
        .http()
        .get(b.url(v["url"].as_str().expect("url")))
        .bearer_auth(&tb)
        .send()
        .await
        .expect("http");
    assert_eq!(
        r.status().as_u16(),
        200,
        "the other party may fetch a DM file"
    );
}

#[tokio::test]
async fn a_mention_of_an_offline_member_calls_the_webhook_like_a_dm() {
    let (url, got) = receiver(0).await;
    let b = Broker::start_with(|c| {
        c.rooms.offline_webhook = Some(url);
    })
    .await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let _ = b.user("carol").await;
    // Bob is a member of the room, then goes offline.
    let mut o = b.connect(&tb, Encoding::Json).await;
    o.join("team").await;
    drop(o);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut a = b.connect(&ta, Encoding::Json).await;
    a.join("team").await;
    // carol is not a member: no mention, no call; alice never hears of herself.
    match a
        .publish("team", json!({"text": "@bob @carol @alice look"}))
        .await
    {
        ServerFrame::Ack { .. } => {}
        f => panic!("{f:?}"),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.lock().expect("lock").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no webhook call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *got.lock().expect("lock"),
        vec![
            json!({"user": "bob", "room": "team", "seq": 1, "from": "alice", "preview": "@bob @carol @alice look"})
        ]
    );
    let (_, v) = b.get("/api/rooms", Some(&tb)).await;
    assert_eq!(
        (
            v["rooms"][0]["unread"].as_u64(),
            v["rooms"][0]["mentions"].as_u64()
        ),
        (Some(1), Some(1))
    );
}
