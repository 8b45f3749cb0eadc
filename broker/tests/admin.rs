//! The operators' API (issue 20): who may use it, what it lists, its
//! actions (disconnect, revoke, moderate any room, delete any message),
//! the audit log, and the cluster view gathered from every node.

mod common;

use common::*;
use serde_json::{json, Value};
use shoal_proto::{ClientFrame, Encoding, EventKind, ServerFrame};

async fn operator_broker() -> Broker {
    Broker::start_with(|c| c.auth.admins = vec!["ops".into()]).await
}

/// The connections listed in an overview, as (node, user, id).
fn listed(v: &Value) -> Vec<(String, String, u64)> {
    let mut out = vec![];
    for n in v["nodes"].as_array().into_iter().flatten() {
        for c in n["connections"].as_array().into_iter().flatten() {
            out.push((
                n["node"].as_str().unwrap_or_default().to_string(),
                c["user"].as_str().unwrap_or_default().to_string(),
                c["id"].as_u64().unwrap_or_default(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn operators_list_disconnect_revoke_moderate_and_delete_audited() {
    let b = operator_broker().await;
    let (root, ta, tb) = (
        b.user("ops").await,
        b.user("alice").await,
        b.user("bob").await,
    );
    // Operators only.
    assert_eq!(b.get("/api/admin/overview", None).await.0, 401);
    let (s, v) = b.get("/api/admin/overview", Some(&tb)).await;
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")));
    let (s, _) = b
        .post("/api/admin/disconnect", json!({"user": "alice"}), Some(&tb))
        .await;
    assert_eq!(s, 403);

    let mut a = b.connect(&ta, Encoding::Json).await;
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    a.join("lobby").await;
    o.join("lobby").await;
    let (s, v) = b.get("/api/admin/overview", Some(&root)).await;
    assert_eq!(s, 200, "{v}");
    let conns = listed(&v);
    let bobs: Vec<_> = conns.iter().filter(|c| c.1 == "bob").collect();
    assert_eq!(bobs.len(), 1, "{v}");
    let node = v["node"].as_str().expect("node").to_string();
    let c = &v["nodes"][0]["connections"]
        .as_array()
        .expect("conns")
        .iter()
        .find(|c| c["user"] == "bob")
        .cloned()
        .expect("bob");
    assert_eq!(c["rooms"], json!(["lobby"]));
    assert_eq!(c["encoding"], "shoal.v1.msgpack");
    assert_eq!(c["transport"], "websocket");
    assert!(c["addr"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    // Finding a user among many; a bounded listing says its total.
    let (_, f) = b.get("/api/admin/overview?user=bo*", Some(&root)).await;
    assert_eq!(
        listed(&f).iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        ["bob"],
        "{f}"
    );
    let (_, f) = b.get("/api/admin/overview?limit=1", Some(&root)).await;
    assert_eq!(listed(&f).len(), 1);
    assert_eq!(f["nodes"][0]["connections_total"], 2);
    // Latency from the node's own histogram (no publish yet: none).
    assert!(v["nodes"][0]["stats"]["publish_p99_ms"].is_null(), "{v}");
    assert!(v["users"]
        .as_array()
        .expect("users")
        .iter()
        .any(|u| u["user"] == "alice" && u["sessions"] == 1));

    // Disconnect bob's connection: closed with 4007, counted.
    let (s, v) = b
        .post(
            "/api/admin/disconnect",
            json!({"node": node, "id": bobs[0].2}),
            Some(&root),
        )
        .await;
    assert_eq!((s, v["closed"].as_u64()), (200, Some(1)), "{v}");
    assert!(matches!(o.closed().await, End::Closed(Some(4007))));
    let (s, _) = b
        .post("/api/admin/disconnect", json!({"id": 1}), Some(&root))
        .await;
    assert_eq!(s, 400, "an id needs its node");

    // Revoke: alice's live token closes with 4002 and is refused after.
    let (s, v) = b
        .post("/api/admin/revoke", json!({"user": "alice"}), Some(&root))
        .await;
    assert_eq!((s, v["revoked_tokens"].as_u64()), (200, Some(1)), "{v}");
    assert!(matches!(a.closed().await, End::Closed(Some(4002))));
    assert_eq!(
        b.try_connect(&ta, Encoding::Json).await.err().map(|e| e.0),
        Some(401)
    );

    // Moderate a room the operator is no member of; delete any message.
    let (tc, td) = (b.user("carol").await, b.user("dan").await);
    let mut c = b.connect(&tc, Encoding::Json).await;
    let id = c.id();
    c.send(&ClientFrame::Create {
        id,
        room: "club".into(),
        private: false,
        topic: None,
        title: None,
    })
    .await;
    c.recv_until(|f| matches!(f, ServerFrame::Ack { .. })).await;
    c.join("club").await;
    let mut d = b.connect(&td, Encoding::Json).await;
    d.join("club").await;
    let seq = match d.publish("club", json!("hello")).await {
        ServerFrame::Ack { seq, .. } => seq,
        f => panic!("{f:?}"),
    };
    let (s, v) = b
        .post(
            "/api/admin/rooms/club/moderate",
            json!({"action": "mute", "user": "dan"}),
            Some(&root),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        match d.publish("club", json!("muted?")).await {
            ServerFrame::Error { code, .. } => code,
            f => panic!("{f:?}"),
        },
        403
    );
    // Not even an operator mutes the owner (no entry that does nothing).
    let (s, _) = b
        .post(
            "/api/admin/rooms/club/moderate",
            json!({"action": "mute", "user": "carol"}),
            Some(&root),
        )
        .await;
    assert_eq!(s, 409);
    let (s, v) = b
        .post(
            &format!("/api/admin/rooms/club/messages/{seq}/delete"),
            json!({}),
            Some(&root),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    match c
        .recv_until(|f| {
            matches!(
                f,
                ServerFrame::Msg {
                    kind: Some(EventKind::Delete),
                    ..
                }
            )
        })
        .await
    {
        ServerFrame::Msg { from, target, .. } => {
            assert_eq!((from.as_str(), target), ("server", Some(seq)))
        }
        f => panic!("{f:?}"),
    }
    let (_, h) = b.get("/api/rooms/club/messages", Some(&tc)).await;
    assert_eq!(h["messages"], json!([]), "{h}");
    let (s, _) = b
        .post(
            "/api/admin/rooms/club/messages/999/delete",
            json!({}),
            Some(&root),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = b
        .post(
            "/api/admin/rooms/club/moderate",
            json!({"action": "dance", "user": "carol"}),
            Some(&root),
        )
        .await;
    assert_eq!(s, 400);

    let (_, v) = b.get("/api/admin/overview", Some(&root)).await;
    assert!(
        v["nodes"][0]["stats"]["publish_p99_ms"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{v}"
    );
    // A server ban: disconnected (4007), no token or login works until
    // the ban is lifted.
    let mut d2 = b.connect(&td, Encoding::Json).await;
    let (s, v) = b
        .post("/api/admin/ban", json!({"user": "dan"}), Some(&root))
        .await;
    assert_eq!((s, v["closed"].as_u64()), (200, Some(2)), "{v}");
    assert!(matches!(d2.closed().await, End::Closed(Some(4007))));
    assert_eq!(
        b.try_connect(&td, Encoding::Json).await.err().map(|e| e.0),
        Some(401)
    );
    let (s, v) = b
        .post(
            "/api/login",
            json!({"username": "dan", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!(
        (s, v["message"].as_str()),
        (403, Some("this account is banned"))
    );
    let (s, _) = b
        .post("/api/admin/ban", json!({"user": "ops"}), Some(&root))
        .await;
    assert_eq!(s, 400, "not oneself");
    let (s, _) = b
        .post("/api/admin/unban", json!({"user": "dan"}), Some(&root))
        .await;
    assert_eq!(s, 200);
    assert!(b.try_connect(&td, Encoding::Json).await.is_ok());
    assert!(
        b.metric("shoal_auth_failures_total{reason=\"banned\"}")
            .await
            >= 2.0
    );

    // Every action in the audit log, newest first.
    let (s, v) = b.get("/api/admin/audit", Some(&root)).await;
    assert_eq!(s, 200);
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["unban", "ban", "delete", "moderate", "revoke", "disconnect"],
        "{v}"
    );
    assert!(v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .all(|e| e["actor"] == "ops"));
    bystander_served(&b).await;
}

#[tokio::test]
async fn the_console_sees_and_acts_on_every_node() {
    let redis = Redis::start().await;
    let node = |id: &'static str| {
        let url = redis.url();
        async move {
            Broker::start_with(move |c| {
                c.cluster.bus = shoal_broker::config::BusKind::Redis;
                c.cluster.redis_url = Some(url.parse().expect("url"));
                c.server.node_id = Some(id.into());
                c.auth.admins = vec!["ops".into()];
            })
            .await
        }
    };
    let (a, b) = (node("node-a").await, node("node-b").await);
    a.health_becomes(200).await;
    b.health_becomes(200).await;
    let root = token_for("ops");
    let mut bob = b.connect(&token_for("bob"), Encoding::Json).await;
    bob.join("lobby").await;
    let mut alice = a.connect(&token_for("alice"), Encoding::Json).await;
    alice.join("lobby").await;
    // Both nodes announce themselves within a heartbeat.
    let mut v = Value::Null;
    for _ in 0..100 {
        v = a.get("/api/admin/overview", Some(&root)).await.1;
        if v["nodes"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let conns = listed(&v);
    assert!(conns.iter().any(|c| c.0 == "node-b" && c.1 == "bob"), "{v}");
    assert!(conns.iter().any(|c| c.0 == "node-a" && c.1 == "alice"));
    let id = conns
        .iter()
        .find(|c| c.1 == "bob")
        .map(|c| c.2)
        .expect("bob");
    // Through node A, on node B.
    let (s, v) = a
        .post(
            "/api/admin/disconnect",
            json!({"node": "node-b", "id": id}),
            Some(&root),
        )
        .await;
    assert_eq!((s, v["closed"].as_u64()), (200, Some(1)), "{v}");
    assert!(matches!(bob.closed().await, End::Closed(Some(4007))));
    // A server ban through node A disconnects alice on A and refuses her on B.
    let mut alice_b = b.connect(&token_for("alice"), Encoding::Json).await;
    let (s, _) = a
        .post("/api/admin/ban", json!({"user": "alice"}), Some(&root))
        .await;
    assert_eq!(s, 200);
    assert!(matches!(alice.closed().await, End::Closed(Some(4007))));
    assert!(matches!(alice_b.closed().await, End::Closed(Some(4007))));
    let mut refused = None;
    for _ in 0..50 {
        refused = b
            .try_connect(&token_for("alice"), Encoding::Json)
            .await
            .err();
        if refused.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(refused.map(|e| e.0), Some(401));
}
