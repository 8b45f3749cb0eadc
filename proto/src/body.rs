//! The one policy every message body passes before it is sequenced.
//!
//! Rules, enforced at publish for every ingress (WebSocket in either
//! encoding, the REST server API, any future transport):
//! - a body nests at most [`MAX_BODY_DEPTH`] levels of arrays and maps
//!   (a scalar is depth 0, `[1]` is depth 1), so every decoder a message
//!   meets later (the client decoders of both encodings, the MessagePack
//!   bus record, stored JSON, `history` pages that wrap it three levels
//!   deeper) accepts it: the decoders allow [`crate::DEFAULT_MAX_DEPTH`];
//! - a body's size is bounded in **every** encoding it may be delivered
//!   in, not only the one it arrived in: MessagePack `false` is one byte
//!   and JSON `false` is six, so a body under the limit in one encoding can
//!   be several times over it in the other.
//!
//! A body that passes is deliverable by every node to every client; one
//! that fails is refused before it gets a seq, so nothing acked is ever
//! undeliverable.

use std::io::Write;

use thiserror::Error;

use crate::Body;

/// Deepest nesting of arrays and maps a body may have. The frames that
/// carry a body add at most 3 levels (`history` → `messages` → entry),
/// well under the decoders' [`crate::DEFAULT_MAX_DEPTH`].
pub const MAX_BODY_DEPTH: usize = 16;

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BodyError {
    /// Nested deeper than [`MAX_BODY_DEPTH`] (maps to error 400).
    #[error("body nests deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// Larger than the limit in one of the encodings it may be delivered
    /// in (maps to error 413).
    #[error("body is {size} bytes in {encoding}, over the {max}-byte limit")]
    TooLarge {
        /// The encoding it is too large in.
        encoding: &'static str,
        /// Its size in that encoding.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// Check a body against the depth limit and `max_size` bytes in both
/// encodings. Costs one encoding pass per encoding, into a counter (no
/// allocation), and stops early once a size passes the limit.
pub fn check_body(body: &Body, max_size: usize) -> Result<(), BodyError> {
    if depth_exceeds(body, MAX_BODY_DEPTH) {
        return Err(BodyError::TooDeep {
            max: MAX_BODY_DEPTH,
        });
    }
    let json = encoded_len(max_size, |w| serde_json::to_writer(w, body).is_ok());
    if json > max_size {
        return Err(BodyError::TooLarge {
            encoding: "json",
            size: json,
            max: max_size,
        });
    }
    let msgpack = encoded_len(max_size, |w| {
        rmp_serde::encode::write_named(w, body).is_ok()
    });
    if msgpack > max_size {
        return Err(BodyError::TooLarge {
            encoding: "msgpack",
            size: msgpack,
            max: max_size,
        });
    }
    Ok(())
}

/// True if `body` nests deeper than `max` (iterative: a body built by a
/// caller may be deeper than any decoder would have allowed).
fn depth_exceeds(body: &Body, max: usize) -> bool {
    // Only containers are stacked: a wide body of scalars costs no stack,
    // and nothing is allocated per node (this runs on every publish).
    let nested = |c: &&Body| matches!(c, Body::Array(_) | Body::Object(_));
    let mut stack: Vec<(&Body, usize)> = vec![(body, 0)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Body::Array(a) => stack.extend(a.iter().filter(nested).map(|c| (c, d + 1))),
            Body::Object(m) => stack.extend(m.values().filter(nested).map(|c| (c, d + 1))),
            _ => continue,
        }
        if d + 1 > max {
            return true;
        }
    }
    false
}

/// A body nested exactly `depth` levels (alternating arrays and maps
/// around a number): the edge cases of the depth policy, for tests.
pub fn nested(depth: usize) -> Body {
    let mut v = Body::from(1);
    for i in 0..depth {
        v = if i % 2 == 0 {
            Body::Array(vec![v])
        } else {
            Body::Object([("k".to_string(), v)].into_iter().collect())
        };
    }
    v
}

/// Bytes an encoder writes, counting at most a little past `limit` (the
/// writer fails there, which ends the encoding early).
fn encoded_len(limit: usize, encode: impl FnOnce(&mut Counter) -> bool) -> usize {
    let mut c = Counter { n: 0, limit };
    let _ = encode(&mut c);
    c.n
}

struct Counter {
    n: usize,
    limit: usize,
}

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.n += buf.len();
        if self.n > self.limit {
            return Err(std::io::Error::other("over the limit"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bus, ClientFrame, Encoding, ServerFrame, StoredMsg};
    use serde_json::json;

    #[test]
    fn depth_limit_is_exact() {
        assert_eq!(check_body(&json!("x"), 100), Ok(()));
        assert_eq!(check_body(&nested(MAX_BODY_DEPTH), 1000), Ok(()));
        assert_eq!(
            check_body(&nested(MAX_BODY_DEPTH + 1), 1000),
            Err(BodyError::TooDeep {
                max: MAX_BODY_DEPTH
            })
        );
        // Depth is the deepest branch, not the number of containers.
        let wide = json!([[1], [2], {"a": [3]}, nested(MAX_BODY_DEPTH - 1)]);
        assert_eq!(check_body(&wide, 1000), Ok(()));
    }

    /// The rule the policy exists for: a body that passes decodes in every
    /// frame that carries it, in both encodings, and on the bus.
    #[test]
    fn a_body_that_passes_decodes_in_every_frame_and_encoding() {
        let body = nested(MAX_BODY_DEPTH);
        assert_eq!(check_body(&body, 1 << 20), Ok(()));
        let msg = StoredMsg {
            seq: 2,
            from: "alice".into(),
            ts: 1,
            body: body.clone(),
            edited_ts: None,
            reply_to: None,
            mentions: vec![],
            reactions: vec![],
            thread: None,
        };
        for enc in Encoding::ALL {
            let pubf = ClientFrame::Pub {
                id: Some(1),
                room: Some("r".into()),
                to: None,
                cid: None,
                body: body.clone(),
                reply_to: None,
            };
            let b = enc.encode_client(&pubf).expect("encode");
            assert_eq!(enc.decode_client(&b), Ok(pubf));
            for f in [
                ServerFrame::Msg {
                    room: "r".into(),
                    seq: 2,
                    from: "alice".into(),
                    ts: 1,
                    body: body.clone(),
                    kind: None,
                    target: None,
                    reply_to: None,
                    mentions: vec![],
                },
                ServerFrame::History {
                    id: Some(1),
                    room: "r".into(),
                    messages: vec![msg.clone()],
                    more: false,
                },
            ] {
                let b = enc.encode_server(&f).expect("encode");
                assert_eq!(enc.decode_server(&b), Ok(f), "{enc:?}");
            }
        }
        let rec = bus::BusRecord {
            ts: 1,
            from: "alice".into(),
            body: body.clone(),
            meta: Default::default(),
        };
        assert_eq!(bus::decode_record(&bus::encode_record(&rec)), Ok(rec));
        let stored = crate::codec::body_to_storage(&body);
        assert_eq!(crate::codec::body_from_storage(&stored), body);
    }

    #[test]
    fn size_is_checked_in_both_encodings() {
        // 1,000 `false`: 1,003 bytes of MessagePack, 6,001 of JSON.
        let falses = Body::Array(vec![json!(false); 1000]);
        assert!(matches!(
            check_body(&falses, 4096),
            Err(BodyError::TooLarge {
                encoding: "json",
                max: 4096,
                ..
            })
        ));
        assert_eq!(check_body(&falses, 6001), Ok(()));
        // 5,000 bytes of text: 5,002 in JSON (quotes), 5,003 in
        // MessagePack (str16 header).
        let s = Body::String("x".repeat(5000));
        assert!(matches!(
            check_body(&s, 5001),
            Err(BodyError::TooLarge {
                encoding: "json",
                ..
            })
        ));
        assert!(matches!(
            check_body(&s, 5002),
            Err(BodyError::TooLarge {
                encoding: "msgpack",
                size: 5003,
                max: 5002
            })
        ));
        assert_eq!(check_body(&s, 5003), Ok(()));
    }
}
