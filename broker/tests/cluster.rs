//! Several brokers sharing rooms through a real redis-server (`--bus
//! redis`), on loopback ports from temp dirs.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use serde_json::json;
use shoal_broker::Config;
use shoal_proto::{ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame};

async fn node(redis: &Redis) -> Broker {
    node_at(redis.url()).await
}

/// A node whose bus is the Redis at `url`.
async fn node_at(url: String) -> Broker {
    node_with(url, |_| {}).await
}

/// A node whose bus is the Redis (or Redis Cluster) at `url`, with the
/// tests' settings and then `f`'s.
async fn node_with(url: String, f: impl FnOnce(&mut Config)) -> Broker {
    if let Ok(f) = std::env::var("SHOAL_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(f).try_init();
    }
    Broker::start_with(move |c| {
        c.cluster.bus = shoal_broker::config::BusKind::Redis;
        c.cluster.redis_url = Some(url.parse().expect("redis url"));
        c.cluster.redis_timeout = std::time::Duration::from_millis(500);
        c.cluster.presence_lease = std::time::Duration::from_millis(1000);
        c.cluster.bus_down_grace = std::time::Duration::from_millis(1000);
        // Tests pipeline hundreds of publishes from one connection.
        c.conn.rate_limit = 100_000.0;
        c.conn.rate_burst = 100_000.0;
        f(c);
    })
    .await
}

/// Two nodes on `redis`, both healthy.
async fn two_nodes(redis: &Redis) -> (Broker, Broker) {
    two_nodes_with(redis.url(), |_| {}).await
}

/// Two nodes on the Redis at `url` with `f`'s settings, both healthy.
async fn two_nodes_with(url: String, f: impl Fn(&mut Config) + Copy) -> (Broker, Broker) {
    let (a, b) = (node_with(url.clone(), f).await, node_with(url, f).await);
    a.health_becomes(200).await;
    b.health_becomes(200).await;
    (a, b)
}

/// Read `msg` frames of `room` until `n` distinct seqs; (seq -> (from, body)).
async fn collect(c: &mut Client, n: usize) -> (Vec<u64>, BTreeMap<u64, (String, String)>) {
    let mut order = vec![];
    let mut seen = BTreeMap::new();
    while seen.len() < n {
        match c.try_recv(Duration::from_secs(10)).await {
            Ok(ServerFrame::Msg {
                seq, from, body, ..
            }) => {
                order.push(seq);
                seen.insert(seq, (from, body.to_string()));
            }
            Ok(_) => {}
            Err(e) => panic!("after {} messages: {e:?}", seen.len()),
        }
    }
    (order, seen)
}

/// `user` connects to both nodes, joins `r` on both, and publishes `n`
/// messages alternating between them; (acked, refused by the rate limit).
async fn publish_on_both(a: &Broker, b: &Broker, user: &str, n: u64) -> (u64, u64) {
    let token = token_for(user);
    let mut on_a = a.connect(&token, Encoding::Json).await;
    let mut on_b = b.connect(&token, Encoding::Json).await;
    on_a.join("r").await;
    on_b.join("r").await;
    let (mut acked, mut limited) = (0, 0);
    for k in 0..n {
        let c = if k % 2 == 0 { &mut on_a } else { &mut on_b };
        match c.publish("r", json!(k)).await {
            ServerFrame::Ack { .. } => acked += 1,
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, ErrorCode::RateLimited as u16);
                limited += 1;
            }
            f => panic!("{f:?}"),
        }
    }
    (acked, limited)
}

