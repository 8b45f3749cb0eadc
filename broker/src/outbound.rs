//! Per-connection outbound queue and its single writer task.
//!
//! Frames are queued as complete, pre-framed WebSocket messages (`Bytes`,
//! header and payload together). Server frames are unmasked, so one
//! `Bytes` built for a room message is shared by every recipient: the
//! payload is encoded once per encoding and never copied per recipient.
//!
//! Queue bound and overflow policy (`--outbound-queue`, default 1024
//! frames): when a connection's queue is full, an *ephemeral* frame
//! (typing, presence) is dropped and counted; any other frame closes the
//! connection with 4003 (slow consumer), because skipping a sequenced
//! message would break the no-gap guarantee. The client recovers with
//! `join {since}`.
//!
//! The writer drains up to `--write-batch` frames per wake-up and writes
//! them with one vectored write, so a busy connection costs one syscall per
//! batch rather than per message.

use std::{
    io::IoSlice,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload};
use shoal_proto::{CloseCode, Encoding, ServerFrame};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Build a complete unmasked WebSocket frame.
pub fn ws_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut head = [0u8; 14];
    let n = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
    let mut b = BytesMut::with_capacity(n + payload.len());
    b.put_slice(&head[..n]);
    b.put_slice(payload);
    b.freeze()
}

/// A close frame with a code and its reason text.
pub fn close_frame(code: CloseCode) -> Bytes {
    let mut p = Vec::with_capacity(2 + code.reason().len());
    p.extend_from_slice(&code.as_u16().to_be_bytes());
    p.extend_from_slice(code.reason().as_bytes());
    ws_frame(OpCode::Close, &p)
}

/// Encode a server frame for one encoding, as a ready-to-write WebSocket frame.
pub fn encode_ws(enc: Encoding, frame: &ServerFrame) -> Option<Bytes> {
    match enc.encode_server(frame) {
        Ok(payload) => Some(ws_frame(
            if enc.is_binary() {
                OpCode::Binary
            } else {
                OpCode::Text
            },
            &payload,
        )),
        Err(e) => {
            tracing::error!(error = %e, kind = frame.kind(), "encoding a server frame failed");
            None
        }
    }
}

/// A server frame encoded lazily, at most once per encoding, and shared by
/// every recipient that uses that encoding.
pub struct SharedFrame<'a> {
    frame: &'a ServerFrame,
    cache: [Option<Bytes>; 2],
}

impl<'a> SharedFrame<'a> {
    /// Wrap a frame; nothing is encoded yet.
    pub fn new(frame: &'a ServerFrame) -> Self {
        SharedFrame {
            frame,
            cache: [None, None],
        }
    }

    /// The frame itself.
    pub fn frame(&self) -> &ServerFrame {
        self.frame
    }

    /// The frame's bytes in `enc`.
    pub fn get(&mut self, enc: Encoding) -> Option<Bytes> {
        let slot = &mut self.cache[enc.index()];
        if slot.is_none() {
            *slot = encode_ws(enc, self.frame);
        }
        slot.clone()
    }
}

/// Shared close state of a connection: the first close code set wins, and
/// cancelling the token wakes both the reader and the writer.
#[derive(Default)]
pub struct ConnCtl {
    code: AtomicU16,
    /// Cancelled when the connection must end.
    pub cancel: CancellationToken,
}

impl ConnCtl {
    /// New control block whose token is a child of `parent` (server shutdown).
    pub fn new(parent: &CancellationToken) -> Self {
        ConnCtl {
            code: AtomicU16::new(0),
            cancel: parent.child_token(),
        }
    }

    /// The close code chosen, if any.
    pub fn code(&self) -> Option<CloseCode> {
        let c = self.code.load(Ordering::Acquire);
        CloseCode::ALL.into_iter().find(|k| k.as_u16() == c)
    }
}

/// Outcome of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Ephemeral frame dropped: queue full.
    Dropped,
    /// The connection is gone or was just closed as a slow consumer.
    Closed,
}

/// Cheap, clonable handle to a live connection, kept in rooms and the user
/// registry.
#[derive(Clone)]
pub struct ConnHandle {
    /// Process-unique connection id.
    pub id: u64,
    /// Authenticated user.
    pub user: Arc<str>,
    /// Token id the connection authenticated with.
    pub jti: Arc<str>,
    /// Wire encoding.
    pub encoding: Encoding,
    tx: mpsc::Sender<Bytes>,
    ctl: Arc<ConnCtl>,
    metrics: Arc<Metrics>,
}

