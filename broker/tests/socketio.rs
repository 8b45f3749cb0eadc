//! Socket.IO clients (the stock socket.io-client 4.8 in Node, driven by
//! `web-tests/sio-agent.mjs`) against real brokers: every transport and
//! both parsers, authentication and revocation, the event vocabulary,
//! mixed rooms with native clients, recovery after a broker restart,
//! hostile packets, and two nodes behind nginx with long-polling only.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use shoal_proto::{Encoding, ServerFrame};

fn url(e: &impl Endpoint) -> String {
    format!("http://{}", e.addr())
}

async fn lenient() -> Broker {
    Broker::start_with(|c| {
        c.conn.rate_limit = 100_000.0;
        c.conn.rate_burst = 100_000.0;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_and_parser_joins_publishes_and_receives() {
    let b = lenient().await;
    let mut agent = SioAgent::start().await;
    let t = token_for("alice");
    let cases = [
        ("poll", json!(["polling"]), "json", "polling"),
        ("ws", json!(["websocket"]), "json", "websocket"),
        (
            "upgrade",
            json!(["polling", "websocket"]),
            "json",
            "websocket",
        ),
        ("mp-poll", json!(["polling"]), "msgpack", "polling"),
        (
            "mp-upgrade",
            json!(["polling", "websocket"]),
            "msgpack",
            "websocket",
        ),
    ];
    let mut seq = 0;
    for (name, transports, parser, want) in cases {
        let path = if parser == "msgpack" {
            "/socket.io-msgpack"
        } else {
            "/socket.io"
        };
        let r = agent
            .connect(
                name,
                &url(&b),
                &t,
                json!({"transports": transports, "parser": parser, "path": path}),
            )
            .await;
        assert_eq!(r["ok"], json!(true), "{name}: {r}");
        let hello = agent.events(name, "hello", 1, 5000).await;
        assert_eq!(hello[0][1]["user"], json!("alice"), "{name}");
        let joined = agent.ask(name, "join", json!(["lobby"])).await;
        assert_eq!(joined, json!({"room": "lobby", "seq": seq}), "{name}");
        let ack = agent
            .ask(name, "pub", json!(["lobby", {"text": name}]))
            .await;
        seq += 1;
        assert_eq!(ack["seq"], json!(seq), "{name}: {ack}");
        assert_eq!(ack["room"], json!("lobby"));
        assert!(ack["ts"].as_u64().is_some());
        let msg = agent.events(name, "msg", 1, 5000).await;
        assert_eq!(msg[0][1]["seq"], json!(seq), "{name}");
        assert_eq!(msg[0][1]["body"], json!({"text": name}));
        assert_eq!(msg[0][1]["from"], json!("alice"));
        // The upgrade happens in the background after the first poll.
        let mut transport = Value::Null;
        for _ in 0..100 {
            transport = agent.status(name).await["transport"].clone();
            if transport == json!(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(transport, json!(want), "{name}");
        // After the upgrade it still works.
        let ack = agent
            .ask(name, "send_message", json!(["lobby", "again"]))
            .await;
        seq += 1;
        assert_eq!(ack["seq"], json!(seq), "{name}: {ack}");
        agent.close(name).await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_logout_disconnects_sockets() {
    let b = Broker::start().await;
    let mut agent = SioAgent::start().await;
    let u = url(&b);
    for (name, token) in [
        ("none", ""),
        ("garbage", "x.y.z"),
        ("forged", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJldmUifQ.c2ln"),
    ] {
        let r = agent
            .connect(name, &u, token, json!({"transports": ["websocket"]}))
            .await;
        assert!(r["error"].is_string(), "{name} refused: {r}");
        assert!(r.get("ok").is_none());
    }
    let failures: f64 = b
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("shoal_auth_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures >= 3.0, "{failures} auth failures counted");
    // An old client's token in the query string.
    let alice = b.user("alice").await;
    let r = agent
        .call(json!({"op": "connect", "as": "q", "url": u, "query": {"token": alice}, "transports": ["polling"]}))
        .await;
    assert_eq!(r["ok"], json!(true), "{r}");
    // Logout revokes the token: its live sockets get `close` 4002 (do not
    // reconnect) and are disconnected; the token is refused afterwards.
    let r = agent
        .connect("live", &u, &alice, json!({"transports": ["websocket"]}))
        .await;
    assert_eq!(r["ok"], json!(true), "{r}");
    let (s, v) = b.post("/api/logout", json!({}), Some(&alice)).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["closed_connections"].as_u64() >= Some(2), "{v}");
    for name in ["live", "q"] {
        let close = agent.events(name, "close", 1, 5000).await;
        assert_eq!(close.len(), 1, "{name} told why");
        assert_eq!(close[0][1]["code"], json!(4002));
        assert_eq!(close[0][1]["reconnect"], json!(false));
        let d = agent.call(json!({"op": "disconnected", "as": name})).await;
        assert_eq!(d["reason"], json!("io server disconnect"), "{name}: {d}");
    }
    let r = agent
        .connect("again", &u, &alice, json!({"transports": ["websocket"]}))
        .await;
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("revoked")),
        "{r}"
    );
    bystander_served(&b).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_room_sees_one_order_with_the_same_seqs() {
    let b = lenient().await;
    let (sam, nat) = (b.user("sam").await, b.user("nat").await);
    let mut agent = SioAgent::start().await;
    let r = agent.connect("sio", &url(&b), &sam, json!({})).await;
    assert_eq!(r["ok"], json!(true));
    assert_eq!(
        agent.ask("sio", "join", json!([{"room": "mixed"}])).await["seq"],
        json!(0)
    );
    let mut native = b.connect(&nat, Encoding::MsgPack).await;
    native.join("mixed").await;
    // Both publish, interleaved and without waiting for acks.
    let n = 40;
    for i in 0..n {
        if i % 2 == 0 {
            agent
                .tell("sio", "pub", json!(["mixed", format!("s{i}")]))
                .await;
        } else {
            native
                .send(&shoal_proto::ClientFrame::Pub {
                    id: None,
                    room: Some("mixed".into()),
                    to: None,
                    cid: None,
                    body: json!(format!("n{i}")),
                    reply_to: None,
                })
                .await;
        }
    }
    let mut from_native = vec![];
    while from_native.len() < n {
        if let ServerFrame::Msg { seq, body, .. } = native.recv().await {
            from_native.push((seq, body));
        }
    }
    let events = agent.events("sio", "msg", n, 10_000).await;
    let from_sio: Vec<(u64, Value)> = events
        .iter()
        .map(|e| (e[1]["seq"].as_u64().unwrap_or(0), e[1]["body"].clone()))
        .collect();
    assert_eq!(
        from_sio, from_native,
        "same messages, same seqs, same order"
    );
    let seqs: Vec<u64> = from_native.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    // A native DM reaches the Socket.IO client's user too.
    native.send_dm("sam", json!("psst")).await;
    let dm = agent.events("sio", "msg", 1, 5000).await;
    assert_eq!(dm[0][1]["room"], json!("dm:nat:sam"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_presence_receipts_members_history_and_delete() {
    let b = lenient().await;
    let mut agent = SioAgent::start().await;
    let u = url(&b);
    for who in ["ann", "bob"] {
        let r = agent.connect(who, &u, &token_for(who), json!({})).await;
        assert_eq!(r["ok"], json!(true));
    }
    agent.ask("ann", "join", json!(["team"])).await;
    agent.ask("bob", "join", json!(["team"])).await;
    let p = agent.events("ann", "presence", 1, 5000).await;
    assert_eq!(
        p[0][1],
        json!({"room": "team", "user": "bob", "online": true})
    );
    assert_eq!(agent.ask("bob", "typing", json!(["team"])).await, json!({}));
    let t = agent.events("ann", "typing", 1, 5000).await;
    assert_eq!(t[0][1], json!({"room": "team", "user": "bob"}));
    // Too soon again: refused through the ack.
    let again = agent.ask("bob", "typing", json!(["team"])).await;
    assert_eq!(again["error"]["code"], json!(429), "{again}");
    for i in 0..3 {
        let a = agent
            .ask("ann", "pub", json!(["team", format!("m{i}")]))
            .await;
        assert_eq!(a["seq"], json!(i + 1));
    }
    assert_eq!(agent.events("bob", "msg", 3, 5000).await.len(), 3);
    assert_eq!(
        agent.ask("bob", "mark", json!(["team", 3, "read"])).await,
        json!({})
    );
    let m = agent.events("ann", "mark", 1, 5000).await;
    assert_eq!(
        m[0][1],
        json!({"room": "team", "user": "bob", "seq": 3, "state": "read"})
    );
    let members = agent.ask("ann", "members", json!(["team"])).await;
    assert_eq!(members["users"], json!(["ann", "bob"]));
    assert_eq!(members["receipts"][0]["read"], json!(3));
    let h = agent
        .ask("bob", "history", json!([{"room": "team", "limit": 2}]))
        .await;
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(h["more"], json!(true));
    assert_eq!(h["messages"][0]["seq"], json!(3));
    let d = agent.ask("ann", "delete", json!(["team", 2])).await;
    assert_eq!(d, json!({"room": "team", "seq": 2}));
    // Members get the deletion as the room log's next entry.
    let del = agent.events("bob", "msg", 1, 5000).await;
    assert_eq!(
        (&del[0][1]["seq"], &del[0][1]["kind"], &del[0][1]["target"]),
        (&json!(4), &json!("delete"), &json!(2))
    );
    // Someone else's message cannot be deleted.
    let d = agent.ask("bob", "delete", json!(["team", 1])).await;
    assert_eq!(d["error"]["code"], json!(404), "{d}");
    // Chat events as events: an edit, a reaction, a reply and its thread.
    let e = agent
        .ask("ann", "edit", json!(["team", 1, "m0, edited"]))
        .await;
    assert_eq!(e["seq"], json!(5), "{e}");
    let r = agent.ask("bob", "react", json!(["team", 1, "👍"])).await;
    assert_eq!(r["seq"], json!(6), "{r}");
    let q = agent
        .ask(
            "bob",
            "pub",
            json!([{"room": "team", "body": "re", "reply_to": 1}]),
        )
        .await;
    assert_eq!(q["seq"], json!(7), "{q}");
    // Ann has not read her room's entries yet: her three messages first.
    let got = agent.events("ann", "msg", 7, 5000).await;
    let got = &got[3..];
    let kinds: Vec<_> = got.iter().map(|e| e[1]["kind"].clone()).collect();
    assert_eq!(
        kinds,
        [json!("delete"), json!("edit"), json!("react"), Value::Null]
    );
    assert_eq!(got[3][1]["reply_to"]["seq"], json!(1));
    let t = agent.ask("ann", "thread", json!(["team", 1])).await;
    assert_eq!(t["messages"][0]["seq"], json!(7), "{t}");
    let h = agent
        .ask("bob", "history", json!([{"room": "team", "limit": 5}]))
        .await;
    let first = h["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["seq"] == 1))
        .cloned();
    assert_eq!(
        first.as_ref().map(|m| m["body"].clone()),
        Some(json!("m0, edited"))
    );
    assert_eq!(
        first.map(|m| m["reactions"][0]["me"].clone()),
        Some(json!(true))
    );
    // Without an ack callback, replies are events, as on /ws.
    agent.tell("bob", "ping", json!([])).await;
    assert_eq!(agent.events("bob", "pong", 1, 5000).await.len(), 1);
    agent.tell("bob", "leave", json!(["nowhere"])).await;
    let e = agent.events("bob", "error", 1, 5000).await;
    assert_eq!(e[0][1]["code"], json!(404));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_shoal_namespaces() {
    let b = lenient().await;
    let mut agent = SioAgent::start().await;
    let u = url(&b);
    let r = agent
        .connect("chat", &u, &token_for("cat"), json!({"ns": "/chat"}))
        .await;
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(
        agent.ask("chat", "join", json!(["general"])).await,
        json!({"room": "general", "seq": 0})
    );
    let mut native = b.connect(&token_for("nat"), Encoding::Json).await;
    native.join("chat:general").await;
    let a = agent.ask("chat", "pub", json!(["general", "hi"])).await;
    assert_eq!(a["room"], json!("general"));
    match native.recv().await {
        ServerFrame::Msg { room, seq, .. } => assert_eq!((room.as_str(), seq), ("chat:general", 1)),
        other => panic!("expected msg, got {other:?}"),
    }
    let m = agent.events("chat", "msg", 1, 5000).await;
    assert_eq!(m[0][1]["room"], json!("general"));
    for bad in ["/dm", "/a.b:c"] {
        let r = agent
            .connect("x", &u, &token_for("cat"), json!({"ns": bad}))
            .await;
        assert!(
            r["error"].as_str().is_some_and(|e| e.contains("namespace")),
            "{bad}: {r}"
        );
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_across_a_broker_restart_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = ["--rate-limit", "100000", "--rate-burst", "100000"];
    let mut p = Proc::start(dir.path(), &extra).await;
    let addr = p.addr;
    let mut agent = SioAgent::start().await;
    let r = agent
        .connect(
            "sub",
            &url(&p),
            &token_for("sub"),
            json!({"transports": ["websocket"]}),
        )
        .await;
    assert_eq!(r["ok"], json!(true));
    agent.ask("sub", "join", json!(["durable", 0])).await;
    publish(&p, 1, 20).await;
    assert_eq!(
        event_seqs(&agent.events("sub", "msg", 20, 10_000).await),
        (1..=20).collect::<Vec<_>>()
    );
    // Crash, then more messages while the client is away.
    p.kill9();
    let p = Proc::start_at(addr, dir.path(), &extra).await;
    publish(&p, 21, 40).await;
    // The client reconnects by itself (transport closed) and re-joins with
    // since = 20: it gets 21..40 exactly once, in order.
    let got = event_seqs(&agent.events("sub", "msg", 20, 15_000).await);
    assert_eq!(got, (21..=40).collect::<Vec<_>>());
    let st = agent.status("sub").await;
    assert_eq!(st["rejoins"], json!(1), "{st}");
    // Live messages continue after the replay; nothing else arrived.
    publish(&p, 41, 41).await;
    assert_eq!(
        event_seqs(&agent.events("sub", "msg", 2, 2000).await),
        vec![41]
    );
}

/// A native client publishes `from..=to` to `durable`, each acked with
/// its expected seq.
async fn publish(p: &Proc, from: u64, to: u64) {
    let mut c = p.connect(&token_for("pub"), Encoding::Json).await;
    c.join("durable").await;
    for i in from..=to {
        let ack = c.publish("durable", json!(i)).await;
        assert!(
            matches!(ack, ServerFrame::Ack { seq, .. } if seq == i),
            "{ack:?}"
        );
    }
}

/// One engine.io session opened by hand over long-polling, connected to
/// the main namespace: its sid.
async fn polling_session(b: &Broker, token: &str) -> String {
    let r = b
        .http
        .get(format!("{}/socket.io/?EIO=4&transport=polling", url(b)))
        .send()
        .await
        .expect("handshake");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("open packet");
    let open: Value = serde_json::from_str(text.trim_start_matches('0')).expect("open json");
    let sid = open["sid"].as_str().expect("sid").to_string();
    post(b, &sid, &format!("40{{\"token\":\"{token}\"}}")).await;
    let connect = next_packet(b, &sid, "40").await;
    assert!(connect.is_some(), "connected");
    sid
}

async fn post(b: &Broker, sid: &str, body: &str) -> u16 {
    b.http
        .post(format!(
            "{}/socket.io/?EIO=4&transport=polling&sid={sid}",
            url(b)
        ))
        .body(body.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Poll until a packet starting with `prefix` arrives (answering pings);
/// None if the session ends or nothing comes within 5 s.
async fn next_packet(b: &Broker, sid: &str, prefix: &str) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let r = b
            .http
            .get(format!(
                "{}/socket.io/?EIO=4&transport=polling&sid={sid}",
                url(b)
            ))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        let text = r.text().await.ok()?;
        for packet in text.split('\u{1e}') {
            if packet == "2" {
                post(b, sid, "3").await;
            } else if packet == "1" {
                return None;
            } else if packet.starts_with(prefix) {
                return Some(packet.to_string());
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_packets_get_errors_not_crashes() {
    let b = Broker::start_with(|c| c.conn.max_message_size = 4096).await;
    let t = token_for("mallory");
    // Events the vocabulary does not know, or whose arguments are wrong:
    // error 400 through the ack.
    let sid = polling_session(&b, &t).await;
    for (packet, want) in [
        ("421[\"nope\"]", "unknown event"),
        ("422[\"join\",1,2,3]", "takes at most"),
        ("423[\"pub\",\"r\"]", "missing field"),
        ("424[\"join\",{\"room\":\"a b\"}]", "room"),
        ("425[\"pub\",\"r\",1,2,3,4,5,6,7,8]", "arguments"),
    ] {
        assert_eq!(post(&b, &sid, packet).await, 200, "{packet}");
        let reply = next_packet(&b, &sid, "43").await.unwrap_or_default();
        assert!(
            reply.contains("\"code\":400") && reply.contains(want),
            "{packet}: {reply}"
        );
    }
    // A body over the limit (in JSON) is refused with 413 before a seq.
    post(&b, &sid, "426[\"join\",\"big\"]").await;
    let joined = next_packet(&b, &sid, "43").await.unwrap_or_default();
    assert!(joined.contains("\"seq\":0"), "{joined}");
    let big = "x".repeat(3000);
    let body = format!("427[\"pub\",\"big\",[\"{big}\",\"{big}\"]]");
    let status = post(&b, &sid, &body).await;
    let reply = next_packet(&b, &sid, "43").await.unwrap_or_default();
    assert!(
        status != 200 || reply.contains("\"code\":413"),
        "oversized: {status} {reply}"
    );
    // Malformed packets: the session may be dropped, the broker stays up.
    for junk in [
        "4",
        "42[",
        "42[\"pub\"",
        "4x",
        "\u{0}\u{1}",
        "451-[\"a\",{\"_placeholder\":true,\"num\":0}]",
    ] {
        let sid = polling_session(&b, &t).await;
        let _ = post(&b, &sid, junk).await;
        let _ = next_packet(&b, &sid, "4").await;
    }
    // Nothing accepted was lost: the room has exactly its one message.
    let mut agent = SioAgent::start().await;
    let r = agent.connect("ok", &url(&b), &t, json!({})).await;
    assert_eq!(r["ok"], json!(true));
    let h = agent.ask("ok", "join", json!(["big", 0])).await;
    assert_eq!(h["seq"], json!(0), "the oversized message got no seq: {h}");
    let a = agent.ask("ok", "pub", json!(["big", "fits"])).await;
    assert_eq!(a["seq"], json!(1), "{a}");
    // A request flood past the rate limit is refused with 429.
    let flood = Broker::start_with(|c| {
        c.conn.rate_limit = 5.0;
        c.conn.rate_burst = 5.0;
        c.conn.rate_strikes = 1000;
    })
    .await;
    let r = agent.connect("flood", &url(&flood), &t, json!({})).await;
    assert_eq!(r["ok"], json!(true));
    let mut refused = 0;
    for _ in 0..20 {
        let a = agent.ask("flood", "ping", json!([])).await;
        if a["error"]["code"] == json!(429) {
            refused += 1;
        }
    }
    assert!(refused >= 10, "{refused} of 20 pings refused");
    assert!(
        flood
            .metric("shoal_rate_limited_total{kind=\"frame\"")
            .await
            >= 10.0
    );
    bystander_served(&b).await;
    bystander_served(&flood).await;
    flood.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_nginx_with_long_polling_deliver_once_in_order() {
    let redis = Redis::start().await;
    let mk = || {
        let url = redis.url();
        Broker::start_with(move |c| {
            c.cluster.bus = shoal_broker::config::BusKind::Redis;
            c.cluster.redis_url = Some(url.parse().expect("redis url"));
            c.cluster.redis_timeout = Duration::from_millis(500);
            c.conn.rate_limit = 100_000.0;
            c.conn.rate_burst = 100_000.0;
        })
    };
    let (a, b) = (mk().await, mk().await);
    a.health_becomes(200).await;
    b.health_becomes(200).await;
    let nginx = Nginx::start(&[a.addr, b.addr]).await;
    let mut agent = SioAgent::start_insecure().await;
    let front = format!("https://localhost:{}", nginx.port);
    // Clients spread over both nodes by their sticky key.
    let names: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for n in &names {
        let r = agent
            .connect(
                n,
                &front,
                &token_for(n),
                json!({"transports": ["polling"], "query": {"shoal_sid": n}, "insecure": true}),
            )
            .await;
        assert_eq!(r["ok"], json!(true), "{n}: {r}");
        let j = agent.ask(n, "join", json!(["wide"])).await;
        assert!(j["seq"].is_u64(), "{n}: {j}");
    }
    let mut nodes = std::collections::BTreeSet::new();
    for n in &names {
        let hello = agent.events(n, "hello", 1, 5000).await;
        nodes.insert(hello[0][1]["node"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(nodes.len(), 2, "clients on both nodes: {nodes:?}");
    let per = 10;
    for n in &names {
        for i in 0..per {
            agent
                .tell(n, "pub", json!(["wide", format!("{n}-{i}")]))
                .await;
        }
    }
    let total = names.len() * per;
    let mut orders = vec![];
    for n in &names {
        let ev = agent.events(n, "msg", total, 20_000).await;
        let seqs = event_seqs(&ev);
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "{n}: every message once, in order"
        );
        orders.push(ev.iter().map(|e| e[1]["body"].clone()).collect::<Vec<_>>());
        let st = agent.status(n).await;
        assert_eq!(st["transport"], json!("polling"));
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "one order on both nodes"
    );
    drop(nginx);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_are_admitted_like_websockets() {
    // --max-connections counts Socket.IO sockets too.
    let b = Broker::start_with(|c| c.conn.max_connections = 1).await;
    let mut agent = SioAgent::start().await;
    let u = url(&b);
    let t = token_for("ada");
    assert_eq!(
        agent.connect("one", &u, &t, json!({})).await["ok"],
        json!(true)
    );
    let r = agent.connect("two", &u, &t, json!({})).await;
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection limit")),
        "{r}"
    );
    // A socket that leaves gives its place back.
    agent.close("one").await;
    let mut admitted = false;
    for i in 0..50 {
        if agent.connect(&format!("three{i}"), &u, &t, json!({})).await["ok"] == json!(true) {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the freed place is taken");
    b.stop().await;
    // The handshake rate (reconnection storms) too.
    let b = Broker::start_with(|c| c.conn.handshake_rate = 1.0).await;
    let u = url(&b);
    assert_eq!(
        agent.connect("first", &u, &t, json!({})).await["ok"],
        json!(true)
    );
    let r = agent.connect("storm", &u, &t, json!({})).await;
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("retry later")),
        "{r}"
    );
    assert!(
        b.metric("shoal_rate_limited_total{kind=\"handshake\"")
            .await
            >= 1.0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_polling_is_a_slow_consumer_and_costs_nobody_else() {
    let b = Broker::start_with(|c| {
        c.conn.outbound_queue = 16;
        c.conn.rate_limit = 100_000.0;
        c.conn.rate_burst = 100_000.0;
    })
    .await;
    // A long-polling socket joins, then never polls again.
    let sid = polling_session(&b, &token_for("sloth")).await;
    post(&b, &sid, "420[\"join\",\"firehose\"]").await;
    assert!(next_packet(&b, &sid, "430").await.is_some(), "joined");
    let mut agent = SioAgent::start().await;
    let r = agent
        .connect("fast", &url(&b), &token_for("fast"), json!({}))
        .await;
    assert_eq!(r["ok"], json!(true));
    agent.ask("fast", "join", json!(["firehose"])).await;
    let mut publisher = b.connect(&token_for("pub"), Encoding::MsgPack).await;
    publisher.join("firehose").await;
    for i in 1..=100u64 {
        let ack = publisher.publish("firehose", json!(i)).await;
        assert!(
            matches!(ack, ServerFrame::Ack { seq, .. } if seq == i),
            "{ack:?}"
        );
    }
    // The reader that keeps up got everything, in order.
    let got = event_seqs(&agent.events("fast", "msg", 100, 10_000).await);
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    // The one that stopped reading was closed as a slow consumer, never
    // skipped past a message it still holds.
    let mut closed = 0.0;
    for _ in 0..50 {
        closed = b
            .metric("shoal_closes_total{reason=\"slow_consumer\"")
            .await;
        if closed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(closed, 1.0, "one slow consumer");
    // Its queue held at most --outbound-queue messages, then it ended.
    let mut seqs = vec![];
    loop {
        let r = b
            .http
            .get(format!(
                "{}/socket.io/?EIO=4&transport=polling&sid={sid}",
                url(&b)
            ))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let Ok(r) = r else { break };
        if r.status() != 200 {
            break;
        }
        let text = r.text().await.unwrap_or_default();
        let mut ended = false;
        for p in text.split('\u{1e}') {
            if let Some(rest) = p.strip_prefix("42") {
                if let Ok(v) = serde_json::from_str::<Value>(rest) {
                    if v[0] == "msg" {
                        seqs.push(v[1]["seq"].as_u64().unwrap_or(0));
                    }
                }
            }
            ended |= p == "1" || p.starts_with("41");
        }
        if ended {
            break;
        }
    }
    assert!(seqs.len() <= 16, "{} queued", seqs.len());
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "a prefix, in order"
    );
    bystander_served(&b).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_rooms_and_moderation_over_socketio() {
    let b = lenient().await;
    let mut agent = SioAgent::start().await;
    let u = url(&b);
    for who in ["ann", "sue"] {
        let r = agent.connect(who, &u, &token_for(who), json!({})).await;
        assert_eq!(r["ok"], json!(true));
    }
    let c = agent
        .ask("ann", "create", json!([{"room": "vault", "private": true}]))
        .await;
    assert_eq!(c["seq"], json!(1), "{c}");
    let j = agent.ask("sue", "join", json!(["vault"])).await;
    assert_eq!(j["error"]["code"], json!(403), "{j}");
    let i = agent
        .ask("ann", "moderate", json!(["vault", "invite", "sue"]))
        .await;
    assert_eq!(i["seq"], json!(2), "{i}");
    agent.ask("ann", "join", json!(["vault"])).await;
    let j = agent.ask("sue", "join", json!(["vault"])).await;
    assert!(j.get("error").is_none(), "{j}");
    let k = agent
        .ask(
            "ann",
            "moderate",
            json!([{"room": "vault", "action": "kick", "user": "sue", "reason": "test"}]),
        )
        .await;
    assert_eq!(k["seq"], json!(3), "{k}");
    let left = agent.events("sue", "left", 1, 5000).await;
    assert_eq!(left[0][1], json!({"room": "vault", "reason": "kick"}));
    let p = agent.ask("sue", "pub", json!(["vault", "hello?"])).await;
    assert_eq!(p["error"]["code"], json!(403), "{p}");
}
