//! Behaviour every [`Store`] must have, as checks that panic on a
//! difference. The SQLite unit tests and the PostgreSQL integration test
//! run the same checks, so the two stores cannot drift apart.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use shoal_proto::{
    codec::{body_text, body_to_storage},
    entry::{Reaction, ReplyRef, ThreadSummary},
    EventKind, MarkState, Meta, Receipt,
};

use super::{
    FileRecord, NewMsg, OpOutcome, Retention, RetentionPolicy, Store, StoreError, WriteOp,
};

/// Users and revocations on an empty store.
pub async fn users(s: &dyn Store) {
    s.create_user("alice", "h1").await.expect("create");
    assert!(matches!(
        s.create_user("alice", "h2").await,
        Err(StoreError::Conflict)
    ));
    s.revoke("j1", 100).await.expect("revoke");
    s.revoke("j2", 10).await.expect("revoke");
    for taken in ["Alice", "ALICE"] {
        assert!(matches!(
            s.create_user(taken, "h3").await,
            Err(StoreError::Conflict)
        ));
    }
    for spelling in ["alice", "ALICE"] {
        assert_eq!(
            s.password_hash(spelling).await.expect("q"),
            Some(("alice".into(), "h1".into()))
        );
    }
    assert_eq!(s.password_hash("nobody").await.expect("q"), None);
    // Users seen with a token: accounts without a password, which keep
    // their names from being registered; existing accounts are untouched.
    s.remember_users(&["seen".into(), "alice".into(), "Seen2".into()])
        .await
        .expect("remember");
    assert!(s.user_exists("seen").await.expect("q"));
    assert!(s.user_exists("alice").await.expect("q"));
    assert!(!s.user_exists("nobody").await.expect("q"));
    assert!(matches!(
        s.create_user("SEEN", "h4").await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        s.password_hash("alice").await.expect("q"),
        Some(("alice".into(), "h1".into()))
    );
    assert_eq!(s.list_users().await.expect("q").len(), 3);
    assert_eq!(
        s.revoked(50).await.expect("q"),
        vec![("j1".to_string(), 100)]
    );
}

/// A message op with searchable text and a cid.
pub fn msg(room: &str, seq: u64, from: &str, text: &str) -> WriteOp {
    WriteOp::Msg(NewMsg {
        room: room.into(),
        seq,
        from: from.into(),
        ts: seq * 1000,
        body: body_to_storage(&serde_json::json!({ "text": text })),
        text: Some(text.into()),
        cid: Some(format!("c{seq}")),
        parties: None,
        meta: Meta::default(),
    })
}

/// An entry with metadata: an event (body as given) or a message that
/// replies or mentions.
pub fn entry(room: &str, seq: u64, from: &str, body: serde_json::Value, meta: Meta) -> WriteOp {
    WriteOp::Msg(NewMsg {
        room: room.into(),
        seq,
        from: from.into(),
        ts: seq * 1000,
        text: body_text(&body).map(str::to_string),
        body: body_to_storage(&body),
        cid: None,
        parties: None,
        meta,
    })
}

/// Messages, history paging, delete, search, replay, receipts, unread,
/// membership and retention, on an empty store.
pub async fn messages(s: &dyn Store) {
    let words = [
        "apple pie",
        "banana split",
        "apple apple tart",
        // A NUL in the text (PostgreSQL refuses NUL in text values).
        "cherry\u{0}stone",
        "plum",
    ];
    let mut ops: Vec<WriteOp> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            msg(
                "r",
                i as u64 + 1,
                if i % 2 == 0 { "alice" } else { "bob" },
                w,
            )
        })
        .collect();
    ops.push(WriteOp::Join {
        room: "r".into(),
        user: "bob".into(),
        max: 10,
    });
    s.write_batch(ops).await.expect("batch");
    // A user's memberships are capped: carol may hold one, then only
    // rejoin it.
    for (room, expected) in [
        ("c1", OpOutcome::Done),
        ("c2", OpOutcome::NotFound),
        ("c1", OpOutcome::Unchanged),
    ] {
        let join = WriteOp::Join {
            room: room.into(),
            user: "carol".into(),
            max: 1,
        };
        assert_eq!(
            s.write_batch(vec![join]).await.expect("join"),
            vec![expected],
            "{room}"
        );
    }
    let head = s.room_head("r", 0).await.expect("head");
    assert_eq!(head.last_seq, 5);
    assert_eq!(head.cids.len(), 5);
    assert_eq!(s.room_head("nope", 0).await.expect("head").last_seq, 0);

    // History pages newest first, with a "more" flag.
    let (p1, more) = s.history("r", None, 2, "bob").await.expect("h");
    assert_eq!(p1.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![5, 4]);
    assert!(more);
    let (p3, more) = s.history("r", Some(2), 2, "bob").await.expect("h");
    assert_eq!(p3.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1]);
    assert!(!more);

    // Delete (an event): only the sender's has an effect; then out of
    // history and search, flagged in replay.
    let del = |seq, from| {
        entry(
            "r",
            seq,
            from,
            serde_json::Value::Null,
            Meta::event(EventKind::Delete, 1),
        )
    };
    let out = s
        .write_batch(vec![
            del(6, "bob"),
            del(7, "alice"),
            WriteOp::Mark {
                room: "r".into(),
                user: "bob".into(),
                seq: 3,
                state: MarkState::Read,
            },
            WriteOp::Mark {
                room: "r".into(),
                user: "bob".into(),
                seq: 2,
                state: MarkState::Read,
            },
        ])
        .await
        .expect("batch");
    assert_eq!(
        out,
        vec![
            OpOutcome::Done,
            OpOutcome::Done,
            OpOutcome::Done,
            OpOutcome::Unchanged
        ]
    );
    let hits = s.search("r", "apple", 10, 0).await.expect("search");
    assert_eq!(hits.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
    assert!(s.search("r", "\"  OR * NEAR(", 10, 0).await.is_ok());
    let hits = s.search("r", "cherry", 10, 0).await.expect("search");
    assert_eq!(hits.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4]);
    assert!(s.search("r", "a\u{0}b", 10, 0).await.is_ok());
    assert!(s
        .search("other", "apple", 10, 0)
        .await
        .expect("s")
        .is_empty());
    let r = s.replay("r", 0, 7, 100).await.expect("replay");
    assert_eq!(r.entries.len(), 7);
    assert!(r.entries[0].deleted);
    assert_eq!(r.entries[6].meta, Meta::event(EventKind::Delete, 1));
    // History shows messages only, never events.
    let (page, _) = s.history("r", None, 10, "bob").await.expect("h");
    assert_eq!(
        page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 4, 3, 2]
    );

    // Receipts and unread: bob read up to 3; messages 4 (his own) and 5
    // remain (the events 6 and 7 are not messages).
    let rec = s.receipts("r").await.expect("rec");
    assert_eq!(
        rec,
        vec![Receipt {
            user: "bob".into(),
            delivered: 3,
            read: 3
        }]
    );
    let rooms = s.user_rooms("bob").await.expect("rooms");
    assert_eq!(rooms.len(), 1);
    assert_eq!((rooms[0].last_seq, rooms[0].unread), (7, 1));
    assert!(s.is_member("r", "bob").await.expect("m"));
    assert!(!s.is_member("r", "alice").await.expect("m"));

    // Retention keeps the newest 2 and records the floor.
    let policy: RetentionPolicy = Arc::new(|_: &str| {
        Some(Retention {
            max_messages: Some(2),
            min_ts: None,
        })
    });
    assert_eq!(s.apply_retention(policy).await.expect("ret"), 5);
    let r = s.replay("r", 0, 7, 100).await.expect("replay");
    assert_eq!(r.floor, 5);
    assert_eq!(
        r.entries.iter().map(|e| e.msg.seq).collect::<Vec<_>>(),
        vec![6, 7]
    );
    assert!(s.search("r", "apple", 10, 0).await.expect("s").is_empty());
}

