//! Created rooms, private rooms, roles and moderation (issue 20): every
//! action over the socket and REST, refusals on every read path, the
//! audit log, and rules that survive a restart.

mod common;

use common::*;
use serde_json::{json, Value};
use shoal_proto::{
    entry::{ModAction, Role},
    sio::reply_id,
    ClientFrame, Encoding, EventKind, ServerFrame,
};

/// Send a request with a fresh id and wait for the frame answering it.
async fn ask(c: &mut Client, f: impl FnOnce(Option<u64>) -> ClientFrame) -> ServerFrame {
    let id = c.id();
    c.send(&f(id)).await;
    c.recv_until(move |x| id.is_some() && reply_id(x) == id)
        .await
}

fn moderate(room: &str, action: &str, what: ModAction) -> impl FnOnce(Option<u64>) -> ClientFrame {
    let (room, action) = (room.to_string(), action.to_string());
    move |id| ClientFrame::Moderate {
        id,
        room,
        action,
        what,
    }
}

fn on(user: &str) -> ModAction {
    ModAction {
        user: Some(user.into()),
        ..Default::default()
    }
}

fn create(room: &str, private: bool) -> impl FnOnce(Option<u64>) -> ClientFrame {
    let room = room.to_string();
    move |id| ClientFrame::Create {
        id,
        room,
        private,
        topic: Some("the plan".into()),
        title: None,
    }
}

fn code(f: &ServerFrame) -> u16 {
    match f {
        ServerFrame::Ack { .. } | ServerFrame::Joined { .. } => 0,
        ServerFrame::Error { code, .. } => *code,
        f => panic!("{f:?}"),
    }
}

async fn try_join(c: &mut Client, room: &str) -> u16 {
    let room = room.to_string();
    code(
        &ask(c, move |id| ClientFrame::Join {
            id,
            room,
            since: None,
        })
        .await,
    )
}