#[tokio::test]
async fn nodes_share_rooms_in_one_order() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::MsgPack).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    let mut carol = a.connect(&token_for("carol"), Encoding::Json).await;
    let mut pubs = vec![
        a.connect(&token_for("p1"), Encoding::MsgPack).await,
        b.connect(&token_for("p2"), Encoding::MsgPack).await,
    ];
    for c in [&mut alice, &mut bob, &mut carol] {
        c.join("lobby").await;
    }
    for p in pubs.iter_mut() {
        p.join("lobby").await;
    }

    // Two publishers on two nodes, pipelined, at the same time.
    const EACH: u64 = 150;
    let senders = pubs.into_iter().enumerate().map(|(i, mut p)| {
        tokio::spawn(async move {
            for k in 0..EACH {
                p.send(&ClientFrame::Pub {
                    id: Some(k + 1),
                    room: Some("lobby".into()),
                    to: None,
                    cid: None,
                    body: json!({"p": i, "k": k}),
                    reply_to: None,
                })
                .await;
            }
            let mut acked = vec![];
            while acked.len() < EACH as usize {
                match p.recv().await {
                    ServerFrame::Ack { seq, .. } => acked.push(seq),
                    ServerFrame::Error { code, message, .. } => panic!("{code}: {message}"),
                    _ => {}
                }
            }
            acked
        })
    });
    let mut acked: Vec<u64> = vec![];
    for s in senders {
        acked.extend(s.await.expect("sender"));
    }
    acked.sort_unstable();
    let total = 2 * EACH;
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "acks cover 1..=N once"
    );

    let (oa, ma) = collect(&mut alice, total as usize).await;
    let (ob, mb) = collect(&mut bob, total as usize).await;
    let (oc, mc) = collect(&mut carol, total as usize).await;
    let want: Vec<u64> = (1..=total).collect();
    assert_eq!(oa, want, "node A delivers in seq order, no dup");
    assert_eq!(ob, want, "node B delivers in seq order, no dup");
    assert_eq!(oc, want);
    assert_eq!(ma, mb, "same message at each seq on both nodes");
    assert_eq!(ma, mc);
    // Each publisher's own messages keep their order.
    for p in 0..2 {
        let ks: Vec<String> = ma
            .values()
            .filter(|(_, body)| body.contains(&format!("\"p\":{p}")))
            .map(|(_, body)| body.clone())
            .collect();
        let expect: Vec<String> = (0..EACH)
            .map(|k| json!({"p": p, "k": k}).to_string())
            .collect();
        assert_eq!(ks, expect);
    }

    // Typing crosses nodes and is not echoed to the typist.
    bob.send(&ClientFrame::Typing {
        id: None,
        room: "lobby".into(),
    })
    .await;
    match alice
        .recv_until(|f| matches!(f, ServerFrame::Typing { .. }))
        .await
    {
        ServerFrame::Typing { user, .. } => assert_eq!(user, "bob"),
        _ => unreachable!(),
    }

    // Receipts cross nodes: alice (node A) reads up to 5, bob (node B) sees it.
    alice
        .send(&ClientFrame::Mark {
            id: Some(70),
            room: "lobby".into(),
            seq: 5,
            state: shoal_proto::MarkState::Read,
        })
        .await;
    match bob
        .recv_until(|f| matches!(f, ServerFrame::Mark { .. }))
        .await
    {
        ServerFrame::Mark { user, seq, .. } => assert_eq!((user.as_str(), seq), ("alice", 5)),
        _ => unreachable!(),
    }

    // A client joining on the other node with `since` gets the rest from
    // the hot history, then live messages.
    let mut dave = b.connect(&token_for("dave"), Encoding::Json).await;
    let (replayed, head) = dave.join_since("lobby", Some(total - 10)).await;
    let seqs: Vec<u64> = replayed.iter().filter_map(msg_seq).collect();
    assert_eq!(head, total);
    assert_eq!(seqs, ((total - 9)..=total).collect::<Vec<_>>());

    // A retried cid on the other node gets the original seq.
    let first = alice.publish_cid("lobby", Some("once"), json!("x")).await;
    let again = dave.publish_cid("lobby", Some("once"), json!("x")).await;
    assert!(matches!(first, ServerFrame::Ack { seq, .. } if seq == total + 1));
    assert!(
        matches!(again, ServerFrame::Ack { seq, .. } if seq == total + 2),
        "cids are per user: dave's `once` is a new message: {again:?}"
    );
    let alice_again = alice.publish_cid("lobby", Some("once"), json!("x")).await;
    assert!(matches!(alice_again, ServerFrame::Ack { seq, .. } if seq == total + 1));

    assert!(a.metric("shoal_redis_subscriptions{").await >= 1.0);
    assert!(a.metric("shoal_redis_command_seconds_count{").await > 0.0);
    assert!(a.metric("shoal_redis_pipeline_depth_count{").await > 0.0);
    assert_eq!(a.metric("shoal_bus_up{").await, 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redis_restart_gives_503_then_recovers_without_loss() {
    let mut redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    alice.join("r").await;
    bob.join("r").await;
    let mut acked = vec![];
    for i in 0..20 {
        match alice.publish("r", json!(i)).await {
            ServerFrame::Ack { seq, .. } => acked.push(seq),
            f => panic!("{f:?}"),
        }
    }
    let (before, _) = collect(&mut bob, 20).await;

    redis.stop();
    let v = a.health_becomes(503).await;
    assert_eq!(v["bus"], "down");
    assert_eq!(a.metric("shoal_bus_up{").await, 0.0);
    b.health_becomes(503).await;
    // Publishes during the outage are refused, never silently dropped.
    match alice.publish("r", json!("lost?")).await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Unavailable as u16),
        f => panic!("expected error 503, got {f:?}"),
    }
    // Connections stay up meanwhile.
    bob.send(&ClientFrame::Ping { id: Some(77) }).await;
    assert!(matches!(
        bob.recv_until(|f| matches!(f, ServerFrame::Pong { .. }))
            .await,
        ServerFrame::Pong { id: Some(77) }
    ));

    redis.restart().await;
    a.health_becomes(200).await;
    b.health_becomes(200).await;
    for i in 20..40 {
        match alice.publish("r", json!(i)).await {
            ServerFrame::Ack { seq, .. } => acked.push(seq),
            f => panic!("{f:?}"),
        }
    }
    assert_eq!(
        acked,
        (1..=40).collect::<Vec<_>>(),
        "seqs continue after the restart"
    );
    let (after, _) = collect(&mut bob, 20).await;
    let order: Vec<u64> = before.into_iter().chain(after).collect();
    assert_eq!(
        order,
        (1..=40).collect::<Vec<_>>(),
        "bob has every acked message once"
    );
    assert!(b.metric("shoal_redis_reconnects_total{").await >= 1.0);
    assert!(a.metric("shoal_errors_total{code=\"unavailable\"").await >= 1.0);
    assert!(a.metric("shoal_redis_errors_total{").await >= 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn lost_subscriptions_are_recovered_from_the_hot_history() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::MsgPack).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    alice.join("r").await;
    bob.join("r").await;
    const N: u64 = 400;
    let sender = tokio::spawn(async move {
        for k in 0..N {
            alice
                .send(&ClientFrame::Pub {
                    id: Some(k + 1),
                    room: Some("r".into()),
                    to: None,
                    cid: None,
                    body: json!(k),
                    reply_to: None,
                })
                .await;
            if k % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut acked = 0;
        while acked < N {
            match alice.recv().await {
                ServerFrame::Ack { .. } => acked += 1,
                ServerFrame::Error { code, message, .. } => panic!("{code}: {message}"),
                _ => {}
            }
        }
    });
    // Cut every subscription connection a few times while messages flow:
    // what a node misses meanwhile must come from the stream, in order.
    let mut admin = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis admin");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        // Both nodes must have reconnected from the last cut (their backoff
        // starts at 50 ms, longer on a loaded machine) before the next one.
        for _ in 0..200 {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut admin)
                .await
                .expect("client list");
            if list.lines().count() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await
            .expect("client kill");
        assert!(killed >= 1, "subscription connections were cut");
    }
    sender.await.expect("sender");
    let (order, _) = collect(&mut bob, N as usize).await;
    assert_eq!(order, (1..=N).collect::<Vec<_>>());
    assert!(b.metric("shoal_redis_reconnects_total{").await >= 1.0);
    let filled = b.metric("shoal_bus_gap_filled_total{").await;
    assert!(
        filled >= 1.0,
        "some messages came from the hot history ({filled})"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn direct_messages_and_revocations_cross_nodes() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    let mut bob2 = a.connect(&token_for("bob"), Encoding::Json).await;
    // The user-channel subscription is asynchronous to the handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        alice.send_dm("bob", json!({ "text": i })).await;
    }
    for c in [&mut bob, &mut bob2, &mut alice] {
        let (order, msgs) = collect(c, 5).await;
        assert_eq!(
            order,
            vec![1, 2, 3, 4, 5],
            "every party connection, in order"
        );
        assert!(msgs.values().all(|(from, _)| from == "alice"));
    }
    // While carol is offline her DMs wait in the room's hot history (she
    // connected once before, on the other node: the cluster knows her).
    let carol_token = token_for("carol");
    drop(a.connect(&carol_token, Encoding::Json).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut dave = b.connect(&token_for("dave"), Encoding::Json).await;
    dave.send_dm("carol", json!("are you there?")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut carol = a.connect(&carol_token, Encoding::Json).await;
    let (replayed, head) = carol.join_since("dm:carol:dave", Some(0)).await;
    assert_eq!(head, 1);
    assert_eq!(
        replayed.iter().filter_map(msg_seq).collect::<Vec<_>>(),
        vec![1]
    );

    // Logging out on node B closes carol's connection on node A, and
    // node A refuses the token from then on.
    let (s, v) = b.post("/api/logout", json!({}), Some(&carol_token)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        carol.closed().await,
        End::Closed(Some(shoal_proto::CloseCode::TokenRevoked as u16))
    );
    let refused = a.try_connect(&carol_token, Encoding::Json).await.err();
    assert_eq!(refused.map(|e| e.0), Some(401));
    // A node that starts later learns the revocation from Redis.
    let c = node(&redis).await;
    c.health_becomes(200).await;
    let mut refused = None;
    for _ in 0..50 {
        refused = c.try_connect(&carol_token, Encoding::Json).await.err();
        if refused.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused.map(|e| e.0), Some(401));
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test]
async fn presence_is_cluster_wide_and_a_killed_node_leaves_within_its_lease() {
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = redis
        .node_proc(dir.path(), &["--presence-lease-ms", "1000"])
        .await;
    let b = node(&redis).await;
    b.health_becomes(200).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut alice_b = b.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    bob.join("room").await;
    alice.join("room").await;
    let online = |f: &ServerFrame| matches!(f, ServerFrame::Presence { user, online: true, .. } if user == "alice");
    assert!(online(
        &bob.recv_until(|f| matches!(f, ServerFrame::Presence { .. }))
            .await
    ));
    // Alice on a second node is still one presence: no second event, and
    // when she leaves there, she is still online (node A holds her).
    alice_b.join("room").await;
    alice_b
        .send(&ClientFrame::Leave {
            id: Some(9),
            room: "room".into(),
        })
        .await;
    alice_b
        .recv_until(|f| matches!(f, ServerFrame::Left { .. }))
        .await;
    bob.send(&ClientFrame::Members {
        id: Some(5),
        room: "room".into(),
    })
    .await;
    match bob
        .recv_until(|f| {
            matches!(
                f,
                ServerFrame::Members { .. } | ServerFrame::Presence { .. }
            )
        })
        .await
    {
        ServerFrame::Members { users, .. } => assert_eq!(users, vec!["alice", "bob"]),
        f => panic!("no presence change expected yet: {f:?}"),
    }

    // kill -9 node A: no leave is sent; its lease runs out and node B
    // tells bob that alice left.
    a.kill9();
    let started = std::time::Instant::now();
    match bob.try_recv(Duration::from_secs(5)).await {
        Ok(ServerFrame::Presence { user, online, .. }) => {
            assert_eq!((user.as_str(), online), ("alice", false));
        }
        other => panic!("expected alice offline, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    bob.send(&ClientFrame::Members {
        id: Some(6),
        room: "room".into(),
    })
    .await;
    match bob
        .recv_until(|f| matches!(f, ServerFrame::Members { .. }))
        .await
    {
        ServerFrame::Members { users, .. } => assert_eq!(users, vec!["bob"]),
        _ => unreachable!(),
    }
    b.stop().await;
}

#[tokio::test]
async fn a_user_publish_rate_holds_across_nodes() {
    let redis = Redis::start().await;
    let url = redis.url();
    let (a, b) = two_nodes_with(url, |c| c.cluster.user_publish_rate = 5).await;
    let (acked, limited) = publish_on_both(&a, &b, "chatty", 12).await;
    // 12 publishes fall in at most two one-second windows of 5, so a
    // shared count refuses at least 2; separate per-node counts (6 each)
    // could refuse none within one window.
    assert!(
        limited >= 2,
        "the limit is shared by both nodes: {acked} acked"
    );
    assert!((5..=10).contains(&acked), "{acked} acked");
    let counted = a.metric("shoal_rate_limited_total{kind=\"user\"").await
        + b.metric("shoal_rate_limited_total{kind=\"user\"").await;
    assert_eq!(counted, limited as f64);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_node_cut_off_from_redis_sends_its_clients_to_another_node() {
    let redis = Redis::start().await;
    let link = Partition::start(([127, 0, 0, 1], redis.port).into()).await;
    let a = node_at(format!("redis://{}", link.addr)).await;
    let b = node(&redis).await;
    a.health_becomes(200).await;
    b.health_becomes(200).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    alice.join("r").await;
    bob.join("r").await;
    for i in 0..10 {
        assert!(matches!(
            bob.publish("r", json!(i)).await,
            ServerFrame::Ack { .. }
        ));
    }
    let (seen, _) = collect(&mut alice, 10).await;
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());

    // Partition node A from Redis: packets dropped, nothing refused.
    link.set_cut(true);
    let cut_at = std::time::Instant::now();
    assert_eq!(a.health_becomes(503).await["bus"], "down");
    // A's clients are told (4006) once the 1 s grace period is over...
    match alice.closed().await {
        End::Closed(Some(c)) => assert_eq!(c, CloseCode::ClusterLost.as_u16()),
        e => panic!("expected close 4006, got {e:?}"),
    }
    let told = cut_at.elapsed();
    assert!(
        told >= Duration::from_millis(900) && told < Duration::from_secs(6),
        "told after {told:?}"
    );
    // ...and A turns new connections away, so a load balancer moves them.
    match a.try_connect(&token_for("alice"), Encoding::Json).await {
        Err((503, body)) => assert!(body.contains("unavailable"), "{body}"),
        Err(e) => panic!("expected 503, got {e:?}"),
        Ok(_) => panic!("a partitioned node accepted a connection"),
    }
    // The rest of the cluster carries on meanwhile.
    for i in 10..30 {
        assert!(matches!(
            bob.publish("r", json!(i)).await,
            ServerFrame::Ack { .. }
        ));
    }

    // Alice reconnects to B and recovers what she missed, once each.
    let mut alice = b.connect(&token_for("alice"), Encoding::Json).await;
    let (replay, _) = alice.join_since("r", Some(10)).await;
    let got: Vec<u64> = replay.iter().filter_map(msg_seq).collect();
    assert_eq!(got, (11..=30).collect::<Vec<_>>());

    // Healed, A serves again, in the same order as everyone else.
    link.set_cut(false);
    a.health_becomes(200).await;
    let mut carol = a.connect(&token_for("carol"), Encoding::Json).await;
    carol.join("r").await;
    assert!(matches!(
        bob.publish("r", json!("after")).await,
        ServerFrame::Ack { seq: 31, .. }
    ));
    let (c, _) = collect(&mut carol, 1).await;
    assert_eq!(c, vec![31]);
    let (al, _) = collect(&mut alice, 1).await;
    assert_eq!(al, vec![31]);
    assert_eq!(
        a.metric("shoal_closes_total{reason=\"cluster_lost\"").await,
        1.0
    );
    assert!(a.metric("shoal_handshakes_total{result=\"bus_down\"").await >= 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_redis_cluster_of_three_masters_spreads_rooms_over_its_shards() {
    let cluster = RedisCluster::start(3).await;
    let pg = Postgres::start().await;
    let pg_url = pg.url();
    let (a, b) = two_nodes_with(cluster.url(), |c| {
        c.cluster.redis_timeout = std::time::Duration::from_millis(1000);
        c.store.kind = shoal_broker::config::StoreKind::Postgres;
        c.store.postgres_url = Some(pg_url.clone());
        c.cluster.archive_interval = std::time::Duration::from_millis(100);
        c.cluster.user_publish_rate = 40;
    })
    .await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    const ROOMS: usize = 12;
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("room-{i}")).collect();
    for r in &rooms {
        alice.join(r).await;
        bob.join(r).await;
    }
    for k in 0..3 {
        for r in &rooms {
            match alice.publish(r, json!({ "k": k })).await {
                ServerFrame::Ack { seq, .. } => assert_eq!(seq, k + 1, "{r}"),
                f => panic!("{r}: {f:?}"),
            }
        }
    }
    // Node B hears every room (its SSUBSCRIBEs went to the owning shards),
    // each in seq order.
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 3 * ROOMS {
        match bob.try_recv(Duration::from_secs(10)).await {
            Ok(ServerFrame::Msg { room, seq, .. }) => got.entry(room).or_default().push(seq),
            Ok(_) => {}
            Err(e) => panic!("after {got:?}: {e:?}"),
        }
    }
    assert!(got.values().all(|s| s == &vec![1, 2, 3]), "{got:?}");

    // The rooms' hot histories are spread over all three shards.
    for &p in &cluster.ports {
        let keys = cluster.cli(p, &["--scan", "--pattern", "shoal:{room-*}:log"]);
        assert!(
            keys.lines().count() >= 1,
            "shard {p} holds no room of {ROOMS}"
        );
    }

    // A DM crosses slots (the parties' user channels live elsewhere) and
    // nodes: bob on B gets it without joining.
    alice.send_dm("bob", json!("hi")).await;
    match bob
        .recv_until(|f| matches!(f, ServerFrame::Msg { room, .. } if room == "dm:alice:bob"))
        .await
    {
        ServerFrame::Msg { seq, from, .. } => assert_eq!((seq, from.as_str()), (1, "alice")),
        _ => unreachable!(),
    }

    // The archiver (its note is a separate ZADD on a cluster) copies every
    // message to PostgreSQL.
    let token = token_for("alice");
    for r in &rooms {
        let mut seqs = vec![];
        for _ in 0..100 {
            seqs = b.stored_seqs(&token, r).await;
            if seqs.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seqs, vec![1, 2, 3], "{r}");
    }

    // The per-user rate is counted in its own slot, shared by both nodes:
    // 150 publishes span at most three one-second windows of 40.
    let (acked, limited) = publish_on_both(&a, &b, "chatty", 150).await;
    assert!(
        (40..=120).contains(&acked),
        "{acked} acked, {limited} limited"
    );
    a.stop().await;
    b.stop().await;
}

/// Issue 15.1: a message is acked only if every node and every client
/// encoding can deliver it, and a sequenced message the bus cannot decode
/// is announced as a gap, live and on replay, never skipped in silence.
#[tokio::test]
async fn only_deliverable_bodies_are_acked_and_an_undecodable_record_is_a_gap() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut packer = a.connect(&token_for("packer"), Encoding::MsgPack).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    let mut carol = b.connect(&token_for("carol"), Encoding::Json).await;
    for c in [&mut alice, &mut packer, &mut bob, &mut carol] {
        c.join("r").await;
    }
    let code = |f: ServerFrame| match f {
        ServerFrame::Error { code, .. } => code,
        ServerFrame::Ack { seq, .. } => 1000 + seq as u16,
        f => panic!("{f:?}"),
    };
    assert_eq!(code(alice.publish("r", json!("one")).await), 1001);
    // JSON decodes ~128 levels, the bus's MessagePack 32: one policy for
    // both, refused before a seq is taken.
    for depth in [40, shoal_proto::MAX_BODY_DEPTH + 1] {
        assert_eq!(
            code(alice.publish("r", shoal_proto::body::nested(depth)).await),
            400,
            "{depth}"
        );
    }
    let deepest = shoal_proto::body::nested(shoal_proto::MAX_BODY_DEPTH);
    assert_eq!(code(alice.publish("r", deepest.clone()).await), 1002);
    // 65,000 `false`: under the limit as MessagePack, 390 KB as JSON.
    let falses = serde_json::Value::Array(vec![json!(false); 65_000]);
    assert_eq!(code(packer.publish("r", falses).await), 413);

    // A foreign writer sequences seq 3 with a record nobody can decode.
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut r = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = redis::cmd("INCR")
        .arg("shoal:{r}:seq")
        .query_async(&mut r)
        .await
        .expect("incr");
    let _: String = redis::cmd("XADD")
        .arg("shoal:{r}:log")
        .arg("3-0")
        .arg("r")
        .arg(&b"\xc1"[..])
        .query_async(&mut r)
        .await
        .expect("xadd");
    let _: i64 = redis::cmd("SPUBLISH")
        .arg("shoal:{r}")
        .arg(&b"3:\xc1"[..])
        .query_async(&mut r)
        .await
        .expect("spublish");
    assert_eq!(code(alice.publish("r", json!("four")).await), 1004);

    let expected = |frames: &[ServerFrame]| {
        let got: Vec<String> = frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Msg { seq, body, .. } => Some(format!("msg {seq} {body}")),
                ServerFrame::Gap { from, to, .. } => Some(format!("gap {from}-{to}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![
                "msg 1 \"one\"".to_string(),
                format!("msg 2 {deepest}"),
                "gap 3-3".into(),
                "msg 4 \"four\"".into()
            ]
        );
    };
    // Live, on the other node, in both encodings (the publishers' helper
    // skipped deliveries while it waited for its acks).
    for c in [&mut bob, &mut carol] {
        let mut frames = vec![];
        while !matches!(frames.last(), Some(ServerFrame::Msg { seq: 4, .. })) {
            frames.push(c.recv().await);
        }
        expected(&frames);
    }
    // Replayed from the hot history.
    for node in [&a, &b] {
        let mut late = node.connect(&token_for("dave"), Encoding::MsgPack).await;
        let (frames, seq) = late.join_since("r", Some(0)).await;
        assert_eq!(seq, 4);
        expected(&frames);
    }
    assert!(a.metric("shoal_bus_undeliverable_total").await >= 1.0);
    assert!(b.metric("shoal_bus_undeliverable_total").await >= 1.0);
}

/// `bob`'s `members` of `room`, skipping other frames.
async fn members_of(bob: &mut Client, room: &str, id: u64) -> Vec<String> {
    bob.send(&ClientFrame::Members {
        id: Some(id),
        room: room.into(),
    })
    .await;
    match bob
        .recv_until(|f| matches!(f, ServerFrame::Members { id: Some(i), .. } if *i == id))
        .await
    {
        ServerFrame::Members { users, .. } => users,
        _ => unreachable!(),
    }
}

/// Issue 15 (ghost users): a node killed with -9 and restarted under the
/// same node id, 0.1 s or 4 s later, does not keep its old users online:
/// they leave within 1.5 leases of the kill, and nothing brings them back.
#[tokio::test]
async fn a_crashed_node_restarted_under_its_id_leaves_no_ghosts() {
    let redis = Redis::start().await;
    let b = node_with(redis.url(), |c| {
        c.cluster.presence_lease = std::time::Duration::from_millis(1000)
    })
    .await;
    b.health_becomes(200).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    for (round, delay) in [Duration::from_millis(100), Duration::from_secs(4)]
        .into_iter()
        .enumerate()
    {
        let room = format!("room{round}");
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ["--presence-lease-ms", "1000", "--node-id", "node-a"];
        let mut a = redis.node_proc(dir.path(), &args).await;
        bob.join(&room).await;
        let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
        alice.join(&room).await;
        bob.recv_until(|f| matches!(f, ServerFrame::Presence { online: true, .. }))
            .await;
        assert_eq!(members_of(&mut bob, &room, 10).await, ["alice", "bob"]);

        a.kill9();
        let killed = std::time::Instant::now();
        let offline = |f: &ServerFrame| matches!(f, ServerFrame::Presence { user, online: false, .. } if user == "alice");
        let mut gone_after = None;
        if delay > Duration::from_secs(2) {
            bob.recv_until(|f| offline(f)).await;
            gone_after = Some(killed.elapsed());
        }
        tokio::time::sleep(delay.saturating_sub(killed.elapsed())).await;
        // The same node id, restarted (the data dir is the node's too).
        let a2 = redis.node_proc(dir.path(), &args).await;
        let mut carol = a2.connect(&token_for("carol"), Encoding::Json).await;
        carol.join(&room).await;
        let gone_after = match gone_after {
            Some(t) => t,
            None => {
                bob.recv_until(|f| offline(f)).await;
                killed.elapsed()
            }
        };
        eprintln!("restart {delay:?} after the kill: alice offline {gone_after:?} after it");
        // 1.5 leases, and scheduling slack on a loaded machine.
        assert!(
            gone_after < Duration::from_millis(1500 + 1000),
            "{gone_after:?}"
        );
        // And stays gone, seen from both nodes, for more than a lease.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(members_of(&mut bob, &room, 11).await, ["bob", "carol"]);
        assert_eq!(members_of(&mut carol, &room, 12).await, ["bob", "carol"]);
    }
}

/// A `history` page of 3 below `before`: (seqs, more).
async fn history_page(c: &mut Client, before: Option<u64>) -> (Vec<u64>, bool) {
    c.send(&ClientFrame::History {
        id: Some(40 + before.unwrap_or(0)),
        room: "r".into(),
        before,
        limit: Some(3),
    })
    .await;
    match c
        .recv_until(|f| matches!(f, ServerFrame::History { .. } | ServerFrame::Error { .. }))
        .await
    {
        ServerFrame::History { messages, more, .. } => {
            (messages.iter().map(|m| m.seq).collect(), more)
        }
        f => panic!("{f:?}"),
    }
}

/// Issue 15 (history without PostgreSQL): on Redis with each node's own
/// embedded store, history comes from the hot stream on every node (it
/// used to answer an empty page), and search says it needs the shared
/// store instead of answering nothing.
#[tokio::test]
async fn a_cluster_without_postgres_serves_history_from_the_hot_stream() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let token = token_for("alice");
    let mut alice = a.connect(&token, Encoding::Json).await;
    alice.join("r").await;
    for k in 1..=5 {
        assert!(matches!(
            alice.publish("r", json!({"text": format!("m{k}")})).await,
            ServerFrame::Ack { .. }
        ));
    }
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    assert_eq!(history_page(&mut bob, None).await, (vec![5, 4, 3], true));
    assert_eq!(history_page(&mut bob, Some(3)).await, (vec![2, 1], false));
    for node in [&a, &b] {
        let (s, v) = node
            .get("/api/rooms/r/messages?limit=2&before=5", Some(&token))
            .await;
        assert_eq!(s, 200, "{v}");
        let seqs: Vec<u64> = v["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["seq"].as_u64())
            .collect();
        assert_eq!((seqs, v["more"].as_bool()), (vec![4, 3], Some(true)));
        assert_eq!(v["messages"][0]["body"]["text"], "m4");
        let (s, v) = node.get("/api/rooms/r/search?q=m4", Some(&token)).await;
        assert_eq!(s, 501, "{v}");
    }
}

/// Issue 15 (per-shard health): a Redis Cluster shard out of reach costs
/// only its rooms (`error 503`); the node stays healthy and keeps its
/// clients, and rooms on the other shards carry on. Only a node that
/// reaches no shard at all sends its clients away (4006).
#[tokio::test]
async fn one_unreachable_shard_costs_only_its_rooms() {
    let mut cluster = RedisCluster::start(3).await;
    let (a, b) = two_nodes_with(cluster.url(), |c| {
        c.cluster.redis_timeout = std::time::Duration::from_millis(300);
        c.cluster.bus_down_grace = std::time::Duration::from_millis(1000);
    })
    .await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    let rooms: Vec<String> = (0..12).map(|i| format!("shard-room-{i}")).collect();
    for r in &rooms {
        alice.join(r).await;
        bob.join(r).await;
    }
    // The shard holding room 0's keys goes away.
    let victim = cluster.owner("shoal:{shard-room-0}:seq");
    cluster.kill(victim);
    // Past the grace period: nobody was sent away.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for node in [&a, &b] {
        assert_eq!(node.get("/health", None).await.0, 200);
        assert_eq!(node.metric("shoal_bus_degraded").await, 1.0);
    }
    let (mut ok, mut refused) = (vec![], 0);
    for r in &rooms {
        match alice.publish(r, json!({"r": r})).await {
            ServerFrame::Ack { .. } => ok.push(r.clone()),
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, 503, "{r}");
                refused += 1;
            }
            f => panic!("{f:?}"),
        }
    }
    assert!(refused >= 1, "room 0's shard is gone");
    assert!(!ok.is_empty(), "other shards carry on");
    let mut heard = std::collections::BTreeSet::new();
    while heard.len() < ok.len() {
        match bob.try_recv(Duration::from_secs(10)).await {
            Ok(ServerFrame::Msg { room, .. }) => {
                heard.insert(room);
            }
            Ok(_) => {}
            Err(e) => panic!("bob heard {heard:?} of {ok:?}: {e:?}"),
        }
    }
    // The rest of the cluster goes: now the nodes send their clients away.
    for p in cluster.ports.clone() {
        cluster.kill(p);
    }
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.closed().await, End::Closed(Some(4006)));
    }
}

