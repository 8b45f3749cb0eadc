//! Enforces RFC 6455 §5.1 on the read side: every frame a client sends must
//! be masked, and a server must close the connection (1002) when one is not.
//! fastwebsockets 0.10 unmasks what is masked but does not expose the mask
//! bit, so this reader sits between the socket and it and follows the frame
//! headers going by: it looks at each header's length and mask bit and skips
//! payloads, without copying or buffering anything.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

/// Where the scanner is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a frame header; `second` once the first byte is consumed.
    Head { second: bool },
    /// Collecting `need` extended-length bytes into `len`.
    ExtLen { need: usize, len: u64 },
    /// Skipping `left` bytes of mask key and payload.
    Skip { left: u64 },
}

/// Follows frame headers in a client's byte stream.
#[derive(Debug, Clone)]
pub struct MaskScanner {
    state: State,
}

impl Default for MaskScanner {
    fn default() -> Self {
        MaskScanner {
            state: State::Head { second: false },
        }
    }
}

impl MaskScanner {
    /// Scan the next bytes of the stream. Returns false as soon as a frame
    /// header without the mask bit is seen.
    pub fn scan(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match self.state {
                State::Skip { left } => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[n..];
                    self.state = if left == n as u64 {
                        State::Head { second: false }
                    } else {
                        State::Skip {
                            left: left - n as u64,
                        }
                    };
                }
                State::Head { second: false } => {
                    self.state = State::Head { second: true };
                    bytes = &bytes[1..];
                }
                State::Head { second: true } => {
                    let b1 = bytes[0];
                    bytes = &bytes[1..];
                    if b1 & 0x80 == 0 {
                        return false;
                    }
                    self.state = match b1 & 0x7f {
                        126 => State::ExtLen { need: 2, len: 0 },
                        127 => State::ExtLen { need: 8, len: 0 },
                        n => State::Skip {
                            left: 4 + u64::from(n),
                        },
                    };
                }
                State::ExtLen { need, len } => {
                    let len = (len << 8) | u64::from(bytes[0]);
                    bytes = &bytes[1..];
                    self.state = if need == 1 {
                        State::Skip {
                            left: 4u64.saturating_add(len),
                        }
                    } else {
                        State::ExtLen {
                            need: need - 1,
                            len,
                        }
                    };
                }
            }
        }
        true
    }
}

/// An `AsyncRead` that fails with `InvalidData` (and sets `flag`) when the
/// client sends an unmasked frame.
pub struct MaskCheck<R> {
    inner: R,
    scanner: MaskScanner,
    flag: Arc<AtomicBool>,
}

impl<R> MaskCheck<R> {
    /// Wrap `inner`; `flag` is set when an unmasked frame is seen.
    pub fn new(inner: R, flag: Arc<AtomicBool>) -> Self {
        MaskCheck {
            inner,
            scanner: MaskScanner::default(),
            flag,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MaskCheck<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.scanner.scan(&buf.filled()[before..]) {
                    Poll::Ready(Ok(()))
                } else {
                    this.flag.store(true, Ordering::Release);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unmasked client frame",
                    )))
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(masked: bool, len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            f.push(m | len as u8);
        } else if len < 65536 {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xAAu8, len));
        f
    }

    #[test]
    fn follows_frames_of_every_length_class_in_any_chunking() {
        let stream: Vec<u8> = [
            frame(true, 0),
            frame(true, 125),
            frame(true, 126),
            frame(true, 70_000),
            frame(true, 3),
        ]
        .concat();
        for chunk in [1, 2, 3, 7, 4096, stream.len()] {
            let mut s = MaskScanner::default();
            assert!(stream.chunks(chunk).all(|c| s.scan(c)), "chunk {chunk}");
            assert_eq!(s.state, State::Head { second: false });
        }
        let bad: Vec<u8> = [frame(true, 200), frame(false, 5)].concat();
        for chunk in [1, 5, bad.len()] {
            let mut s = MaskScanner::default();
            assert!(!bad.chunks(chunk).all(|c| s.scan(c)), "chunk {chunk}");
        }
    }
}