/// Edits (versions kept, search follows), reactions (toggles, counts,
/// `me`), replies and threads, mentions (counted as unread mentions), and
/// the rules for events that break them, on an empty store.
pub async fn events(s: &dyn Store) {
    let text = |t: &str| serde_json::json!({ "text": t });
    let ev = |seq, from, body, kind, target| entry("t", seq, from, body, Meta::event(kind, target));
    let quote = ReplyRef {
        seq: 1,
        from: "alice".into(),
        preview: "first draft".into(),
    };
    let ops = vec![
        WriteOp::Join {
            room: "t".into(),
            user: "bob".into(),
            max: 10,
        },
        entry("t", 1, "alice", text("first draft"), Meta::default()),
        // 2: bob replies to 1 and mentions alice; 3: alice mentions bob.
        entry(
            "t",
            2,
            "bob",
            text("@alice nice"),
            Meta {
                reply_to: Some(quote.clone()),
                mentions: vec!["alice".into()],
                ..Meta::default()
            },
        ),
        entry(
            "t",
            3,
            "alice",
            text("thanks @bob"),
            Meta {
                mentions: vec!["bob".into()],
                ..Meta::default()
            },
        ),
        ev(4, "alice", text("second draft"), EventKind::Edit, 1),
        ev(5, "alice", text("final words"), EventKind::Edit, 1),
        // Not bob's message: no effect.
        ev(6, "bob", text("hijacked"), EventKind::Edit, 1),
        ev(7, "bob", "👍".into(), EventKind::React, 1),
        ev(8, "alice", "👍".into(), EventKind::React, 1),
        ev(9, "alice", "🎉".into(), EventKind::React, 1),
        ev(10, "alice", "🎉".into(), EventKind::Unreact, 1),
        // A second reply, then deleted: the thread counts one.
        entry(
            "t",
            11,
            "carol",
            text("me too"),
            Meta {
                reply_to: Some(quote.clone()),
                ..Meta::default()
            },
        ),
        ev(12, "carol", serde_json::Value::Null, EventKind::Delete, 11),
        // Events on a deleted message have no effect.
        ev(13, "carol", text("ghost"), EventKind::Edit, 11),
        ev(14, "bob", "👍".into(), EventKind::React, 11),
    ];
    let out = s.write_batch(ops).await.expect("batch");
    assert!(out.iter().skip(1).all(|o| *o == OpOutcome::Done));

    let (page, more) = s.history("t", None, 10, "bob").await.expect("h");
    assert!(!more);
    assert_eq!(
        page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let first = &page[2];
    assert_eq!(first.body, text("final words"));
    assert_eq!(first.edited_ts, Some(5000));
    assert_eq!(
        first.reactions,
        vec![Reaction {
            emoji: "👍".into(),
            count: 2,
            me: true
        }]
    );
    assert_eq!(
        first.thread,
        Some(ThreadSummary {
            count: 1,
            last_seq: 2,
            last_ts: 2000
        })
    );
    assert_eq!(page[1].reply_to, Some(quote));
    assert_eq!(page[1].mentions, vec!["alice".to_string()]);
    let (as_carol, _) = s.history("t", None, 10, "carol").await.expect("h");
    assert!(!as_carol[2].reactions[0].me);

    // Previous versions, oldest first; search finds the current text only.
    let versions = s.edits("t", 1).await.expect("edits");
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.ts, v.body.clone()))
            .collect::<Vec<_>>(),
        vec![(1000, text("first draft")), (4000, text("second draft"))]
    );
    assert!(s.edits("t", 2).await.expect("edits").is_empty());
    assert_eq!(
        s.search("t", "final", 10, 0)
            .await
            .expect("s")
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert!(s.search("t", "draft", 10, 0).await.expect("s").is_empty());
    assert!(s
        .search("t", "hijacked", 10, 0)
        .await
        .expect("s")
        .is_empty());

    // The thread of 1: one reply left.
    let (replies, more) = s.thread("t", 1, None, 10, "bob").await.expect("thread");
    assert!(!more);
    assert_eq!(replies.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);

    // What events are checked against.
    let t = s.target("t", 1, "alice").await.expect("t").expect("some");
    assert_eq!(
        (t.from.as_str(), t.deleted, t.event),
        ("alice", false, false)
    );
    assert_eq!(t.reactions, vec!["👍".to_string()]);
    assert_eq!(t.mine, vec!["👍".to_string()]);
    let t = s.target("t", 11, "carol").await.expect("t").expect("some");
    assert!(t.deleted);
    assert!(t.reactions.is_empty(), "no reaction on a deleted message");
    assert!(
        s.target("t", 4, "alice")
            .await
            .expect("t")
            .expect("some")
            .event
    );
    assert!(s.target("t", 99, "alice").await.expect("t").is_none());

    // Replay carries every event with its metadata, in seq order.
    let r = s.replay("t", 3, 14, 100).await.expect("replay");
    assert_eq!(r.entries.len(), 11);
    assert_eq!(r.entries[0].meta, Meta::event(EventKind::Edit, 1));
    assert_eq!(r.entries[3].msg.body, serde_json::json!("👍"));

    // Mentions: bob has read nothing; alice's message 3 mentions him.
    let rooms = s.user_rooms("bob").await.expect("rooms");
    assert_eq!((rooms[0].unread, rooms[0].mentions), (2, 1));
    s.write_batch(vec![WriteOp::Mark {
        room: "t".into(),
        user: "bob".into(),
        seq: 3,
        state: MarkState::Read,
    }])
    .await
    .expect("mark");
    let rooms = s.user_rooms("bob").await.expect("rooms");
    assert_eq!((rooms[0].unread, rooms[0].mentions), (0, 0));

    // Retention takes versions and reactions with their message.
    let policy: RetentionPolicy = Arc::new(|_: &str| {
        Some(Retention {
            max_messages: Some(13),
            min_ts: None,
        })
    });
    s.apply_retention(policy).await.expect("ret");
    assert!(s.edits("t", 1).await.expect("edits").is_empty());
    assert!(s.target("t", 1, "bob").await.expect("t").is_none());
}