#[tokio::test]
async fn a_private_room_is_created_used_and_moderated() {
    let b = Broker::start().await;
    let (ta, tb, tc) = (
        b.user("alice").await,
        b.user("bob").await,
        b.user("carol").await,
    );
    let mut a = b.connect(&ta, Encoding::Json).await;
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    let mut c = b.connect(&tc, Encoding::Json).await;

    // Created once; the creator owns it.
    assert_eq!(code(&ask(&mut a, create("team", true)).await), 0);
    assert_eq!(code(&ask(&mut o, create("team", false)).await), 409);
    assert_eq!(code(&ask(&mut a, create("dm:alice:bob", true)).await), 400);
    // Members only: refused on every read path for a non-member.
    assert_eq!(try_join(&mut o, "team").await, 403);
    let members = |id| ClientFrame::Members {
        id,
        room: "team".into(),
    };
    let history = |id| ClientFrame::History {
        id,
        room: "team".into(),
        before: None,
        limit: None,
    };
    let thread = |id| ClientFrame::Thread {
        id,
        room: "team".into(),
        seq: 1,
        before: None,
        limit: None,
    };
    assert_eq!(code(&ask(&mut o, members).await), 403, "members");
    assert_eq!(code(&ask(&mut o, history).await), 403, "history");
    assert_eq!(code(&ask(&mut o, thread).await), 403, "thread");
    for path in [
        "/api/rooms/team/messages",
        "/api/rooms/team/search?q=x",
        "/api/rooms/team/messages/1/thread",
        "/api/rooms/team/messages/1/edits",
    ] {
        let (s, v) = b.get(path, Some(&tb)).await;
        assert_eq!(s, 403, "{path}: {v}");
    }
    let (s, _) = b
        .post("/api/files?room=team&name=x.txt", json!("x"), Some(&tb))
        .await;
    assert!(s == 403 || s == 415, "upload by a non-member: {s}");
    // Invited: bob may join. Only admins invite.
    assert_eq!(
        code(&ask(&mut o, moderate("team", "invite", on("carol"))).await),
        403
    );
    assert_eq!(
        code(&ask(&mut a, moderate("team", "invite", on("bob"))).await),
        0
    );
    assert_eq!(
        code(&ask(&mut a, moderate("team", "invite", on("nobody"))).await),
        404
    );
    a.join("team").await;
    o.join("team").await;
    let (s, _) = b.get("/api/rooms/team/messages", Some(&tb)).await;
    assert_eq!(s, 200);

    // Roles: the owner makes bob an admin; bob invites carol; a member may
    // not kick; an admin may not kick the owner.
    let admin = ModAction {
        user: Some("bob".into()),
        role: Some(Role::Admin),
        ..Default::default()
    };
    assert_eq!(
        code(&ask(&mut o, moderate("team", "role", admin.clone())).await),
        403
    );
    assert_eq!(code(&ask(&mut a, moderate("team", "role", admin)).await), 0);
    assert_eq!(
        code(&ask(&mut o, moderate("team", "invite", on("carol"))).await),
        0
    );
    c.join("team").await;
    assert_eq!(
        code(&ask(&mut c, moderate("team", "kick", on("bob"))).await),
        403
    );
    assert_eq!(
        code(&ask(&mut o, moderate("team", "kick", on("alice"))).await),
        403
    );
    assert_eq!(
        code(&ask(&mut o, moderate("team", "dance", on("alice"))).await),
        400
    );

    // Mute: carol reads but cannot publish; unmuted, she can.
    assert_eq!(
        code(&ask(&mut o, moderate("team", "mute", on("carol"))).await),
        0
    );
    assert_eq!(code(&c.publish("team", json!("hello?")).await), 403);
    let seq = match a.publish("team", json!("can you read this")).await {
        ServerFrame::Ack { seq, .. } => seq,
        f => panic!("{f:?}"),
    };
    c.recv_until(move |f| matches!(f, ServerFrame::Msg { seq: s, .. } if *s == seq))
        .await;
    assert_eq!(
        code(&ask(&mut o, moderate("team", "unmute", on("carol"))).await),
        0
    );
    let carols = match c.publish("team", json!("spam spam")).await {
        ServerFrame::Ack { seq, .. } => seq,
        f => panic!("{f:?}"),
    };
    // An admin deletes anyone's message.
    match ask(&mut o, |id| ClientFrame::Delete {
        id,
        room: "team".into(),
        seq: carols,
    })
    .await
    {
        ServerFrame::Deleted { seq, .. } => assert_eq!(seq, carols),
        f => panic!("{f:?}"),
    }

    // Kick: carol's connection is told, and is out at once; a private
    // room needs a new invite.
    assert_eq!(
        code(&ask(&mut o, moderate("team", "kick", on("carol"))).await),
        0
    );
    match c
        .recv_until(|f| matches!(f, ServerFrame::Left { .. }))
        .await
    {
        ServerFrame::Left { room, reason, id } => {
            assert_eq!(
                (room.as_str(), reason.as_deref(), id),
                ("team", Some("kick"), None)
            )
        }
        f => panic!("{f:?}"),
    }
    assert_eq!(code(&c.publish("team", json!("still here?")).await), 403);
    assert_eq!(try_join(&mut c, "team").await, 403);
    let (s, _) = b.get("/api/rooms/team/messages", Some(&tc)).await;
    assert_eq!(s, 403);

    // Ban with an end: even an invite-less rejoin attempt is refused as a ban.
    let ban = ModAction {
        user: Some("carol".into()),
        until: Some(now() * 1000 + 3_600_000),
        reason: Some("spam".into()),
        ..Default::default()
    };
    assert_eq!(code(&ask(&mut a, moderate("team", "ban", ban)).await), 0);
    match ask(&mut c, |id| ClientFrame::Join {
        id,
        room: "team".into(),
        since: None,
    })
    .await
    {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, 403);
            assert!(message.contains("banned"), "{message}");
        }
        f => panic!("{f:?}"),
    }
    // A ban in the past is refused as a request.
    let past = ModAction {
        user: Some("carol".into()),
        until: Some(1),
        ..Default::default()
    };
    assert_eq!(code(&ask(&mut a, moderate("team", "ban", past)).await), 400);

    // Topic and name, then ownership to bob: alice becomes an admin.
    let topic = ModAction {
        topic: Some("new plan".into()),
        title: Some("The Team".into()),
        ..Default::default()
    };
    assert_eq!(
        code(&ask(&mut o, moderate("team", "topic", topic)).await),
        0
    );
    let (s, v) = b.get("/api/rooms/team/info", Some(&ta)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["topic"], &v["title"], &v["private"], &v["you"]),
        (
            &json!("new plan"),
            &json!("The Team"),
            &json!(true),
            &json!("owner")
        )
    );
    let long = ModAction {
        title: Some("x".repeat(65)),
        ..Default::default()
    };
    assert_eq!(
        code(&ask(&mut o, moderate("team", "topic", long)).await),
        400
    );
    assert_eq!(
        code(&ask(&mut a, moderate("team", "owner", on("bob"))).await),
        0
    );
    assert_eq!(
        code(&ask(&mut a, moderate("team", "owner", on("alice"))).await),
        403
    );

    // The audit log: for admins, newest first, every action.
    let (s, v) = b.get("/api/rooms/team/audit", Some(&ta)).await;
    assert_eq!(s, 200, "{v}");
    let kinds: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "owner", "topic", "ban", "kick", "delete", "unmute", "mute", "invite", "role",
            "invite", "create"
        ],
        "{v}"
    );
    let (s, _) = b.get("/api/rooms/team/audit", Some(&tc)).await;
    assert_eq!(s, 403);

    // Every action is an entry of the log: a member back after a break
    // recovers them with since.
    let mut late = b.connect(&ta, Encoding::MsgPack).await;
    let (frames, _) = late.join_since("team", Some(seq)).await;
    let replayed: Vec<Option<EventKind>> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Msg { kind, .. } => Some(*kind),
            _ => None,
        })
        .filter(|k| k.is_some_and(EventKind::is_moderation))
        .collect();
    assert_eq!(
        replayed,
        [
            Some(EventKind::Unmute),
            Some(EventKind::Kick),
            Some(EventKind::Ban),
            Some(EventKind::Topic),
            Some(EventKind::Owner)
        ]
    );
    assert!(b.metric("shoal_frames_in_total{type=\"moderate\"}").await >= 10.0);
    bystander_served(&b).await;
}

