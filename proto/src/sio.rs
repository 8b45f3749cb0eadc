//! Shoal's frames as Socket.IO events: the event vocabulary a stock
//! `socket.io-client` speaks to the broker's `/socket.io/` endpoint.
//!
//! Rules:
//! - **One to one.** Every client event is a [`ClientFrame`] and every
//!   server event a [`ServerFrame`]: the event name is the frame's `"t"`
//!   (plus the alias `send_message` for `pub`), its fields are the frame's
//!   fields. So a Socket.IO client gets exactly the guarantees a native
//!   client has, and the broker handles both with one code path.
//! - **Arguments, two ways.** A client passes either one object with the
//!   frame's fields (`emit("join", {room, since})`) or the fields in a fixed
//!   order ([`positional_fields`]: `emit("join", room, since)`), the way
//!   Socket.IO apps usually call events. At most [`MAX_EVENT_ARGS`].
//! - **Replies go to the ack callback.** A request that came with an ack
//!   callback is answered through it (the reply frame's payload, or
//!   `{error: {code, message}}`); without one, the reply is emitted as an
//!   event of its own (`joined`, `ack`, `error`, ...), as on `/ws`.
//! - **Socket.IO namespaces are Shoal namespaces.** In Socket.IO namespace
//!   `/chat`, room `general` is Shoal room `chat:general` (its namespace
//!   options apply); events in that namespace name it `general` again.
//!   The main namespace `/` uses room names as they are.
//!
//! This module does no IO and never panics on what a client sends: a bad
//! event is an [`EventError`].

use serde::{
    de::{SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::frame::{ClientFrame, ServerFrame};

/// Most arguments one event may carry (after its name).
pub const MAX_EVENT_ARGS: usize = 8;

/// Why an event was refused (answered with error 400).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    /// The event name is not in the vocabulary.
    #[error("unknown event `{0}`")]
    Unknown(String),
    /// The arguments do not make the event's frame.
    #[error("event `{event}`: {why}")]
    BadArgs {
        /// The event name.
        event: String,
        /// What was wrong.
        why: String,
    },
    /// A Socket.IO namespace that cannot be a Shoal namespace.
    #[error("namespace `{0}` is not a Shoal namespace (`/` or `/name`, not `/dm`)")]
    BadNamespace(String),
}

/// The arguments of one event, after its name. Deserialized as a tuple, so
/// Socket.IO's parsers hand over every argument, not only the first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventArgs(pub Vec<Value>);

impl<'de> Deserialize<'de> for EventArgs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Args;
        impl<'de> Visitor<'de> for Args {
            type Value = EventArgs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "at most {MAX_EVENT_ARGS} event arguments")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EventArgs, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<Value>()? {
                    if v.len() == MAX_EVENT_ARGS {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_EVENT_ARGS} arguments"
                        )));
                    }
                    v.push(x);
                }
                Ok(EventArgs(v))
            }
        }
        d.deserialize_tuple(MAX_EVENT_ARGS, Args)
    }
}

/// The frame type (`"t"`) an event name stands for.
pub fn frame_type(event: &str) -> Option<&'static str> {
    Some(match event {
        "join" => "join",
        "leave" => "leave",
        "pub" | "send_message" => "pub",
        "typing" => "typing",
        "members" => "members",
        "history" => "history",
        "mark" => "mark",
        "delete" => "delete",
        "edit" => "edit",
        "react" => "react",
        "thread" => "thread",
        "create" => "create",
        "moderate" => "moderate",
        "ping" => "ping",
        _ => return None,
    })
}

/// The fields positional arguments fill, in order, for a frame type.
pub fn positional_fields(t: &str) -> &'static [&'static str] {
    match t {
        "join" => &["room", "since"],
        "leave" | "typing" | "members" => &["room"],
        "pub" => &["room", "body", "cid", "reply_to"],
        "edit" => &["room", "seq", "body"],
        "react" => &["room", "seq", "emoji", "on"],
        "thread" => &["room", "seq", "before", "limit"],
        "create" => &["room", "private", "topic"],
        "moderate" => &["room", "action", "user"],
        "history" => &["room", "before", "limit"],
        "mark" => &["room", "seq", "state"],
        "delete" => &["room", "seq"],
        _ => &[],
    }
}