/// Room creation and moderation entries: the access rules they leave
/// (the same as `hub::acl::Acl::apply`), admin deletions, the audit log.
pub async fn moderation(s: &dyn Store) {
    use shoal_proto::entry::{ModAction, Role};
    let act = |seq, from: &str, kind, what: ModAction| {
        entry(
            "m",
            seq,
            from,
            what.to_body(),
            Meta {
                kind: Some(kind),
                ..Meta::default()
            },
        )
    };
    let on = |u: &str| ModAction {
        user: Some(u.into()),
        ..Default::default()
    };
    assert_eq!(s.room_acl("m").await.expect("acl"), None, "never created");
    s.write_batch(vec![
        act(
            1,
            "olive",
            EventKind::Create,
            ModAction {
                private: Some(true),
                topic: Some("plans".into()),
                title: Some("Plans HQ".into()),
                ..Default::default()
            },
        ),
        // A second create changes nothing.
        act(2, "mallory", EventKind::Create, ModAction::default()),
        act(3, "olive", EventKind::Invite, on("ada")),
        act(4, "olive", EventKind::Invite, on("bob")),
        act(
            5,
            "olive",
            EventKind::Role,
            ModAction {
                user: Some("ada".into()),
                role: Some(Role::Admin),
                ..Default::default()
            },
        ),
        entry(
            "m",
            6,
            "bob",
            serde_json::json!({"text": "hi"}),
            Meta::default(),
        ),
        // ada (admin) deletes bob's message; bob cannot delete olive's.
        entry(
            "m",
            7,
            "ada",
            serde_json::Value::Null,
            Meta::event(EventKind::Delete, 6),
        ),
        act(
            8,
            "ada",
            EventKind::Mute,
            ModAction {
                user: Some("bob".into()),
                until: Some(99),
                ..Default::default()
            },
        ),
        act(9, "ada", EventKind::Ban, on("carl")),
        act(10, "ada", EventKind::Kick, on("bob")),
        // The owner cannot be kicked, banned or muted.
        act(11, "ada", EventKind::Ban, on("olive")),
        act(
            12,
            "olive",
            EventKind::Topic,
            ModAction {
                topic: Some("new".into()),
                ..Default::default()
            },
        ),
        act(13, "olive", EventKind::Owner, on("ada")),
    ])
    .await
    .expect("batch");
    let acl = s.room_acl("m").await.expect("acl").expect("created");
    assert!(acl.private);
    assert_eq!(
        (acl.owner.as_str(), acl.topic.as_str(), acl.title.as_str()),
        ("ada", "new", "Plans HQ"),
        "a topic action changes only what it names"
    );
    let mut roles = acl.roles.clone();
    roles.sort();
    assert_eq!(roles, vec![("olive".to_string(), Role::Admin)]);
    assert_eq!(acl.bans, vec![("carl".to_string(), None)]);
    assert_eq!(acl.mutes, vec![("bob".to_string(), Some(99))]);
    let (page, _) = s.history("m", None, 10, "ada").await.expect("h");
    assert!(page.is_empty(), "bob's message deleted by an admin");
    assert!(!s.is_member("m", "bob").await.expect("m"), "kicked");
    assert!(s.is_member("m", "olive").await.expect("m"), "the creator");
    let audit = s.audit("m", None, 100).await.expect("audit");
    assert_eq!(
        audit.iter().map(|e| e.msg.seq).collect::<Vec<_>>(),
        vec![13, 12, 11, 10, 9, 8, 7, 5, 4, 3, 2, 1]
    );
    assert_eq!(audit[0].meta.kind, Some(EventKind::Owner));
    let rest = s.audit("m", Some(9), 2).await.expect("audit");
    assert_eq!(
        rest.iter().map(|e| e.msg.seq).collect::<Vec<_>>(),
        vec![8, 7]
    );
    // Unban, unmute; an invite lifts a ban.
    s.write_batch(vec![
        act(14, "ada", EventKind::Unmute, on("bob")),
        act(15, "ada", EventKind::Invite, on("carl")),
    ])
    .await
    .expect("batch");
    let acl = s.room_acl("m").await.expect("acl").expect("created");
    assert!(acl.bans.is_empty() && acl.mutes.is_empty(), "{acl:?}");
    // The operators' audit log, newest first.
    for (ts, action) in [(1, "disconnect"), (2, "revoke")] {
        s.admin_record(super::AdminEntry {
            ts,
            actor: "root".into(),
            action: action.into(),
            detail: "{}".into(),
        })
        .await
        .expect("record");
    }
    let log = s.admin_audit(10).await.expect("audit");
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["revoke", "disconnect"]
    );
    assert_eq!(s.admin_audit(1).await.expect("audit").len(), 1);
}