/// Issue 15 (failover): a Redis Cluster master is killed while messages
/// are being published; one of its two replicas takes over (the other
/// follows it, so `WAIT 1` can still be met). With
/// `--redis-wait-replicas 1` every acked message is delivered to the
/// other node's member exactly once and in order, with no gap, and the
/// publisher only ever retried with its cid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_mid_publish_loses_and_repeats_no_acked_message() {
    let mut cluster = RedisCluster::start_with(3, 2).await;
    let (a, b) = two_nodes_with(cluster.url(), |c| {
        c.cluster.redis_timeout = std::time::Duration::from_millis(1000);
        c.cluster.redis_wait_replicas = 1;
    })
    .await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    let rooms: Vec<String> = (0..6).map(|i| format!("fo-{i}")).collect();
    for r in &rooms {
        alice.join(r).await;
        bob.join(r).await;
    }
    let victim = cluster.owner("shoal:{fo-0}:seq");
    const N: usize = 300;
    // (room, seq) -> k, from the acks.
    let mut acked: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let (mut retries, mut killed_at) = (0, None);
    let started = std::time::Instant::now();
    for k in 0..N {
        if k == N / 3 {
            cluster.kill(victim);
            killed_at = Some(started.elapsed());
        }
        let room = &rooms[k % rooms.len()];
        let cid = format!("c{k}");
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "publishing stalled at {k}"
            );
            match alice.publish_cid(room, Some(&cid), json!({ "k": k })).await {
                ServerFrame::Ack { seq, .. } => {
                    let prev = acked.insert((room.clone(), seq), k);
                    assert!(
                        prev.is_none() || prev == Some(k),
                        "seq {seq} of {room} reused"
                    );
                    break;
                }
                ServerFrame::Error { code, .. } => {
                    assert_eq!(code, 503);
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                f => panic!("{f:?}"),
            }
        }
    }
    eprintln!(
        "{N} acked in {:?}; master killed at {killed_at:?}; {retries} retries with the cid",
        started.elapsed()
    );
    assert_eq!(acked.len(), N, "every k acked once");
    // Bob, on the other node, gets each room's acked messages once, in
    // seq order, with nothing missing and no gap.
    let mut got: BTreeMap<String, Vec<(u64, usize)>> = BTreeMap::new();
    let mut n = 0;
    while n < N {
        match bob.try_recv(Duration::from_secs(15)).await {
            Ok(ServerFrame::Msg {
                room, seq, body, ..
            }) => {
                let k = body["k"].as_u64().expect("k") as usize;
                got.entry(room).or_default().push((seq, k));
                n += 1;
            }
            Ok(ServerFrame::Gap { room, from, to }) => panic!("gap {from}-{to} in {room}"),
            Ok(_) => {}
            Err(e) => panic!(
                "bob got {n} of {N}: {e:?}: {}\n{:?}",
                b.metrics()
                    .await
                    .lines()
                    .filter(|l| l.contains("bus")
                        || l.contains("redis_sub")
                        || l.contains("deliveries"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                got.iter()
                    .map(|(r, m)| (r, m.len(), m.last().copied()))
                    .collect::<Vec<_>>()
            ),
        }
    }
    for (room, msgs) in &got {
        let seqs: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{room}");
        for (seq, k) in msgs {
            assert_eq!(acked.get(&(room.clone(), *seq)), Some(k), "{room} {seq}");
        }
    }
}

/// Two nodes on `redis` sharing PostgreSQL `pg`, archiving every 100 ms.
async fn two_nodes_on_postgres(redis: &Redis, pg: &Postgres) -> (Broker, Broker) {
    let pg_url = pg.url();
    two_nodes_with(redis.url(), |c| {
        c.store.kind = shoal_broker::config::StoreKind::Postgres;
        c.store.postgres_url = Some(pg_url.clone());
        c.cluster.archive_interval = std::time::Duration::from_millis(100);
    })
    .await
}

/// (seq, kind, target) of the room entries `c` receives until seq `upto`.
async fn entries_until(
    c: &mut Client,
    upto: u64,
) -> Vec<(u64, Option<shoal_proto::EventKind>, Option<u64>)> {
    let mut out = vec![];
    while out.last().is_none_or(|e: &(u64, _, _)| e.0 < upto) {
        if let ServerFrame::Msg {
            seq, kind, target, ..
        } = c.recv().await
        {
            out.push((seq, kind, target));
        }
    }
    out
}

/// Send a request with a fresh id; the ack's seq (entries that arrive
/// meanwhile are left for `entries_until` by the caller's own reader).
fn event_frame(id: Option<u64>, room: &str, seq: u64, what: &str) -> ClientFrame {
    match what {
        "edit" => ClientFrame::Edit {
            id,
            room: room.into(),
            seq,
            body: json!({"text": format!("edited {seq}")}),
        },
        "react" | "unreact" => ClientFrame::React {
            id,
            room: room.into(),
            seq,
            emoji: "👍".into(),
            on: what == "react",
        },
        "delete" => ClientFrame::Delete {
            id,
            room: room.into(),
            seq,
        },
        _ => ClientFrame::Pub {
            id,
            room: Some(room.into()),
            to: None,
            cid: None,
            body: json!({"text": "a reply"}),
            reply_to: Some(seq),
        },
    }
}

#[tokio::test]
async fn chat_events_cross_nodes_in_one_order_and_are_recovered_and_stored() {
    use shoal_proto::EventKind::{Delete, Edit, React, Unreact};
    let redis = Redis::start().await;
    let pg = Postgres::start().await;
    let (a, b) = two_nodes_on_postgres(&redis, &pg).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    alice.join("team").await;
    bob.join("team").await;
    // A mention of a member present on the other node is recognised.
    let m1 = match alice.publish("team", json!({"text": "hi @bob"})).await {
        ServerFrame::Ack { seq, .. } => seq,
        f => panic!("{f:?}"),
    };
    match bob
        .recv_until(|f| matches!(f, ServerFrame::Msg { .. }))
        .await
    {
        ServerFrame::Msg { seq, mentions, .. } => {
            assert_eq!((seq, mentions), (m1, vec!["bob".to_string()]))
        }
        f => panic!("{f:?}"),
    }
    // Events from both nodes, sent without waiting: one order everywhere.
    for (on_b, what) in [
        (true, "reply"),
        (false, "edit"),
        (true, "react"),
        (false, "react"),
    ] {
        let c = if on_b { &mut bob } else { &mut alice };
        let id = c.id();
        c.send(&event_frame(id, "team", m1, what)).await;
    }
    // (Alice may still have her own first message to read: in a cluster
    // the ack comes from the bus, delivery from the subscription.)
    let after_m1 = |v: Vec<(u64, _, _)>| v.into_iter().filter(|e| e.0 > m1).collect::<Vec<_>>();
    let on_a = after_m1(entries_until(&mut alice, m1 + 4).await);
    let on_b = after_m1(entries_until(&mut bob, m1 + 4).await);
    assert_eq!(on_a, on_b, "one order on both nodes");
    assert_eq!(on_a.len(), 4);
    let mut kinds: Vec<_> = on_a.iter().map(|e| (e.1, e.2)).collect();
    kinds.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        kinds,
        vec![
            (None, None),
            (Some(Edit), Some(m1)),
            (Some(React), Some(m1)),
            (Some(React), Some(m1))
        ]
    );
    // Bob leaves; on node A alice edits, unreacts, posts and deletes.
    let since = m1 + 4;
    drop(bob);
    let m6 = match alice.publish("team", json!({"text": "oops"})).await {
        ServerFrame::Ack { seq, .. } => seq,
        f => panic!("{f:?}"),
    };
    for (seq, what) in [(m1, "edit"), (m1, "unreact"), (m6, "delete")] {
        let id = alice.id();
        alice.send(&event_frame(id, "team", seq, what)).await;
        let r = alice
            .recv_until(|f| shoal_proto::sio::reply_id(f) == id)
            .await;
        assert!(!matches!(r, ServerFrame::Error { .. }), "{what}: {r:?}");
    }
    // Back through node A: everything since, in order, once.
    let mut bob = a.connect(&token_for("bob"), Encoding::MsgPack).await;
    let (frames, joined) = bob.join_since("team", Some(since)).await;
    assert_eq!(joined, m6 + 3);
    let got: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Msg {
                seq, kind, target, ..
            } => Some((*seq, *kind, *target)),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (m6, None, None),
            (m6 + 1, Some(Edit), Some(m1)),
            (m6 + 2, Some(Unreact), Some(m1)),
            (m6 + 3, Some(Delete), Some(m6)),
        ]
    );
    // The archive applies the events in PostgreSQL: history on node B
    // shows the current state.
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, v) = b
            .get("/api/rooms/team/messages", Some(&token_for("bob")))
            .await;
        last = v;
        let msgs = last["messages"].as_array().cloned().unwrap_or_default();
        if msgs.len() == 2 && msgs[1]["body"] == json!({"text": format!("edited {m1}")}) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let msgs = last["messages"].as_array().expect("messages");
    assert_eq!(
        msgs.len(),
        2,
        "reply and first message; the deleted one gone: {last}"
    );
    assert_eq!(msgs[1]["seq"], m1);
    assert_eq!(msgs[1]["body"], json!({"text": format!("edited {m1}")}));
    assert_eq!(
        msgs[1]["reactions"],
        json!([{"emoji": "👍", "count": 1, "me": true}])
    );
    assert_eq!(msgs[1]["thread"]["count"], 1);
    let (_, v) = b
        .get(
            &format!("/api/rooms/team/messages/{m1}/edits"),
            Some(&token_for("bob")),
        )
        .await;
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(2), "{v}");
}