/// The room-name prefix of a Socket.IO namespace: `/` has none, `/chat`
/// is `chat:`. The namespace must be a valid, non-DM Shoal namespace.
pub fn namespace_prefix(nsp: &str) -> Result<Option<String>, EventError> {
    let bad = || EventError::BadNamespace(nsp.chars().take(64).collect());
    let Some(name) = nsp.strip_prefix('/') else {
        return Err(bad());
    };
    if name.is_empty() {
        return Ok(None);
    }
    if name == crate::names::DM_NAMESPACE {
        return Err(bad());
    }
    // A namespace is valid if `name:x` is a valid room name.
    crate::names::RoomName::parse(&format!("{name}:x")).map_err(|_| bad())?;
    Ok(Some(format!("{name}:")))
}

/// The frame a client event stands for. `id` is the request id the broker
/// assigned to the event's ack callback (None: no callback); `prefix` is
/// the namespace's room prefix ([`namespace_prefix`]).
pub fn client_frame(
    event: &str,
    args: EventArgs,
    id: Option<u64>,
    prefix: Option<&str>,
) -> Result<ClientFrame, EventError> {
    let t =
        frame_type(event).ok_or_else(|| EventError::Unknown(event.chars().take(64).collect()))?;
    let bad = |why: String| EventError::BadArgs {
        event: t.to_string(),
        why,
    };
    let mut args = args.0;
    let mut map = if args.len() == 1 && args[0].is_object() {
        match args.pop() {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        }
    } else {
        let names = positional_fields(t);
        if args.len() > names.len() {
            return Err(bad(format!(
                "takes at most {} arguments ({}) or one object",
                names.len(),
                names.join(", ")
            )));
        }
        let mut m = Map::new();
        for (name, v) in names.iter().zip(args) {
            // A trailing `undefined` arrives as null: the field is absent.
            if !v.is_null() {
                m.insert((*name).to_string(), v);
            }
        }
        m
    };
    map.insert("t".into(), Value::String(t.into()));
    match id {
        Some(id) => map.insert("id".into(), Value::from(id)),
        None => map.remove("id"),
    };
    if let (Some(p), Some(Value::String(room))) = (prefix, map.get_mut("room")) {
        room.insert_str(0, p);
    }
    serde_json::from_value(Value::Object(map)).map_err(|e| bad(e.to_string()))
}

/// A server frame as an event: its name and its payload (the frame's
/// fields without `t` and `id`, the room named as in the namespace).
pub fn server_event(frame: &ServerFrame, prefix: Option<&str>) -> (&'static str, Value) {
    let mut v = serde_json::to_value(frame).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("t");
        m.remove("id");
        if let (Some(p), Some(Value::String(room))) = (prefix, m.get_mut("room")) {
            if let Some(rest) = room.strip_prefix(p) {
                *room = rest.to_string();
            }
        }
    }
    (frame.kind(), v)
}

/// A reply frame as the payload of the request's ack callback: the event
/// payload, or `{error: {code, message}}` for an error.
pub fn ack_payload(frame: &ServerFrame, prefix: Option<&str>) -> Value {
    let (_, v) = server_event(frame, prefix);
    match frame {
        ServerFrame::Error { .. } => serde_json::json!({ "error": v }),
        _ => v,
    }
}

/// The request id a reply frame answers, if any.
pub fn reply_id(frame: &ServerFrame) -> Option<u64> {
    match frame {
        ServerFrame::Joined { id, .. }
        | ServerFrame::Left { id, .. }
        | ServerFrame::Ack { id, .. }
        | ServerFrame::Members { id, .. }
        | ServerFrame::History { id, .. }
        | ServerFrame::Thread { id, .. }
        | ServerFrame::Deleted { id, .. }
        | ServerFrame::Pong { id }
        | ServerFrame::Error { id, .. } => *id,
        _ => None,
    }
}