impl ConnHandle {
    /// Create a handle and the receiving end for its writer.
    pub fn new(
        user: Arc<str>,
        jti: Arc<str>,
        encoding: Encoding,
        queue: usize,
        ctl: Arc<ConnCtl>,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(queue);
        (
            ConnHandle {
                id: crate::metrics::next_id(),
                user,
                jti,
                encoding,
                tx,
                ctl,
                metrics,
            },
            rx,
        )
    }

    /// Queue a pre-framed message under the slow-consumer policy.
    pub fn push(&self, frame: Bytes, ephemeral: bool) -> Pushed {
        match self.tx.try_send(frame) {
            Ok(()) => Pushed::Queued,
            Err(mpsc::error::TrySendError::Full(_)) if ephemeral => {
                self.metrics.ephemeral_dropped.inc();
                Pushed::Dropped
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseCode::SlowConsumer);
                Pushed::Closed
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Pushed::Closed,
        }
    }

    /// Encode and queue a frame for this connection alone.
    pub fn send(&self, frame: &ServerFrame) -> Pushed {
        match encode_ws(self.encoding, frame) {
            Some(b) => {
                self.metrics.frames_out(frame.kind(), 1);
                if let ServerFrame::Error { code, .. } = frame {
                    if let Some(c) = error_code(*code) {
                        self.metrics.error(c);
                    }
                }
                self.push(b, frame.is_ephemeral())
            }
            None => Pushed::Closed,
        }
    }

    /// Encode and queue a frame, waiting while the queue is full (replay:
    /// the reader of this connection is the one waiting, so a client that
    /// asks for a long replay is paced by its own reading). False if the
    /// connection is gone.
    pub async fn send_wait(&self, frame: &ServerFrame) -> bool {
        let Some(b) = encode_ws(self.encoding, frame) else {
            return false;
        };
        self.metrics.frames_out(frame.kind(), 1);
        tokio::select! {
            r = self.tx.send(b) => r.is_ok(),
            _ = self.ctl.cancel.cancelled() => false,
        }
    }

    /// Close the connection with `code` (first caller wins).
    pub fn close(&self, code: CloseCode) {
        if self
            .ctl
            .code
            .compare_exchange(0, code.as_u16(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.metrics.close(code);
            self.ctl.cancel.cancel();
        }
    }

    /// Token cancelled when the connection ends.
    pub fn cancel_token(&self) -> CancellationToken {
        self.ctl.cancel.clone()
    }

    /// True once the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.ctl.cancel.is_cancelled()
    }
}

fn error_code(c: u16) -> Option<shoal_proto::ErrorCode> {
    use shoal_proto::ErrorCode::*;
    [
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        TooLarge,
        RateLimited,
        Internal,
        Unavailable,
    ]
    .into_iter()
    .find(|e| e.as_u16() == c)
}

/// Socket writer settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterOpts {
    /// Frames per vectored write.
    pub batch: usize,
    /// Longest a write may take.
    pub write_timeout: Duration,
    /// Server ping interval.
    pub ping_interval: Duration,
}

/// Drain the queue into the socket until the connection is cancelled, then
/// send the close frame. On a normal close or shutdown what is already
/// queued is flushed first (bounded by the queue size and write timeout);
/// a slow consumer is closed without draining.
pub async fn run_socket_writer<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Bytes>,
    ctl: Arc<ConnCtl>,
    opts: WriterOpts,
    metrics: Arc<Metrics>,
) {
    // Grown on first use: an idle connection holds no batch buffer.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + opts.ping_interval,
        opts.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One cancellation future for the connection's life, polled only when
    // the queue is empty: polling it takes the token's mutex, which showed
    // in profiles of wide fan-outs as much as the write itself. A close
    // (its code is set before the token is cancelled) is seen at the next
    // batch through the atomic; a server shutdown once the queue is empty.
    let cancelled = ctl.cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, opts.batch) => {
                if n == 0 || ctl.code.load(Ordering::Acquire) != 0 {
                    // Frames already taken stay in `batch`, ahead of the
                    // rest of the queue, for the drain below.
                    break;
                }
                metrics.outbound_queue_depth.observe((n + rx.len()) as f64);
                if write_batch(&mut io, &mut batch, opts.write_timeout, &metrics).await.is_err() {
                    ctl.cancel.cancel();
                    return;
                }
            }
            _ = &mut cancelled => break,
            _ = ping.tick() => {
                batch.push(ws_frame(OpCode::Ping, b""));
                if write_batch(&mut io, &mut batch, opts.write_timeout, &metrics).await.is_err() {
                    ctl.cancel.cancel();
                    return;
                }
            }
        }
    }
    let code = ctl.code().unwrap_or(CloseCode::GoingAway);
    if code == CloseCode::SlowConsumer {
        batch.clear();
    } else {
        while let Ok(b) = rx.try_recv() {
            batch.push(b);
        }
    }
    rx.close();
    batch.push(close_frame(code));
    let _ = write_batch(
        &mut io,
        &mut batch,
        Duration::from_secs(2).min(opts.write_timeout),
        &metrics,
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}

