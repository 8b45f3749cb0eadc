//! What brokers tell each other through the cluster bus (Redis).
//!
//! Three things travel between nodes on a room's channel:
//! - a sequenced message: `<seq>:<record>`, where the seq prefix is added
//!   by the Redis script that assigns it (it cannot build MessagePack) and
//!   `<record>` is a [`BusRecord`] in MessagePack, the same bytes that the
//!   script keeps in the room's hot stream;
//! - an ephemeral frame (`typing`, `presence`): `e:<frame>` with a
//!   [`ServerFrame`] in MessagePack, delivered as is and never stored;
//! - a relayed notice (`mark`, `deleted`): `o:<origin> <frame>`, a frame
//!   node `<origin>` already delivered to its own members (it skips it).
//!
//! On a user's channel (nodes where the user has connections):
//! - a direct message: `d:<room> <seq>:<record>`, built by the same script
//!   that sequenced it, so a user's channel carries each DM room in seq
//!   order.
//!
//! On the cluster-wide channel:
//! - a token revocation: `r:<user> <jti>`.
//!
//! Bytes from the bus are treated as untrusted like any other input
//! (another version of Shoal, or anyone with access to Redis, may have
//! written them): decoding is bounded and returns [`DecodeError`].

use serde::{Deserialize, Serialize};

use crate::{codec::DecodeError, Body, Encoding, ServerFrame};

/// The part of a room message that is not its seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusRecord {
    /// Server timestamp from the publishing node, ms since the Unix epoch.
    pub ts: u64,
    /// Sender's user name.
    pub from: String,
    /// Message body as the sender gave it.
    pub body: Body,
    /// Event, reply and mention data (absent for a plain message, so
    /// older nodes' records read as plain messages).
    #[serde(default, skip_serializing_if = "crate::Meta::is_empty")]
    pub meta: crate::Meta,
}

/// One payload received on a room's bus channel.
#[derive(Debug, Clone, PartialEq)]
pub enum BusPayload {
    /// A sequenced room message.
    Msg {
        /// Per-room seq assigned by the bus.
        seq: u64,
        /// The message.
        record: BusRecord,
    },
    /// An ephemeral frame for the room's local members.
    Ephemeral(ServerFrame),
    /// A frame one node already delivered to its own members (a receipt,
    /// a deletion): the other nodes deliver it, the origin skips it. On a
    /// user channel it is for that user's connections.
    Relayed {
        /// Id of the node that sent it.
        origin: String,
        /// The frame.
        frame: ServerFrame,
    },
    /// A direct message, on a party's user channel.
    Direct {
        /// The DM room.
        room: String,
        /// Its seq in the DM room.
        seq: u64,
        /// The message.
        record: BusRecord,
    },
    /// A sequenced message (room or direct) whose seq prefix is valid but
    /// whose record does not decode. The seq exists and cannot be
    /// delivered: the receiver announces it as a `gap` and reports it
    /// loudly, never skips it in silence. (The publish-side body policy
    /// makes this a bug or a foreign writer, never a client's doing.)
    Undeliverable {
        /// For a direct message, its DM room; `None` on a room channel.
        direct: Option<String>,
        /// The seq that cannot be delivered.
        seq: u64,
        /// Why the record did not decode.
        error: DecodeError,
    },
    /// A revoked token: close the user's connections that use it.
    Revoke {
        /// User name.
        user: String,
        /// Token id.
        jti: String,
        /// The token's expiry (seconds since the epoch), after which the
        /// revocation can be forgotten; `None` from nodes that predate it.
        exp: Option<u64>,
    },
}

/// Prefix of a direct-message payload (followed by `<room> `).
pub const DIRECT_PREFIX: &str = "d:";
/// `r:<user> <jti>`: a revocation without its expiry (older nodes).
const REVOKE_PREFIX: &[u8] = b"r:";
/// `R:<user> <exp> <jti>`.
const REVOKE_EXP_PREFIX: &[u8] = b"R:";

