//! Chat features on one node (issue 19): edits, reactions, replies and
//! threads, mentions, their bounds and authorization, and recovery of all
//! of them with `since`, over both encodings.

mod common;

use common::*;
use serde_json::{json, Value};
use shoal_proto::{entry::ReplyRef, sio::reply_id, ClientFrame, Encoding, EventKind, ServerFrame};

/// A client that keeps the frames a request's wait skipped over, so a
/// room's entries delivered before a reply are still there to check.
struct Chat {
    c: Client,
    kept: Vec<ServerFrame>,
}

impl Chat {
    async fn open(b: &Broker, token: &str, enc: Encoding) -> Chat {
        Chat {
            c: b.connect(token, enc).await,
            kept: vec![],
        }
    }

    /// Send a request with a fresh id and wait for the frame answering it.
    async fn ask(&mut self, f: impl FnOnce(Option<u64>) -> ClientFrame) -> ServerFrame {
        let id = self.c.id();
        self.c.send(&f(id)).await;
        loop {
            let x = self.c.recv().await;
            if id.is_some() && reply_id(&x) == id {
                return x;
            }
            self.kept.push(x);
        }
    }

    /// The log entry with seq `seq` (kept or next to arrive).
    async fn entry_at(&mut self, seq: u64) -> ServerFrame {
        let at = |f: &ServerFrame| matches!(f, ServerFrame::Msg { seq: s, .. } if *s == seq);
        if let Some(i) = self.kept.iter().position(at) {
            return self.kept.remove(i);
        }
        self.c.recv_until(at).await
    }

    async fn join(&mut self, room: &str) {
        self.c.join(room).await;
    }

    async fn publish(&mut self, room: &str, body: Value) -> ServerFrame {
        let room = room.to_string();
        self.ask(move |id| ClientFrame::Pub {
            id,
            room: Some(room),
            to: None,
            cid: None,
            body,
            reply_to: None,
        })
        .await
    }
}

fn edit(room: &str, seq: u64, body: Value) -> impl FnOnce(Option<u64>) -> ClientFrame {
    let room = room.to_string();
    move |id| ClientFrame::Edit {
        id,
        room,
        seq,
        body,
    }
}

fn react(room: &str, seq: u64, emoji: &str, on: bool) -> impl FnOnce(Option<u64>) -> ClientFrame {
    let (room, emoji) = (room.to_string(), emoji.to_string());
    move |id| ClientFrame::React {
        id,
        room,
        seq,
        emoji,
        on,
    }
}

fn reply(room: &str, to: u64, body: Value) -> impl FnOnce(Option<u64>) -> ClientFrame {
    let room = room.to_string();
    move |id| ClientFrame::Pub {
        id,
        room: Some(room),
        to: None,
        cid: None,
        body,
        reply_to: Some(to),
    }
}

fn acked(f: &ServerFrame) -> u64 {
    match f {
        ServerFrame::Ack { seq, .. } => *seq,
        f => panic!("not acked: {f:?}"),
    }
}

fn refused(f: &ServerFrame) -> u16 {
    match f {
        ServerFrame::Error { code, .. } => *code,
        f => panic!("not refused: {f:?}"),
    }
}

