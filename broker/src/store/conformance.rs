//! Behaviour every [`Store`] must have, as checks that panic on a
//! difference. The SQLite unit tests and the PostgreSQL integration test
//! run the same checks, so the two stores cannot drift apart.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use shoal_proto::{codec::body_to_storage, MarkState, Receipt};

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
    let (p1, more) = s.history("r", None, 2).await.expect("h");
    assert_eq!(p1.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![5, 4]);
    assert!(more);
    let (p3, more) = s.history("r", Some(2), 2).await.expect("h");
    assert_eq!(p3.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1]);
    assert!(!more);

    // Delete: only the sender; then out of history and search, flagged in replay.
    let out = s
        .write_batch(vec![
            WriteOp::Delete {
                room: "r".into(),
                seq: 1,
                user: "bob".into(),
            },
            WriteOp::Delete {
                room: "r".into(),
                seq: 1,
                user: "alice".into(),
            },
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
            OpOutcome::NotFound,
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
    let r = s.replay("r", 0, 5, 100).await.expect("replay");
    assert_eq!(r.entries.len(), 5);
    assert!(r.entries[0].deleted);

    // Receipts and unread: bob read up to 3; messages 4 (his own) and 5 remain.
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
    assert_eq!((rooms[0].last_seq, rooms[0].unread), (5, 1));
    assert!(s.is_member("r", "bob").await.expect("m"));
    assert!(!s.is_member("r", "alice").await.expect("m"));

    // Retention keeps the newest 2 and records the floor.
    let policy: RetentionPolicy = Arc::new(|_: &str| {
        Some(Retention {
            max_messages: Some(2),
            min_ts: None,
        })
    });
    assert_eq!(s.apply_retention(policy).await.expect("ret"), 3);
    let r = s.replay("r", 0, 5, 100).await.expect("replay");
    assert_eq!(r.floor, 3);
    assert_eq!(
        r.entries.iter().map(|e| e.msg.seq).collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert!(s.search("r", "apple", 10, 0).await.expect("s").is_empty());
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