/// Encode a revocation, with the token's expiry, for the cluster-wide
/// channel.
pub fn encode_revoke(user: &str, jti: &str, exp: u64) -> Vec<u8> {
    format!("R:{user} {exp} {jti}").into_bytes()
}

fn bad(what: &str) -> DecodeError {
    DecodeError::MsgPack(format!("bus payload: {what}"))
}

/// Split `<word> <rest>` at the first space (a word is at most 256 bytes).
fn word(bytes: &[u8]) -> Result<(&str, &[u8]), DecodeError> {
    let sp = bytes
        .iter()
        .take(257)
        .position(|&b| b == b' ')
        .ok_or_else(|| bad("missing separator"))?;
    let w = std::str::from_utf8(&bytes[..sp]).map_err(|_| bad("not UTF-8"))?;
    if w.is_empty() {
        return Err(bad("empty name"));
    }
    Ok((w, &bytes[sp + 1..]))
}

/// Prefix of an ephemeral payload.
const EPHEMERAL_PREFIX: &[u8] = b"e:";

/// Encode a record (the bytes kept in the stream and published after the
/// seq prefix).
pub fn encode_record(record: &BusRecord) -> Vec<u8> {
    // A record holds only strings, integers and a JSON value, which
    // MessagePack can always represent.
    rmp_serde::to_vec_named(record).unwrap_or_default()
}

/// Decode a record read back from the stream.
pub fn decode_record(bytes: &[u8]) -> Result<BusRecord, DecodeError> {
    Encoding::MsgPack.decode_any(bytes)
}

const RELAYED_PREFIX: &[u8] = b"o:";

/// Encode a frame that node `origin` has already delivered locally.
pub fn encode_relayed(origin: &str, frame: &ServerFrame) -> Vec<u8> {
    let mut out = format!("o:{origin} ").into_bytes();
    out.extend(rmp_serde::to_vec_named(frame).unwrap_or_default());
    out
}

/// Encode an ephemeral frame (typing, presence) for a room channel.
pub fn encode_ephemeral(frame: &ServerFrame) -> Vec<u8> {
    let mut out = EPHEMERAL_PREFIX.to_vec();
    out.extend(rmp_serde::to_vec_named(frame).unwrap_or_default());
    out
}

/// Decode one channel payload.
pub fn decode_payload(bytes: &[u8]) -> Result<BusPayload, DecodeError> {
    if let Some(rest) = bytes.strip_prefix(EPHEMERAL_PREFIX) {
        return Ok(BusPayload::Ephemeral(Encoding::MsgPack.decode_any(rest)?));
    }
    if let Some(rest) = bytes.strip_prefix(RELAYED_PREFIX) {
        let (origin, rest) = word(rest)?;
        return Ok(BusPayload::Relayed {
            origin: origin.to_string(),
            frame: Encoding::MsgPack.decode_any(rest)?,
        });
    }
    if let Some(rest) = bytes.strip_prefix(DIRECT_PREFIX.as_bytes()) {
        let (room, rest) = word(rest)?;
        let (seq, record) = decode_msg(rest)?;
        return Ok(match record {
            Ok(record) => BusPayload::Direct {
                room: room.to_string(),
                seq,
                record,
            },
            Err(error) => BusPayload::Undeliverable {
                direct: Some(room.to_string()),
                seq,
                error,
            },
        });
    }
    if let Some(rest) = bytes.strip_prefix(REVOKE_PREFIX) {
        let (user, jti) = word(rest)?;
        let jti = std::str::from_utf8(jti).map_err(|_| bad("not UTF-8"))?;
        return Ok(BusPayload::Revoke {
            user: user.to_string(),
            jti: jti.to_string(),
            exp: None,
        });
    }
    if let Some(rest) = bytes.strip_prefix(REVOKE_EXP_PREFIX) {
        let (user, rest) = word(rest)?;
        let (exp, jti) = word(rest)?;
        let exp = exp.parse::<u64>().map_err(|_| bad("bad expiry"))?;
        let jti = std::str::from_utf8(jti).map_err(|_| bad("not UTF-8"))?;
        return Ok(BusPayload::Revoke {
            user: user.to_string(),
            jti: jti.to_string(),
            exp: Some(exp),
        });
    }
    let (seq, record) = decode_msg(bytes)?;
    Ok(match record {
        Ok(record) => BusPayload::Msg { seq, record },
        Err(error) => BusPayload::Undeliverable {
            direct: None,
            seq,
            error,
        },
    })
}