/// (seq, kind, target, body) of a log entry.
fn entry(f: &ServerFrame) -> Option<(u64, Option<EventKind>, Option<u64>, Value)> {
    match f {
        ServerFrame::Msg {
            seq,
            kind,
            target,
            body,
            ..
        } => Some((*seq, *kind, *target, body.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn edits_reactions_replies_threads_and_mentions_in_both_encodings() {
    let b = Broker::start().await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    for (ea, eb) in [
        (Encoding::Json, Encoding::MsgPack),
        (Encoding::MsgPack, Encoding::Json),
    ] {
        let room = format!("features-{ea:?}");
        let mut a = Chat::open(&b, &ta, ea).await;
        let mut o = Chat::open(&b, &tb, eb).await;
        a.join(&room).await;
        o.join(&room).await;

        // A mention of a member is recognised by the broker; @nobody is not one.
        let m1 = acked(
            &a.publish(&room, json!({"text": "hi @bob and @nobody"}))
                .await,
        );
        match o.entry_at(m1).await {
            ServerFrame::Msg { mentions, kind, .. } => {
                assert_eq!((mentions, kind), (vec!["bob".to_string()], None));
            }
            f => panic!("{f:?}"),
        }
        // A reply carries the quote.
        let m2 = acked(&o.ask(reply(&room, m1, json!({"text": "hello"}))).await);
        match a.entry_at(m2).await {
            ServerFrame::Msg { reply_to, .. } => assert_eq!(
                reply_to,
                Some(ReplyRef {
                    seq: m1,
                    from: "alice".into(),
                    preview: "hi @bob and @nobody".into()
                })
            ),
            f => panic!("{f:?}"),
        }
        // An edit and a reaction are entries of their own, seen by both.
        let e1 = acked(&a.ask(edit(&room, m1, json!({"text": "hi, edited"}))).await);
        let r1 = acked(&o.ask(react(&room, m1, "👍", true)).await);
        assert_eq!((e1, r1), (m2 + 1, m2 + 2));
        for c in [&mut a, &mut o] {
            assert_eq!(
                entry(&c.entry_at(e1).await),
                Some((
                    e1,
                    Some(EventKind::Edit),
                    Some(m1),
                    json!({"text": "hi, edited"})
                ))
            );
            assert_eq!(
                entry(&c.entry_at(r1).await),
                Some((r1, Some(EventKind::React), Some(m1), json!("👍")))
            );
        }

        // History shows the current state, as the viewer sees it.
        let (s, v) = b
            .get(&format!("/api/rooms/{room}/messages"), Some(&tb))
            .await;
        assert_eq!(s, 200, "{v}");
        let msgs = v["messages"].as_array().expect("messages");
        assert_eq!(msgs.len(), 2, "events are not messages: {v}");
        let first = &msgs[1];
        assert_eq!(first["body"], json!({"text": "hi, edited"}));
        assert!(first["edited_ts"].as_u64() >= first["ts"].as_u64());
        assert_eq!(
            first["reactions"],
            json!([{"emoji": "👍", "count": 1, "me": true}])
        );
        assert_eq!(first["thread"]["count"], 1);
        assert_eq!(first["thread"]["last_seq"], m2);
        assert_eq!(first["mentions"], json!(["bob"]));
        assert_eq!(msgs[0]["reply_to"]["seq"], m1);
        // The same page over the socket, for the other user (`me` false).
        match a
            .ask(|id| ClientFrame::History {
                id,
                room: room.clone(),
                before: None,
                limit: None,
            })
            .await
        {
            ServerFrame::History { messages, .. } => {
                assert_eq!(messages[1].reactions[0].count, 1);
                assert!(!messages[1].reactions[0].me);
            }
            f => panic!("{f:?}"),
        }
        // The thread, over the socket and REST.
        match o
            .ask(|id| ClientFrame::Thread {
                id,
                room: room.clone(),
                seq: m1,
                before: None,
                limit: None,
            })
            .await
        {
            ServerFrame::Thread { messages, more, .. } => {
                assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [m2]);
                assert!(!more);
            }
            f => panic!("{f:?}"),
        }
        let (s, v) = b
            .get(
                &format!("/api/rooms/{room}/messages/{m1}/thread"),
                Some(&ta),
            )
            .await;
        assert_eq!((s, v["messages"][0]["seq"].as_u64()), (200, Some(m2)));
        // Previous versions.
        let (s, v) = b
            .get(&format!("/api/rooms/{room}/messages/{m1}/edits"), Some(&ta))
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v["versions"][0]["body"],
            json!({"text": "hi @bob and @nobody"})
        );
        // Search follows the edit.
        let (_, v) = b
            .get(&format!("/api/rooms/{room}/search?q=edited"), Some(&tb))
            .await;
        assert_eq!(v["messages"][0]["seq"], m1);
        // Removing the reaction, then deleting the reply.
        let r2 = acked(&o.ask(react(&room, m1, "👍", false)).await);
        assert_eq!(
            entry(&a.entry_at(r2).await).map(|e| e.1),
            Some(Some(EventKind::Unreact))
        );
        match o
            .ask(|id| ClientFrame::Delete {
                id,
                room: room.clone(),
                seq: m2,
            })
            .await
        {
            ServerFrame::Deleted { seq, .. } => assert_eq!(seq, m2),
            f => panic!("{f:?}"),
        }
        let (_, v) = b
            .get(&format!("/api/rooms/{room}/messages"), Some(&tb))
            .await;
        assert_eq!(v["messages"].as_array().map(Vec::len), Some(1));
        assert!(v["messages"][0].get("reactions").is_none(), "{v}");
        assert!(v["messages"][0].get("thread").is_none(), "{v}");
    }
    // Bob's unread mentions: one per room until read.
    let (_, v) = b.get("/api/rooms", Some(&tb)).await;
    let rooms = v["rooms"].as_array().expect("rooms");
    assert_eq!(rooms.len(), 2);
    assert!(rooms.iter().all(|r| r["mentions"] == 1), "{v}");
    bystander_served(&b).await;
}

#[tokio::test]
async fn bounds_and_authorization_of_events() {
    let b = Broker::start().await;
    let (ta, tb, tc) = (
        b.user("alice").await,
        b.user("bob").await,
        b.user("carol").await,
    );
    let mut a = Chat::open(&b, &ta, Encoding::Json).await;
    let mut o = Chat::open(&b, &tb, Encoding::MsgPack).await;
    let mut c = Chat::open(&b, &tc, Encoding::Json).await;
    a.join("r").await;
    o.join("r").await;
    let m1 = acked(&a.publish("r", json!({"text": "hello"})).await);

    // Not yours: no edit, no delete (404, as for a message that is not there).
    assert_eq!(refused(&o.ask(edit("r", m1, json!("mine"))).await), 404);
    // Not joined: no reaction, no edit.
    assert_eq!(refused(&c.ask(react("r", m1, "👍", true)).await), 404);
    // No such message, or an event rather than a message.
    assert_eq!(refused(&o.ask(react("r", 99, "👍", true)).await), 404);
    let e = acked(&a.ask(edit("r", m1, json!("hello!"))).await);
    assert_eq!(refused(&o.ask(react("r", e, "👍", true)).await), 404);
    assert_eq!(refused(&o.ask(reply("r", e, json!("re"))).await), 404);
    // Reaction strings are bounded.
    assert_eq!(refused(&o.ask(react("r", m1, "", true)).await), 400);
    assert_eq!(
        refused(&o.ask(react("r", m1, &"x".repeat(33), true)).await),
        400
    );
    assert_eq!(refused(&o.ask(react("r", m1, "a b", true)).await), 400);
    // At most 3 of one user's reactions per message; no twice the same;
    // removing one you have not added is refused.
    for e in ["1", "2", "3"] {
        acked(&o.ask(react("r", m1, e, true)).await);
    }
    assert_eq!(refused(&o.ask(react("r", m1, "4", true)).await), 409);
    assert_eq!(refused(&o.ask(react("r", m1, "1", true)).await), 409);
    assert_eq!(refused(&o.ask(react("r", m1, "9", false)).await), 404);
    // At most 20 different reactions per message: 7 users x 3 = 21.
    for u in 0..6 {
        let t = b.user(&format!("fan{u}")).await;
        let mut f = Chat::open(&b, &t, Encoding::Json).await;
        f.join("r").await;
        for k in 0..3 {
            let emoji = format!("u{u}k{k}");
            let outcome = f.ask(react("r", m1, &emoji, true)).await;
            if 3 + u * 3 + k < 20 {
                acked(&outcome);
            } else {
                assert_eq!(refused(&outcome), 409, "{emoji}");
            }
        }
    }
    // Deleted: no edit, no reaction, no reply.
    a.ask(|id| ClientFrame::Delete {
        id,
        room: "r".into(),
        seq: m1,
    })
    .await;
    assert_eq!(refused(&a.ask(edit("r", m1, json!("again"))).await), 409);
    assert_eq!(refused(&o.ask(react("r", m1, "👍", true)).await), 409);
    assert_eq!(refused(&o.ask(reply("r", m1, json!("re"))).await), 404);
    // Another pair's DM: no thread, no edits, over the socket or REST.
    let dm_seq = acked(
        &a.ask(|id| ClientFrame::Pub {
            id,
            room: None,
            to: Some("bob".into()),
            cid: None,
            body: json!({"text": "private"}),
            reply_to: None,
        })
        .await,
    );
    assert_eq!(
        refused(
            &c.ask(|id| ClientFrame::Thread {
                id,
                room: "dm:alice:bob".into(),
                seq: dm_seq,
                before: None,
                limit: None,
            })
            .await
        ),
        403
    );
    let (s, v) = b
        .get(
            &format!("/api/rooms/dm:alice:bob/messages/{dm_seq}/edits"),
            Some(&tc),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    let (s, _) = b
        .get(&format!("/api/rooms/r/messages/{m1}/edits"), None)
        .await;
    assert_eq!(s, 401);
    let (s, _) = b.get("/api/rooms/r/messages/x/edits", Some(&tc)).await;
    assert_eq!(s, 404);
    // A reply inside the DM quotes from the DM.
    let mut bob_dm = Chat::open(&b, &tb, Encoding::Json).await;
    let r = bob_dm
        .ask(|id| ClientFrame::Pub {
            id,
            room: None,
            to: Some("alice".into()),
            cid: None,
            body: json!("got it"),
            reply_to: Some(dm_seq),
        })
        .await;
    acked(&r);
    // Every refusal is counted by its code.
    assert!(b.metric("shoal_errors_total{code=\"conflict\"}").await >= 5.0);
    assert!(b.metric("shoal_frames_in_total{type=\"react\"}").await >= 20.0);
    bystander_served(&b).await;
}

#[tokio::test]
async fn since_recovers_every_event_in_order_once() {
    let b = Broker::start().await;
    let (ta, tb) = (b.user("alice").await, b.user("bob").await);
    let mut a = Chat::open(&b, &ta, Encoding::Json).await;
    let mut o = Chat::open(&b, &tb, Encoding::MsgPack).await;
    a.join("r").await;
    o.join("r").await;
    let m1 = acked(&a.publish("r", json!({"text": "one"})).await);
    let m2 = acked(&o.publish("r", json!({"text": "two"})).await);
    o.entry_at(m2).await;
    let since = m2;
    drop(o);
    // While bob is away: an edit, reactions on and off, a reply, a
    // message and its deletion.
    let e1 = acked(&a.ask(edit("r", m1, json!({"text": "one, edited"}))).await);
    let r1 = acked(&a.ask(react("r", m2, "👍", true)).await);
    let r2 = acked(&a.ask(react("r", m2, "🎉", true)).await);
    let r3 = acked(&a.ask(react("r", m2, "👍", false)).await);
    let m3 = acked(&a.ask(reply("r", m2, json!({"text": "re two"}))).await);
    let m4 = acked(&a.publish("r", json!({"text": "oops"})).await);
    let d4 = match a
        .ask(|id| ClientFrame::Delete {
            id,
            room: "r".into(),
            seq: m4,
        })
        .await
    {
        ServerFrame::Deleted { .. } => m4 + 1,
        f => panic!("{f:?}"),
    };
    let mut o = b.connect(&tb, Encoding::MsgPack).await;
    let (frames, joined) = o.join_since("r", Some(since)).await;
    assert_eq!(joined, d4);
    let got: Vec<(u64, Option<EventKind>, Option<u64>)> = frames
        .iter()
        .map(|f| match f {
            ServerFrame::Msg {
                seq, kind, target, ..
            } => (*seq, *kind, *target),
            // A message deleted before bob saw it: at its own seq.
            ServerFrame::Deleted { seq, .. } => (*seq, Some(EventKind::Delete), None),
            f => panic!("unexpected in replay: {f:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (e1, Some(EventKind::Edit), Some(m1)),
            (r1, Some(EventKind::React), Some(m2)),
            (r2, Some(EventKind::React), Some(m2)),
            (r3, Some(EventKind::Unreact), Some(m2)),
            (m3, None, None),
            (m4, Some(EventKind::Delete), None),
            (d4, Some(EventKind::Delete), Some(m4)),
        ],
        "every seq after since, in order, once"
    );
    // A fresh client's history is the current state.
    let (_, v) = b.get("/api/rooms/r/messages", Some(&tb)).await;
    let seqs: Vec<u64> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    assert_eq!(seqs, vec![m3, m2, m1]);
    assert_eq!(v["messages"][2]["body"], json!({"text": "one, edited"}));
    assert_eq!(
        v["messages"][1]["reactions"],
        json!([{"emoji": "🎉", "count": 1, "me": false}])
    );
}