/// Attachments round-trip.
pub async fn files(s: &dyn Store) {
    let f = FileRecord {
        id: "a".repeat(32),
        room: "r".into(),
        owner: "alice".into(),
        name: "x.png".into(),
        content_type: "image/png".into(),
        data: vec![1, 2, 3],
        created_ms: 5,
    };
    s.put_file(f.clone()).await.expect("put");
    assert_eq!(s.get_file(&f.id).await.expect("get"), Some(f.clone()));
    assert_eq!(s.get_file("nope").await.expect("get"), None);
    // The quota counts an owner's bytes; retention ages files out by room.
    let newer = FileRecord {
        id: "b".repeat(32),
        data: vec![9; 5],
        created_ms: 50,
        ..f.clone()
    };
    s.put_file(newer.clone()).await.expect("put");
    assert_eq!(s.file_usage("alice").await.expect("usage"), 8);
    assert_eq!(s.file_usage("bob").await.expect("usage"), 0);
    let policy: RetentionPolicy = Arc::new(|room: &str| {
        (room == "r").then_some(Retention {
            max_messages: None,
            min_ts: Some(10),
        })
    });
    assert_eq!(s.expire_files(policy).await.expect("expire"), 1);
    assert_eq!(s.get_file(&f.id).await.expect("get"), None);
    assert_eq!(s.get_file(&newer.id).await.expect("get"), Some(newer));
    assert_eq!(s.file_usage("alice").await.expect("usage"), 5);
}
