//! The two encodings of frames, selected by WebSocket subprotocol.
//!
//! This module is the only place in Shoal that calls a serializer. Decoding
//! is bounded: a size check happens before parsing and nesting depth is
//! capped, so hostile input costs at most `max_len` bytes of work and never
//! panics or overflows the stack.

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use crate::frame::{ClientFrame, ServerFrame};

/// Maximum nesting depth accepted when decoding (maps and arrays in a body).
pub const DEFAULT_MAX_DEPTH: usize = 32;

/// Wire encoding of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// MessagePack with named keys, sent as binary WebSocket messages.
    MsgPack,
    /// JSON, sent as text WebSocket messages.
    Json,
}

impl Encoding {
    /// Subprotocol name for MessagePack (the default).
    pub const MSGPACK_SUBPROTOCOL: &'static str = "shoal.v1.msgpack";
    /// Subprotocol name for JSON.
    pub const JSON_SUBPROTOCOL: &'static str = "shoal.v1.json";

    /// Both encodings, in index order.
    pub const ALL: [Encoding; 2] = [Encoding::MsgPack, Encoding::Json];

    /// The subprotocol name that selects this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::MsgPack => Self::MSGPACK_SUBPROTOCOL,
            Encoding::Json => Self::JSON_SUBPROTOCOL,
        }
    }

    /// Pick an encoding from a `Sec-WebSocket-Protocol` header value (a
    /// comma-separated list, in client preference order). Returns `None` if
    /// the header names only protocols Shoal does not speak.
    pub fn negotiate(header: Option<&str>) -> Option<Encoding> {
        let Some(header) = header else {
            return Some(Encoding::MsgPack);
        };
        header.split(',').map(str::trim).find_map(|p| match p {
            Self::MSGPACK_SUBPROTOCOL => Some(Encoding::MsgPack),
            Self::JSON_SUBPROTOCOL => Some(Encoding::Json),
            _ => None,
        })
    }

    /// True if frames go in binary WebSocket messages.
    pub fn is_binary(self) -> bool {
        matches!(self, Encoding::MsgPack)
    }

    /// Small index (0 or 1) for per-encoding caches.
    pub fn index(self) -> usize {
        match self {
            Encoding::MsgPack => 0,
            Encoding::Json => 1,
        }
    }

    /// Label for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::MsgPack => "msgpack",
            Encoding::Json => "json",
        }
    }

    /// Encode a server frame.
    pub fn encode_server(self, frame: &ServerFrame) -> Result<Vec<u8>, EncodeError> {
        self.encode(frame)
    }

    /// Encode a client frame (used by clients and the load generator).
    pub fn encode_client(self, frame: &ClientFrame) -> Result<Vec<u8>, EncodeError> {
        self.encode(frame)
    }

    /// Decode a client frame from untrusted bytes.
    pub fn decode_client(self, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        self.decode(bytes, DEFAULT_MAX_DEPTH)
    }

    /// Decode a server frame (used by clients and the load generator).
    pub fn decode_server(self, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        self.decode(bytes, DEFAULT_MAX_DEPTH)
    }

    /// Decode only the seq and body of a `msg` frame, the body straight
    /// into `B` (fields `B` does not name are skipped, not built). For
    /// receivers that count and time deliveries at high rates: the full
    /// [`ServerFrame`] decode buffers the frame to find its tag first.
    /// `Ok(None)`: a valid frame of another kind (decode it with
    /// [`Encoding::decode_server`]). Same bounds and errors as the full
    /// decode.
    pub fn decode_msg_as<B: DeserializeOwned>(
        self,
        bytes: &[u8],
    ) -> Result<Option<(u64, B)>, DecodeError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Kind {
            Msg,
            #[serde(other)]
            Other,
        }
        #[derive(serde::Deserialize)]
        struct Head<B> {
            t: Kind,
            seq: Option<u64>,
            body: Option<B>,
        }
        let h: Head<B> = self.decode(bytes, DEFAULT_MAX_DEPTH)?;
        match (h.t, h.seq, h.body) {
            (Kind::Msg, Some(seq), Some(body)) => Ok(Some((seq, body))),
            (Kind::Msg, ..) => {
                let why = "msg frame without seq or body".to_string();
                Err(match self {
                    Encoding::MsgPack => DecodeError::MsgPack(why),
                    Encoding::Json => DecodeError::Json(why),
                })
            }
            (Kind::Other, ..) => Ok(None),
        }
    }

    /// Decode any protocol type (bus records, events) with the same bounds.
    pub(crate) fn decode_any<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, DecodeError> {
        self.decode(bytes, DEFAULT_MAX_DEPTH)
    }

    fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, EncodeError> {
        match self {
            Encoding::MsgPack => rmp_serde::to_vec_named(value).map_err(EncodeError::MsgPack),
            Encoding::Json => serde_json::to_vec(value).map_err(EncodeError::Json),
        }
    }

    fn decode<T: DeserializeOwned>(self, bytes: &[u8], max_depth: usize) -> Result<T, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        match self {
            Encoding::MsgPack => {
                let mut rest = bytes;
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                de.set_max_depth(max_depth);
                let value =
                    T::deserialize(&mut de).map_err(|e| DecodeError::MsgPack(e.to_string()))?;
                drop(de);
                if !rest.is_empty() {
                    return Err(DecodeError::TrailingBytes);
                }
                Ok(value)
            }
            Encoding::Json => {
                // serde_json caps recursion at 128 levels itself, which keeps
                // hostile nesting off the stack as the msgpack depth cap does.
                let value: T =
                    serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
                Ok(value)
            }
        }
    }
}

