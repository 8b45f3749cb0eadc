//! The head of a WebSocket frame a client sent (RFC 6455 §5.2), parsed
//! from bytes with no IO and no buffer of its own.
//!
//! Why not fastwebsockets' reader: it parses only inside its own read
//! loop, over an 8 KiB buffer it allocates per connection up front and
//! keeps for the connection's life (no API to supply or shrink it), which
//! was most of an idle connection's memory. The connection engine reads
//! into a per-thread scratch buffer instead and keeps bytes only for a
//! frame that is not complete yet; this parser is the part of
//! fastwebsockets' reader that it needs, with the same checks, plus the
//! one fastwebsockets leaves out (client frames must be masked, §5.1).
//! Opcodes and unmasking still come from fastwebsockets.
//!
//! Rules, all checked before any payload byte is looked at: reserved bits
//! zero (no extension is negotiated), a known opcode, the mask bit set,
//! control frames final and at most 125 bytes, and a payload no larger
//! than the caller's cap. Any violation is a [`FrameError`] that names its
//! close code; nothing here panics on any input (fuzzed by `ws_read`).

use fastwebsockets::OpCode;
use shoal_proto::CloseCode;

/// Longest frame head: 2 bytes, 8 of extended length, 4 of mask key.
pub const MAX_HEAD: usize = 14;

/// A parsed frame head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Final fragment of its message.
    pub fin: bool,
    /// What the frame is.
    pub opcode: OpCode,
    /// The client's masking key.
    pub mask: [u8; 4],
    /// Bytes of the head (where the payload starts).
    pub head_len: usize,
    /// Bytes of payload that follow the head.
    pub payload_len: usize,
}

impl FrameHead {
    /// Head and payload together.
    pub fn frame_len(&self) -> usize {
        self.head_len + self.payload_len
    }
}

/// Why a frame is refused; each ends the connection with its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A reserved bit set, an unknown opcode, an unmasked client frame, or
    /// a fragmented or oversized control frame: 1002.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A payload over the cap: 1009, before the payload is read.
    #[error("frame payload over the message size limit")]
    TooBig,
}

impl FrameError {
    /// The close code the connection ends with.
    pub fn close_code(self) -> CloseCode {
        match self {
            FrameError::Protocol(_) => CloseCode::Protocol,
            FrameError::TooBig => CloseCode::TooBig,
        }
    }
}

/// Parse the head at the start of `buf`. `Ok(None)`: not all of the head
/// is there yet. `max_payload`: the largest payload accepted.
pub fn parse_head(buf: &[u8], max_payload: usize) -> Result<Option<FrameHead>, FrameError> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    if b0 & 0b0111_0000 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let opcode = OpCode::try_from(b0 & 0x0f).map_err(|_| FrameError::Protocol("unknown opcode"))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frame not masked"));
    }
    let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
    let code = usize::from(b1 & 0x7f);
    if control && (!fin || code > 125) {
        return Err(FrameError::Protocol(
            "control frame fragmented or over 125 bytes",
        ));
    }
    let ext = match code {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    // The length first: a frame over the cap is refused as soon as its
    // length is known.
    let Some(len) = buf.get(2..2 + ext) else {
        return Ok(None);
    };
    let payload_len = match *len {
        [] => code,
        [a, b] => usize::from(u16::from_be_bytes([a, b])),
        _ => {
            let mut n = [0u8; 8];
            n.copy_from_slice(len);
            let n = u64::from_be_bytes(n);
            // The most significant bit must be 0 (§5.2).
            if n >> 63 != 0 {
                return Err(FrameError::Protocol("64-bit length with the top bit set"));
            }
            // A length that does not fit usize is over any cap.
            usize::try_from(n).map_err(|_| FrameError::TooBig)?
        }
    };
    if payload_len > max_payload {
        return Err(FrameError::TooBig);
    }
    let head_len = 2 + ext + 4;
    let Some(key) = buf.get(2 + ext..head_len) else {
        return Ok(None);
    };
    let mut mask = [0u8; 4];
    mask.copy_from_slice(key);
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask,
        head_len,
        payload_len,
    }))
}

/// Unmask a payload in place.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    fastwebsockets::unmask(payload, mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn heads_of_every_length_class_parse_in_any_split() {
        for len in [0usize, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = client_frame(0x82, &payload);
            let h = parse_head(&f, 1 << 20).expect("valid").expect("complete");
            assert_eq!(
                (h.fin, h.opcode, h.payload_len),
                (true, OpCode::Binary, len)
            );
            assert_eq!(h.frame_len(), f.len());
            let mut p = f[h.head_len..].to_vec();
            unmask(&mut p, h.mask);
            assert_eq!(p, payload);
            // Every prefix shorter than the head is "not yet".
            for cut in 0..h.head_len {
                assert_eq!(
                    parse_head(&f[..cut], 1 << 20),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn what_a_server_must_refuse_is_refused_with_its_code() {
        let refuse = |f: &[u8], max| parse_head(f, max).map_err(FrameError::close_code);
        // Unmasked.
        assert_eq!(refuse(b"\x81\x02hi", 100), Err(CloseCode::Protocol));
        // Reserved bit.
        assert_eq!(
            refuse(&client_frame(0xc1, b"x"), 100),
            Err(CloseCode::Protocol)
        );
        // Unknown opcode 3.
        assert_eq!(
            refuse(&client_frame(0x83, b"x"), 100),
            Err(CloseCode::Protocol)
        );
        // Fragmented ping; ping over 125 bytes.
        assert_eq!(
            refuse(&client_frame(0x09, b"x"), 100),
            Err(CloseCode::Protocol)
        );
        assert_eq!(
            refuse(&client_frame(0x89, &[0; 126]), 1000),
            Err(CloseCode::Protocol)
        );
        // Over the cap, known from the head alone.
        assert_eq!(
            refuse(&client_frame(0x82, &[0; 101])[..4], 100),
            Err(CloseCode::TooBig)
        );
        // A 64-bit length with the top bit set.
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(refuse(&huge, usize::MAX), Err(CloseCode::Protocol));
        // Exactly at the cap is fine.
        assert!(parse_head(&client_frame(0x81, &[b'a'; 100]), 100).is_ok());
    }
}