#[tokio::test]
async fn a_ban_on_one_node_removes_the_user_on_the_other_at_once() {
    use shoal_proto::entry::ModAction;
    let redis = Redis::start().await;
    let pg = Postgres::start().await;
    let (a, b) = two_nodes_on_postgres(&redis, &pg).await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    let mut bob = b.connect(&token_for("bob"), Encoding::MsgPack).await;
    let ask_id = alice.id();
    alice
        .send(&ClientFrame::Create {
            id: ask_id,
            room: "guild".into(),
            private: true,
            topic: None,
            title: None,
        })
        .await;
    alice
        .recv_until(|f| matches!(f, ServerFrame::Ack { id, .. } if *id == ask_id))
        .await;
    // Node B learns of the private room at once (the archive may not have
    // copied it yet: B folds it from the hot history).
    let id = bob.id();
    bob.send(&ClientFrame::Join {
        id,
        room: "guild".into(),
        since: None,
    })
    .await;
    assert!(matches!(
        bob.recv_until(|f| matches!(f, ServerFrame::Error { .. } | ServerFrame::Joined { .. }))
            .await,
        ServerFrame::Error { code: 403, .. }
    ));
    let invite = alice.id();
    alice
        .send(&ClientFrame::Moderate {
            id: invite,
            room: "guild".into(),
            action: "invite".into(),
            what: ModAction {
                user: Some("bob".into()),
                ..Default::default()
            },
        })
        .await;
    alice
        .recv_until(|f| matches!(f, ServerFrame::Ack { id, .. } if *id == invite))
        .await;
    alice.join("guild").await;
    bob.join("guild").await;
    // The ban through node A: bob's connection on node B is out within a second.
    let started = std::time::Instant::now();
    let ban = alice.id();
    alice
        .send(&ClientFrame::Moderate {
            id: ban,
            room: "guild".into(),
            action: "ban".into(),
            what: ModAction {
                user: Some("bob".into()),
                ..Default::default()
            },
        })
        .await;
    match bob
        .recv_until(|f| matches!(f, ServerFrame::Left { .. }))
        .await
    {
        ServerFrame::Left { reason, .. } => assert_eq!(reason.as_deref(), Some("ban")),
        f => panic!("{f:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    match bob.publish("guild", json!("hello?")).await {
        ServerFrame::Error { code, .. } => assert_eq!(code, 403),
        f => panic!("{f:?}"),
    }
    // A fresh node C (no room in memory) refuses bob too.
    let c = node_with(redis.url(), |c| {
        c.store.kind = shoal_broker::config::StoreKind::Postgres;
        c.store.postgres_url = Some(pg.url());
    })
    .await;
    c.health_becomes(200).await;
    let mut bob_c = c.connect(&token_for("bob"), Encoding::Json).await;
    let id = bob_c.id();
    bob_c
        .send(&ClientFrame::Join {
            id,
            room: "guild".into(),
            since: None,
        })
        .await;
    assert!(matches!(
        bob_c
            .recv_until(|f| matches!(f, ServerFrame::Error { .. } | ServerFrame::Joined { .. }))
            .await,
        ServerFrame::Error { code: 403, .. }
    ));
}
