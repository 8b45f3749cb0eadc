//! The PostgreSQL store against a real PostgreSQL server: the same
//! conformance checks as the embedded store, idempotent message inserts,
//! and migrations that run once when several nodes start together.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::json;
use shoal_broker::store::{conformance, postgres::PgStore, Store};
use shoal_proto::{Encoding, ServerFrame};

async fn fresh(pg: &Postgres, db: &str) -> PgStore {
    let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    let url = pg.url().replace("/postgres", &format!("/{db}"));
    PgStore::connect(&url, 4).await.expect("store")
}

#[tokio::test]
async fn postgres_store_behaves_like_the_embedded_one() {
    let pg = Postgres::start().await;
    conformance::users(&fresh(&pg, "users").await).await;
    conformance::messages(&fresh(&pg, "messages").await).await;
    conformance::events(&fresh(&pg, "events").await).await;
    conformance::moderation(&fresh(&pg, "moderation").await).await;
    conformance::files(&fresh(&pg, "files").await).await;

    // Archiving the same message twice (two nodes, a retry) stores it once.
    let s = fresh(&pg, "idem").await;
    let op = conformance::msg("r", 1, "alice", "hello");
    s.write_batch(vec![op.clone(), op.clone()])
        .await
        .expect("batch");
    s.write_batch(vec![op]).await.expect("again");
    let r = s.replay("r", 0, 10, 10).await.expect("replay");
    assert_eq!(r.entries.len(), 1);

    // Migrations: nodes starting together migrate once, under a lock.
    let url = pg.url();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url, 2).await.map(Arc::new) })
        })
        .collect();
    for s in starts {
        let s = s.await.expect("join").expect("connect and migrate");
        s.list_users().await.expect("schema in place");
    }
}

/// A cluster node on Redis and the shared PostgreSQL, as a process.
async fn pg_node(redis: &Redis, pg: &Postgres, dir: &std::path::Path, extra: &[&str]) -> Proc {
    let p = pg.url();
    let mut args = vec!["--store", "postgres", "--postgres-url", &p];
    args.extend_from_slice(extra);
    redis.node_proc(dir, &args).await
}

#[tokio::test]
async fn cluster_nodes_share_users_and_history_and_a_crash_loses_no_archived_message() {
    let redis = Redis::start().await;
    let pg = Postgres::start().await;
    let (da, db) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    // Node A's archiver would first sweep after 10 s: it dies before, so
    // everything it published is archived by node B.
    let mut a = pg_node(
        &redis,
        &pg,
        da.path(),
        &["--node-id", "a", "--archive-interval-ms", "10000"],
    )
    .await;
    let b = pg_node(
        &redis,
        &pg,
        db.path(),
        &["--node-id", "b", "--archive-interval-ms", "100"],
    )
    .await;

    // Register on A, log in on B: one user table.
    let (s, _) = a
        .post(
            "/api/register",
            json!({"username": "alice", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = b
        .post(
            "/api/login",
            json!({"username": "alice", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let alice_token = v["token"].as_str().expect("token").to_string();

    // Publish through A, then kill A at once: the archiver on B copies
    // what A's node never got to (every acked message ends up in
    // PostgreSQL exactly once).
    let mut alice = a.connect(&alice_token, Encoding::MsgPack).await;
    alice.join("lobby").await;
    let mut acked = vec![];
    for k in 0..200 {
        let text = if k == 150 {
            "the quick brown fox".to_string()
        } else {
            format!("m{k}")
        };
        match alice.publish("lobby", json!({ "text": text })).await {
            ServerFrame::Ack { seq, .. } => acked.push(seq),
            f => panic!("{f:?}"),
        }
    }
    // bob has an account in the shared database (a DM goes only to a
    // name someone holds), registered through the other node.
    let bob_token = b.user("bob").await;
    alice.send_dm("bob", json!({"text": "psst"})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.kill9();
    assert_eq!(acked, (1..=200).collect::<Vec<_>>());

    let mut history = vec![];
    for _ in 0..100 {
        let (s, v) = b
            .get("/api/rooms/lobby/messages?limit=200", Some(&alice_token))
            .await;
        assert_eq!(s, 200, "{v}");
        history = v["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        if history.len() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut want: Vec<u64> = (1..=200).collect();
    want.reverse();
    assert_eq!(
        history, want,
        "every acked message archived once, newest first"
    );
    let (s, v) = b
        .get("/api/rooms/lobby/search?q=brown%20fox", Some(&alice_token))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["messages"][0]["seq"], 151);
    // The DM sent through A shows up in bob's room list on B.
    let mut rooms = serde_json::Value::Null;
    for _ in 0..50 {
        let (_, v) = b.get("/api/rooms", Some(&bob_token)).await;
        rooms = v;
        if rooms.to_string().contains("dm:alice:bob") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rooms.to_string().contains("dm:alice:bob"), "{rooms}");
    assert!(b.metric("shoal_archived_total{").await >= 201.0);
}

#[tokio::test]
async fn since_older_than_the_hot_history_is_replayed_from_postgres() {
    let redis = Redis::start().await;
    let pg = Postgres::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let r = redis.url();
    let node = pg_node(
        &redis,
        &pg,
        dir.path(),
        &["--redis-stream-len", "100", "--archive-interval-ms", "50"],
    )
    .await;
    let token = token_for("alice");
    let mut alice = node.connect(&token, Encoding::MsgPack).await;
    alice.join("long").await;
    for k in 0..400 {
        let f = alice
            .publish("long", json!({ "text": format!("m{k}") }))
            .await;
        assert!(matches!(f, ServerFrame::Ack { .. }), "{f:?}");
    }
    // The stream kept only the newest messages (trimmed near 100).
    let mut c = redis::Client::open(r.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
    let first: Entries = redis::cmd("XRANGE")
        .arg("shoal:{long}:log")
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await
        .expect("xrange");
    let oldest_hot: u64 = first[0]
        .0
        .split('-')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("id");
    assert!(oldest_hot > 100, "trimmed: oldest kept is {oldest_hot}");
    // Wait for the archiver, then rejoin from the start on a new connection.
    for _ in 0..100 {
        if node.metric("shoal_archived_total{").await >= 400.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = node.connect(&token, Encoding::Json).await;
    let (replayed, head) = late.join_since("long", Some(0)).await;
    assert_eq!(head, 400);
    assert!(
        !replayed
            .iter()
            .any(|f| matches!(f, ServerFrame::Gap { .. })),
        "no gap: the database had what the stream dropped"
    );
    assert_eq!(
        replayed.iter().filter_map(msg_seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
}