/// Serialise a message body for storage (JSON text, the same bytes for
/// every store).
pub fn body_to_storage(body: &crate::Body) -> String {
    body.to_string()
}

/// Parse a stored body. A body that fails to parse (a damaged row) comes
/// back as JSON `null` rather than failing the whole page.
pub fn body_from_storage(text: &str) -> crate::Body {
    serde_json::from_str(text).unwrap_or(crate::Body::Null)
}

/// Serialise the reply and mention data of a log entry for storage (JSON
/// text; None for an entry without any). Its event kind and target are
/// stored in columns of their own.
pub fn meta_to_storage(meta: &crate::Meta) -> Option<String> {
    let rest = crate::Meta {
        kind: None,
        target: None,
        reply_to: meta.reply_to.clone(),
        mentions: meta.mentions.clone(),
    };
    (!rest.is_empty()).then(|| serde_json::to_string(&rest).unwrap_or_default())
}

/// Parse stored entry data back, with the kind and target from their
/// columns. Damaged data reads as none (the entry stays a readable
/// message).
pub fn meta_from_storage(
    text: Option<&str>,
    kind: Option<&str>,
    target: Option<u64>,
) -> crate::Meta {
    let mut m: crate::Meta = text
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    m.kind = kind.and_then(crate::EventKind::parse);
    m.target = target.filter(|_| m.kind.is_some());
    m
}

/// The searchable text of a body: a string body itself, else the `text`
/// field of a map body, else nothing.
pub fn body_text(body: &crate::Body) -> Option<&str> {
    match body {
        crate::Body::String(s) => Some(s),
        crate::Body::Object(m) => m.get("text").and_then(|t| t.as_str()),
        _ => None,
    }
}

/// Why bytes could not be decoded into a frame. Every variant maps to error
/// code 400 on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Zero-length message.
    #[error("empty frame")]
    Empty,
    /// Not valid MessagePack, or valid MessagePack of the wrong shape
    /// (unknown `t`, missing or wrong-typed field, too deep).
    #[error("malformed msgpack frame: {0}")]
    MsgPack(String),
    /// Not valid JSON, or JSON of the wrong shape.
    #[error("malformed json frame: {0}")]
    Json(String),
    /// Bytes left over after one complete frame.
    #[error("trailing bytes after frame")]
    TrailingBytes,
}