#[tokio::test]
async fn rest_creation_and_open_rooms_stay_open() {
    let b = Broker::start().await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let (s, v) = b
        .post(
            "/api/rooms",
            json!({"room": "club", "topic": "welcome"}),
            Some(&ta),
        )
        .await;
    assert_eq!((s, v["room"].as_str()), (201, Some("club")), "{v}");
    let (s, _) = b
        .post("/api/rooms", json!({"room": "club"}), Some(&tb))
        .await;
    assert_eq!(s, 409);
    let (s, _) = b.post("/api/rooms", json!({"room": "x"}), None).await;
    assert_eq!(s, 401);
    let (s, _) = b
        .post("/api/rooms", json!({"room": "bad name!"}), Some(&ta))
        .await;
    assert_eq!(s, 400);
    let (s, _) = b
        .post("/api/rooms", json!({"room": "y", "extra": 1}), Some(&ta))
        .await;
    assert_eq!(s, 400);
    // A public created room: anyone joins; a room in use cannot be claimed.
    let mut o = b.connect(&tb, Encoding::Json).await;
    o.join("club").await;
    o.join("lobby").await;
    o.publish("lobby", json!("in use")).await;
    let (s, _) = b
        .post("/api/rooms", json!({"room": "lobby"}), Some(&ta))
        .await;
    assert_eq!(s, 409);
    // An open room has no moderators.
    let mut a = b.connect(&ta, Encoding::Json).await;
    assert_eq!(
        code(&ask(&mut a, moderate("lobby", "kick", on("bob"))).await),
        404
    );
}

#[tokio::test]
async fn rules_survive_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let mut p = Proc::start(dir.path(), &[]).await;
    let (ta, tb) = (p.user("alice").await, p.user("bob").await);
    let mut a = p.connect(&ta, Encoding::Json).await;
    assert_eq!(code(&ask(&mut a, create("vault", true)).await), 0);
    assert_eq!(code(&ask(&mut a, create("agora", false)).await), 0);
    assert_eq!(
        code(&ask(&mut a, moderate("agora", "ban", on("bob"))).await),
        0
    );
    let mute = on("bob");
    assert_eq!(
        code(&ask(&mut a, moderate("vault", "invite", on("bob"))).await),
        0
    );
    assert_eq!(code(&ask(&mut a, moderate("vault", "mute", mute)).await), 0);
    drop(a);
    p.kill9();
    let p = Proc::start_at(p.addr, dir.path(), &[]).await;
    let mut o = p.connect(&tb, Encoding::Json).await;
    assert_eq!(try_join(&mut o, "agora").await, 403, "still banned");
    assert_eq!(try_join(&mut o, "vault").await, 0, "still invited");
    assert_eq!(
        code(&o.publish("vault", json!("hi")).await),
        403,
        "still muted"
    );
    let tc = p.user("carol").await;
    let mut c = p.connect(&tc, Encoding::Json).await;
    assert_eq!(try_join(&mut c, "vault").await, 403, "still private");
    let (s, v): (u16, Value) = p.get("/api/rooms/vault/audit", Some(&ta)).await;
    assert_eq!(
        (s, v["entries"].as_array().map(Vec::len)),
        (200, Some(3)),
        "{v}"
    );
}

#[tokio::test]
async fn a_closed_namespace_has_only_created_rooms() {
    let b = Broker::start_with(|c| {
        c.rooms.namespaces = vec!["club:open=off".parse().expect("spec")];
    })
    .await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut o = b.connect(&tb, Encoding::Json).await;
    assert_eq!(try_join(&mut o, "club:chess").await, 404);
    let (s, _) = b.get("/api/rooms/club:chess/messages", Some(&tb)).await;
    assert_eq!(s, 404);
    // Other namespaces stay open.
    assert_eq!(try_join(&mut o, "lobby").await, 0);
    let mut a = b.connect(&ta, Encoding::Json).await;
    assert_eq!(code(&ask(&mut a, create("club:chess", false)).await), 0);
    assert_eq!(try_join(&mut o, "club:chess").await, 0);
    assert_eq!(code(&o.publish("club:chess", json!("e4")).await), 0);
}