/// `<seq>:<record>`: an error if the seq prefix is bad; the record's own
/// decode result otherwise.
#[allow(clippy::type_complexity)]
fn decode_msg(bytes: &[u8]) -> Result<(u64, Result<BusRecord, DecodeError>), DecodeError> {
    let colon = bytes
        .iter()
        .take(21)
        .position(|&b| b == b':')
        .ok_or_else(|| DecodeError::MsgPack("bus payload without seq prefix".into()))?;
    let seq = std::str::from_utf8(&bytes[..colon])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .ok_or_else(|| DecodeError::MsgPack("bus payload with a bad seq prefix".into()))?;
    Ok((seq, decode_record(&bytes[colon + 1..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = BusRecord {
            ts: 17,
            from: "alice".into(),
            body: serde_json::json!({"text": "hi", "n": [1, 2]}),
            meta: Default::default(),
        };
        let mut wire = b"42:".to_vec();
        wire.extend(encode_record(&r));
        assert_eq!(
            decode_payload(&wire),
            Ok(BusPayload::Msg {
                seq: 42,
                record: r.clone()
            })
        );
        assert_eq!(decode_record(&encode_record(&r)), Ok(r));
        let f = ServerFrame::Typing {
            room: "lobby".into(),
            user: "bob".into(),
        };
        assert_eq!(
            decode_payload(&encode_ephemeral(&f)),
            Ok(BusPayload::Ephemeral(f.clone()))
        );
        assert_eq!(
            decode_payload(&encode_relayed("n1", &f)),
            Ok(BusPayload::Relayed {
                origin: "n1".into(),
                frame: f
            })
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b""[..],
            b"0:\x80",
            b"x:\x80",
            b"12",
            b"99999999999999999999999:\x80",
            b"e:",
            b"e:\x93\x01",
            b"d:",
            b"d:room",
            b"d: 1:\x80",
            b"d:room e:\x80",
            b"r:",
            b"r:bob",
            b"r:\xff\xfe j",
            b"o:",
            b"o:n1 ",
            b"o:n1 \x80",
        ] {
            assert!(decode_payload(bad).is_err(), "{bad:?}");
        }
        // A valid seq with a record that does not decode is reported with
        // its seq, so the receiver can announce it rather than skip it.
        assert!(matches!(
            decode_payload(b"5:\xc1"),
            Ok(BusPayload::Undeliverable {
                direct: None,
                seq: 5,
                ..
            })
        ));
        assert!(matches!(
            decode_payload(b"d:d:x 1:\x80"),
            Ok(BusPayload::Undeliverable { direct: Some(ref r), seq: 1, .. }) if r == "d:x"
        ));
        assert_eq!(
            decode_payload(&encode_revoke("bob", "j 1", 99)),
            Ok(BusPayload::Revoke {
                user: "bob".into(),
                jti: "j 1".into(),
                exp: Some(99)
            })
        );
        assert_eq!(
            decode_payload(b"r:bob j1"),
            Ok(BusPayload::Revoke {
                user: "bob".into(),
                jti: "j1".into(),
                exp: None
            })
        );
        assert!(decode_payload(b"R:bob x j1").is_err());
        // Nested prefixes do not recurse.
        let deep = b"d:x ".repeat(100_000);
        assert!(decode_payload(&deep).is_err());
    }
}