/// Encoding failed. Only possible for bodies that cannot be represented in
/// the target encoding; never caused by frames the broker builds itself.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// MessagePack encoder error.
    #[error("msgpack encode: {0}")]
    MsgPack(#[from] rmp_serde::encode::Error),
    /// JSON encoder error.
    #[error("json encode: {0}")]
    Json(#[from] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ClientFrame as C, ServerFrame as S};
    use serde_json::json;

    fn client_frames() -> Vec<C> {
        vec![
            C::Join {
                id: Some(1),
                room: "lobby".into(),
                since: Some(41),
            },
            C::Join {
                id: None,
                room: "lobby".into(),
                since: None,
            },
            C::Create {
                id: Some(7),
                room: "team".into(),
                private: true,
                topic: Some("plans".into()),
                title: None,
            },
            C::Moderate {
                id: Some(8),
                room: "team".into(),
                action: "ban".into(),
                what: crate::entry::ModAction {
                    user: Some("bob".into()),
                    until: Some(5),
                    reason: Some("spam".into()),
                    ..Default::default()
                },
            },
            C::Leave {
                id: Some(2),
                room: "lobby".into(),
            },
            C::Pub {
                id: Some(3),
                room: Some("lobby".into()),
                to: None,
                cid: Some("c-1".into()),
                body: json!("hi"),
                reply_to: None,
            },
            C::Pub {
                id: None,
                room: None,
                to: Some("bob".into()),
                cid: None,
                body: json!({"text": "yo", "n": [1, 2.5, null, true]}),
                reply_to: None,
            },
            C::Typing {
                id: None,
                room: "lobby".into(),
            },
            C::Members {
                id: Some(u64::MAX),
                room: "lobby".into(),
            },
            C::History {
                id: Some(5),
                room: "lobby".into(),
                before: Some(100),
                limit: Some(20),
            },
            C::History {
                id: None,
                room: "lobby".into(),
                before: None,
                limit: None,
            },
            C::Mark {
                id: None,
                room: "lobby".into(),
                seq: 9,
                state: crate::MarkState::Read,
            },
            C::Delete {
                id: Some(6),
                room: "lobby".into(),
                seq: 3,
            },
            C::Ping { id: Some(0) },
            C::Ping { id: None },
        ]
    }

    fn server_frames() -> Vec<S> {
        vec![
            S::Hello {
                user: "alice".into(),
                node: "n1".into(),
                max_message_size: 65536,
                ping_interval_ms: 20000,
            },
            S::Joined {
                id: Some(1),
                room: "lobby".into(),
                seq: 0,
            },
            S::Left {
                id: None,
                room: "lobby".into(),
                reason: None,
            },
            S::Ack {
                id: Some(3),
                room: "lobby".into(),
                seq: 7,
                ts: 1_700_000_000_000,
            },
            S::Msg {
                room: "lobby".into(),
                seq: 7,
                from: "alice".into(),
                ts: 1,
                body: json!({"k": "v"}),
                kind: None,
                target: None,
                reply_to: None,
                mentions: vec![],
            },
            S::Typing {
                room: "lobby".into(),
                user: "bob".into(),
            },
            S::Presence {
                room: "lobby".into(),
                user: "bob".into(),
                online: false,
            },
            S::Members {
                id: Some(9),
                room: "lobby".into(),
                users: vec!["alice".into(), "bob".into()],
                receipts: vec![crate::frame::Receipt {
                    user: "bob".into(),
                    delivered: 4,
                    read: 2,
                }],
            },
            S::Gap {
                room: "lobby".into(),
                from: 1,
                to: 40,
            },
            S::History {
                id: Some(2),
                room: "lobby".into(),
                messages: vec![crate::frame::StoredMsg {
                    seq: 3,
                    from: "bob".into(),
                    ts: 5,
                    body: json!({"text": "x"}),
                    edited_ts: None,
                    reply_to: None,
                    mentions: vec![],
                    reactions: vec![],
                    thread: None,
                }],
                more: true,
            },
            S::Mark {
                room: "lobby".into(),
                user: "bob".into(),
                seq: 3,
                state: crate::MarkState::Delivered,
            },
            S::Deleted {
                id: None,
                room: "lobby".into(),
                seq: 3,
            },
            S::Pong { id: Some(4) },
            S::Error {
                id: None,
                code: 429,
                message: "slow down".into(),
            },
        ]
    }

    #[test]
    fn round_trip_every_frame_both_encodings() {
        for enc in Encoding::ALL {
            for f in client_frames() {
                let bytes = enc.encode_client(&f).expect("encode");
                assert_eq!(enc.decode_client(&bytes), Ok(f.clone()), "{enc:?} {f:?}");
            }
            for f in server_frames() {
                let bytes = enc.encode_server(&f).expect("encode");
                assert_eq!(enc.decode_server(&bytes), Ok(f.clone()), "{enc:?} {f:?}");
            }
        }
    }

    #[test]
    fn json_shape_is_documented_shape() {
        let f = S::Ack {
            id: Some(3),
            room: "r".into(),
            seq: 7,
            ts: 9,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&Encoding::Json.encode_server(&f).expect("enc")).expect("json");
        assert_eq!(
            v,
            json!({"t": "ack", "id": 3, "room": "r", "seq": 7, "ts": 9})
        );
        let c = Encoding::Json.decode_client(br#"{"t":"pub","room":"r","body":"x","extra":1}"#);
        assert!(
            matches!(c, Ok(C::Pub { .. })),
            "unknown fields are ignored: {c:?}"
        );
    }

    #[test]
    fn msgpack_uses_named_keys() {
        let bytes = Encoding::MsgPack
            .encode_client(&C::Ping { id: Some(1) })
            .expect("enc");
        // fixmap(2) "t" "ping" "id" 1
        assert_eq!(bytes, b"\x82\xa1t\xa4ping\xa2id\x01");
    }

    #[test]
    fn hostile_inputs_are_typed_errors() {
        let cases: Vec<&[u8]> = vec![
            b"",
            b"\xc1",
            b"\x82\xa1t",
            b"\xdf\xff\xff\xff\xff",
            b"\xdd\xff\xff\xff\xff",
            b"\xdb\xff\xff\xff\xff",
            b"\x81\xa1t\xa3zzz",
            b"\x81\xa1t\x01",
            b"\x82\xa1t\xa4join\xa4room\x05",
        ];
        for c in cases {
            assert!(Encoding::MsgPack.decode_client(c).is_err(), "{c:?}");
        }
        for c in [
            &b"{"[..],
            b"[]",
            b"{\"t\":\"nope\"}",
            b"{\"t\":\"join\"}",
            b"{\"t\":\"join\",\"room\":5}",
            b"\xff\xfe",
            b"{\"t\":\"ping\",\"id\":-1}",
        ] {
            assert!(Encoding::Json.decode_client(c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        let mut mp = b"\x83\xa1t\xa3pub\xa4room\xa1r\xa4body".to_vec();
        mp.extend(std::iter::repeat_n(0x91u8, 100_000));
        mp.push(0xc0);
        assert!(Encoding::MsgPack.decode_client(&mp).is_err());
        let json = format!(
            "{{\"t\":\"pub\",\"room\":\"r\",\"body\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(Encoding::Json.decode_client(json.as_bytes()).is_err());
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut b = Encoding::MsgPack
            .encode_client(&C::Ping { id: None })
            .expect("enc");
        b.push(0);
        assert_eq!(
            Encoding::MsgPack.decode_client(&b),
            Err(DecodeError::TrailingBytes)
        );
    }

    #[test]
    fn negotiate_subprotocol() {
        assert_eq!(Encoding::negotiate(None), Some(Encoding::MsgPack));
        assert_eq!(
            Encoding::negotiate(Some("shoal.v1.json")),
            Some(Encoding::Json)
        );
        assert_eq!(
            Encoding::negotiate(Some("foo, shoal.v1.json, shoal.v1.msgpack")),
            Some(Encoding::Json)
        );
        assert_eq!(Encoding::negotiate(Some("foo")), None);
    }

    #[test]
    fn msg_fast_path_reads_seq_and_body_and_passes_over_other_frames() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Stamp {
            s: u64,
        }
        let msg = S::Msg {
            room: "lobby".into(),
            seq: 7,
            from: "alice".into(),
            ts: 1,
            body: json!({"s": 42, "x": "padding", "deep": [1, {"a": 2}]}),
            kind: None,
            target: None,
            reply_to: None,
            mentions: vec![],
        };
        let ack = S::Ack {
            id: Some(3),
            room: "lobby".into(),
            seq: 7,
            ts: 1,
        };
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let m = enc.encode_server(&msg).expect("encode");
            assert_eq!(
                enc.decode_msg_as::<Stamp>(&m).expect("msg"),
                Some((7, Stamp { s: 42 }))
            );
            let a = enc.encode_server(&ack).expect("encode");
            assert_eq!(enc.decode_msg_as::<Stamp>(&a).expect("ack"), None);
            assert!(enc.decode_msg_as::<Stamp>(&m[..m.len() - 1]).is_err());
            assert!(enc.decode_msg_as::<Stamp>(b"").is_err());
        }
    }
}