/// A payload as JSON text, for the Socket.IO JSON parser: encoded once per
/// frame and copied into each recipient's packet. None only if the value
/// cannot be JSON (never for a `Value`).
pub fn to_raw_json(v: &Value) -> Option<Box<serde_json::value::RawValue>> {
    serde_json::value::to_raw_value(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MarkState;
    use serde_json::json;

    fn args(v: Value) -> EventArgs {
        match v {
            Value::Array(a) => EventArgs(a),
            other => EventArgs(vec![other]),
        }
    }

    #[test]
    fn positional_and_object_forms_make_the_same_frame() {
        let want = ClientFrame::Join {
            id: Some(3),
            room: "lobby".into(),
            since: Some(7),
        };
        assert_eq!(
            client_frame("join", args(json!(["lobby", 7])), Some(3), None),
            Ok(want.clone())
        );
        assert_eq!(
            client_frame(
                "join",
                args(json!({"room": "lobby", "since": 7})),
                Some(3),
                None
            ),
            Ok(want)
        );
        let f = client_frame(
            "send_message",
            args(json!(["r", {"text": "hi"}])),
            None,
            None,
        );
        assert_eq!(
            f,
            Ok(ClientFrame::Pub {
                id: None,
                room: Some("r".into()),
                to: None,
                cid: None,
                body: json!({"text": "hi"}),
                reply_to: None,
            })
        );
        let f = client_frame("mark", args(json!(["r", 4, "read"])), None, None);
        assert!(matches!(
            f,
            Ok(ClientFrame::Mark {
                seq: 4,
                state: MarkState::Read,
                ..
            })
        ));
        assert_eq!(
            client_frame("ping", EventArgs::default(), Some(1), None),
            Ok(ClientFrame::Ping { id: Some(1) })
        );
    }

    #[test]
    fn a_client_cannot_choose_the_request_id_or_type() {
        let f = client_frame(
            "join",
            args(json!({"room": "r", "id": 99, "t": "pub", "body": 1})),
            None,
            None,
        );
        assert_eq!(
            f,
            Ok(ClientFrame::Join {
                id: None,
                room: "r".into(),
                since: None
            })
        );
    }

    #[test]
    fn bad_events_are_errors() {
        assert!(matches!(
            client_frame("nope", EventArgs::default(), None, None),
            Err(EventError::Unknown(_))
        ));
        assert!(matches!(
            client_frame("join", args(json!([1, 2, 3])), None, None),
            Err(EventError::BadArgs { .. })
        ));
        assert!(matches!(
            client_frame("join", args(json!([5])), None, None),
            Err(EventError::BadArgs { .. })
        ));
        assert!(matches!(
            client_frame("pub", args(json!(["r"])), None, None),
            Err(EventError::BadArgs { .. })
        ));
        let too_many: EventArgs =
            serde_json::from_str("[1,2,3,4,5,6,7,8,9]").map_or(EventArgs::default(), |a| a);
        assert!(too_many.0.is_empty(), "nine arguments do not decode");
    }

    #[test]
    fn namespaces_map_to_room_prefixes() {
        assert_eq!(namespace_prefix("/"), Ok(None));
        assert_eq!(namespace_prefix("/chat"), Ok(Some("chat:".into())));
        assert!(namespace_prefix("/dm").is_err());
        assert!(namespace_prefix("/a:b").is_err());
        assert!(namespace_prefix("/").is_ok());
        assert!(namespace_prefix("chat").is_err());
        let f = client_frame("join", args(json!(["general"])), None, Some("chat:"));
        assert!(matches!(f, Ok(ClientFrame::Join { ref room, .. }) if room == "chat:general"));
        let m = ServerFrame::Msg {
            room: "chat:general".into(),
            seq: 1,
            from: "a".into(),
            ts: 2,
            body: json!("x"),
            kind: None,
            target: None,
            reply_to: None,
            mentions: vec![],
        };
        let (name, v) = server_event(&m, Some("chat:"));
        assert_eq!(name, "msg");
        assert_eq!(
            v,
            json!({"room": "general", "seq": 1, "from": "a", "ts": 2, "body": "x"})
        );
        // A room of another namespace (a DM) keeps its full name.
        let d = ServerFrame::Msg {
            room: "dm:a:b".into(),
            seq: 1,
            from: "a".into(),
            ts: 2,
            body: json!("x"),
            kind: None,
            target: None,
            reply_to: None,
            mentions: vec![],
        };
        assert_eq!(server_event(&d, Some("chat:")).1["room"], json!("dm:a:b"));
    }

    #[test]
    fn replies_and_errors_as_acks() {
        let a = ServerFrame::Ack {
            id: Some(1),
            room: "r".into(),
            seq: 5,
            ts: 9,
        };
        assert_eq!(reply_id(&a), Some(1));
        assert_eq!(
            ack_payload(&a, None),
            json!({"room": "r", "seq": 5, "ts": 9})
        );
        let e = ServerFrame::error(Some(2), crate::ErrorCode::Forbidden, "no");
        assert_eq!(
            ack_payload(&e, None),
            json!({"error": {"code": 403, "message": "no"}})
        );
        assert_eq!(server_event(&e, None).0, "error");
    }
}