async fn write_batch<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut Vec<Bytes>,
    timeout: Duration,
    metrics: &Metrics,
) -> std::io::Result<()> {
    metrics.write_batch_frames.observe(batch.len() as f64);
    let total: usize = batch.iter().map(|b| b.len()).sum();
    let res = {
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
        let write = async {
            let mut bufs = &mut slices[..];
            while !bufs.is_empty() {
                let n = io.write_vectored(bufs).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut bufs, n);
            }
            io.flush().await
        };
        tokio::pin!(write);
        // Usually the socket takes the whole batch (and the flush TLS
        // needs) at the first poll: only a write that has to wait arms the
        // timeout (a timer entry per write is measurable at hundreds of
        // thousands of writes a second).
        match futures_util::FutureExt::now_or_never(&mut write) {
            Some(r) => Ok(r),
            None => tokio::time::timeout(timeout, write).await,
        }
    };
    batch.clear();
    match res {
        Ok(Ok(())) => {
            metrics.bytes_out.inc_by(total as u64);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_correct_headers() {
        let b = ws_frame(OpCode::Text, b"hi");
        assert_eq!(&b[..], b"\x81\x02hi");
        let big = ws_frame(OpCode::Binary, &[0u8; 300]);
        assert_eq!(&big[..4], &[0x82, 126, 1, 44]);
        let c = close_frame(CloseCode::SlowConsumer);
        assert_eq!(&c[..4], &[0x88, 15, 0x0f, 0xa3]);
    }

    #[tokio::test]
    async fn slow_consumer_policy() {
        let m = Arc::new(Metrics::new("t"));
        let ctl = Arc::new(ConnCtl::default());
        let (h, _rx) = ConnHandle::new("u".into(), "j".into(), Encoding::Json, 2, ctl.clone(), m);
        assert_eq!(h.push(Bytes::from_static(b"1"), false), Pushed::Queued);
        assert_eq!(h.push(Bytes::from_static(b"2"), false), Pushed::Queued);
        assert_eq!(h.push(Bytes::from_static(b"e"), true), Pushed::Dropped);
        assert!(!h.is_closing());
        assert_eq!(h.push(Bytes::from_static(b"3"), false), Pushed::Closed);
        assert!(h.is_closing());
        assert_eq!(ctl.code(), Some(CloseCode::SlowConsumer));
    }

    #[tokio::test]
    async fn writer_batches_and_closes() {
        let m = Arc::new(Metrics::new("t"));
        let ctl = Arc::new(ConnCtl::default());
        let (h, rx) = ConnHandle::new(
            "u".into(),
            "j".into(),
            Encoding::Json,
            16,
            ctl.clone(),
            m.clone(),
        );
        for i in 0..5u8 {
            h.push(ws_frame(OpCode::Text, &[b'a' + i]), false);
        }
        let (client, server) = tokio::io::duplex(4096);
        let opts = WriterOpts {
            batch: 64,
            write_timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(60),
        };
        let w = tokio::spawn(run_socket_writer(server, rx, ctl, opts, m));
        tokio::time::sleep(Duration::from_millis(20)).await;
        h.close(CloseCode::GoingAway);
        w.await.expect("writer");
        let mut out = Vec::new();
        let mut client = client;
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut out)
            .await
            .expect("read");
        assert!(out.starts_with(b"\x81\x01a\x81\x01b\x81\x01c\x81\x01d\x81\x01e"));
        assert_eq!(&out[15..19], &[0x88, 10, 0x03, 0xe9]);
    }
}
