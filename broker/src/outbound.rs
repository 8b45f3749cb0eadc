//! What goes out to one connection: its outbound queue, the direct write
//! path, and the drain.
//!
//! Frames are complete, pre-framed WebSocket messages (`Bytes`, header and
//! payload together). Server frames are unmasked, so one `Bytes` built for
//! a room message is shared by every recipient: the payload is encoded
//! once per encoding and never copied per recipient.
//!
//! Rules:
//! - **Direct write first.** On a plain TCP connection whose queue is
//!   empty, [`ConnHandle::push`] writes the frame to the socket at once
//!   (`try_write`, never blocking), from whichever task produced it: a
//!   delivery costs one syscall and no task wake-up. Only what the socket
//!   does not take (`WouldBlock`, or the rest of a partial write) is
//!   queued, and the connection's drainer is woken for it.
//! - **One order.** Every write, direct or drained, happens under the
//!   queue's lock, and a frame is written directly only when nothing is
//!   queued before it, so a connection sees frames in the order they were
//!   pushed.
//! - **A queue that costs nothing when empty.** The queue allocates on
//!   first use and is freed when drained.
//! - **Bound and overflow policy** (`--outbound-queue`, default 1024
//!   frames): when a connection's queue is full, an *ephemeral* frame
//!   (typing, presence, pong) is dropped and counted; any other frame
//!   closes the connection with 4003 (slow consumer), because skipping a
//!   sequenced message would break the no-gap guarantee. The client
//!   recovers with `join {since}`.
//! - **The drain** takes up to `--write-batch` frames per vectored write:
//!   on plain TCP the connection's own task does it when the socket is
//!   writable again; on TLS (whose writes need the stream) a writer task
//!   ([`run_socket_writer`]) does all of a connection's writes. A drain
//!   that makes no progress for `--write-timeout` drops the connection.

use std::{
    collections::VecDeque,
    io::IoSlice,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload};
use parking_lot::Mutex;
use shoal_proto::{CloseCode, Encoding, ServerFrame};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::Notify,
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

/// A server frame encoded lazily, at most once per encoding (and once per
/// Socket.IO namespace for Socket.IO recipients), and shared by every
/// recipient that uses that encoding.
pub struct SharedFrame<'a> {
    frame: &'a ServerFrame,
    cache: [Option<Bytes>; 2],
    sio: Vec<(Option<Arc<str>>, Arc<crate::sio::Payload>)>,
}

impl<'a> SharedFrame<'a> {
    /// Wrap a frame; nothing is encoded yet.
    pub fn new(frame: &'a ServerFrame) -> Self {
        SharedFrame {
            frame,
            cache: [None, None],
            sio: Vec::new(),
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

    /// The frame as a Socket.IO event in the namespace whose room prefix
    /// is `prefix`.
    pub fn sio(&mut self, prefix: &Option<Arc<str>>) -> Arc<crate::sio::Payload> {
        if let Some((_, p)) = self.sio.iter().find(|(k, _)| k == prefix) {
            return p.clone();
        }
        let p = Arc::new(crate::sio::Payload::event(self.frame, prefix.as_deref()));
        self.sio.push((prefix.clone(), p.clone()));
        p
    }
}

/// Most frames in one vectored write (a stack array of slices).
const MAX_WRITE_BATCH: usize = 64;

/// Where a connection's bytes go.
pub enum Sink {
    /// A plain TCP socket, written directly (see the module docs).
    Direct(Arc<TcpStream>),
    /// Queued only; another task drains the queue (a TLS writer task, or
    /// a test's [`Inbox`]).
    Drained,
    /// A Socket.IO socket: frames become events on socketioxide's own
    /// bounded per-socket queue (see `sio`).
    SocketIo(Box<crate::sio::SioOut>),
}

/// The queue and what the drain needs to know about its front.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<Bytes>,
    /// The front frame was partly written: it must be finished before
    /// anything else (a close frame included) goes out.
    front_started: bool,
    /// No more frames are accepted (closing).
    closed: bool,
}

/// What every handle of a connection shares.
struct Shared {
    /// The first close code chosen (0: none yet).
    code: AtomicU16,
    /// Cancelled when the connection must end; a child of the server's
    /// shutdown token.
    cancel: CancellationToken,
    out: Mutex<Outbox>,
    /// Wakes the drainer when the queue becomes non-empty (a permit is
    /// kept if it is not waiting).
    wake: Notify,
    /// Wakes senders waiting for room in the queue ([`ConnHandle::send_wait`]).
    space: Notify,
    sock: Option<Arc<TcpStream>>,
    /// A Socket.IO socket's output (then `out` stays empty).
    sio: Option<Box<crate::sio::SioOut>>,
    /// `--outbound-queue`.
    limit: usize,
    /// `--write-batch`, at most [`MAX_WRITE_BATCH`].
    batch: usize,
    metrics: Arc<Metrics>,
    /// When the connection was opened (for the admin console).
    opened: std::time::Instant,
    /// Where it comes from and how (set once by the transport).
    peer: std::sync::OnceLock<Peer>,
}

/// Where a connection comes from, for the admin console.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address, as the broker sees it.
    pub addr: Option<std::net::SocketAddr>,
    /// `websocket` or `socket.io`.
    pub transport: &'static str,
}

/// Outcome of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Written or queued.
    Queued,
    /// Ephemeral frame dropped: queue full.
    Dropped,
    /// The connection is gone or was just closed as a slow consumer.
    Closed,
}

/// What a drain step left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The queue is empty.
    Empty,
    /// The socket takes no more now; wait until it is writable.
    Blocked,
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
    shared: Arc<Shared>,
}

impl ConnHandle {
    /// A handle writing to `sink`, closed when `parent` (server shutdown)
    /// is cancelled. `queue`: `--outbound-queue`; `batch`: `--write-batch`.
    pub fn new(
        user: Arc<str>,
        jti: Arc<str>,
        encoding: Encoding,
        (queue, batch): (usize, usize),
        sink: Sink,
        parent: &CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        ConnHandle {
            id: crate::metrics::next_id(),
            user,
            jti,
            encoding,
            shared: Arc::new(Shared {
                code: AtomicU16::new(0),
                cancel: parent.child_token(),
                out: Mutex::new(Outbox::default()),
                wake: Notify::new(),
                space: Notify::new(),
                sock: match &sink {
                    Sink::Direct(s) => Some(s.clone()),
                    _ => None,
                },
                sio: match sink {
                    Sink::SocketIo(o) => Some(o),
                    _ => None,
                },
                limit: queue.max(1),
                batch: batch.clamp(1, MAX_WRITE_BATCH),
                metrics,
                opened: std::time::Instant::now(),
                peer: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Record where the connection comes from (once; later calls are ignored).
    pub fn set_peer(&self, peer: Peer) {
        let _ = self.shared.peer.set(peer);
    }

    /// What the admin console shows of this connection: its peer, its age
    /// and the frames waiting in its queue.
    pub fn describe(&self) -> (Option<Peer>, std::time::Duration, usize) {
        (
            self.shared.peer.get().cloned(),
            self.shared.opened.elapsed(),
            self.shared.out.lock().queue.len(),
        )
    }

    /// Queue a pre-framed message under the slow-consumer policy, writing
    /// it at once where the socket allows (see the module docs).
    pub fn push(&self, frame: Bytes, ephemeral: bool) -> Pushed {
        let s = &*self.shared;
        let mut o = s.out.lock();
        if o.closed {
            return Pushed::Closed;
        }
        if o.queue.is_empty() {
            let written = match &s.sock {
                None => 0,
                Some(sock) => match sock.try_write(&frame) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(_) => {
                        // The peer is gone; its reader sees it too.
                        o.closed = true;
                        drop(o);
                        s.cancel.cancel();
                        return Pushed::Closed;
                    }
                },
            };
            if written > 0 {
                s.metrics.bytes_out.inc_by(written as u64);
            }
            if written == frame.len() {
                s.metrics.direct_writes.inc();
                return Pushed::Queued;
            }
            o.front_started = written > 0;
            o.queue.push_back(if written > 0 {
                frame.slice(written..)
            } else {
                frame
            });
            drop(o);
            s.metrics.outbound_queue_depth.observe(1.0);
            s.wake.notify_one();
            return Pushed::Queued;
        }
        if o.queue.len() >= s.limit {
            drop(o);
            if ephemeral {
                s.metrics.ephemeral_dropped.inc();
                return Pushed::Dropped;
            }
            self.close(CloseCode::SlowConsumer);
            return Pushed::Closed;
        }
        // The drainer was woken when the queue became non-empty and keeps
        // going until it is empty again.
        o.queue.push_back(frame);
        let depth = o.queue.len();
        drop(o);
        s.metrics.outbound_queue_depth.observe(depth as f64);
        Pushed::Queued
    }

    /// Queue a frame shared by many recipients (encoded once per
    /// encoding, see [`SharedFrame`]). False if it could not be encoded.
    pub fn deliver(&self, shared: &mut SharedFrame<'_>, ephemeral: bool) -> bool {
        if let Some(sio) = &self.shared.sio {
            let p = shared.sio(sio.prefix());
            self.after(sio.emit(&p, ephemeral));
            return true;
        }
        match shared.get(self.encoding) {
            Some(bytes) => {
                self.push(bytes, ephemeral);
                true
            }
            None => false,
        }
    }

    /// Apply the slow-consumer policy to a Socket.IO send's outcome.
    fn after(&self, p: Pushed) -> Pushed {
        match p {
            Pushed::Dropped => {
                self.shared.metrics.ephemeral_dropped.inc();
            }
            Pushed::Closed if !self.is_closing() => self.close(CloseCode::SlowConsumer),
            _ => {}
        }
        p
    }

    /// Encode and queue a frame for this connection alone.
    pub fn send(&self, frame: &ServerFrame) -> Pushed {
        let m = &self.shared.metrics;
        if let ServerFrame::Error { code, .. } = frame {
            if let Some(c) = error_code(*code) {
                m.error(c);
            }
        }
        if let Some(sio) = &self.shared.sio {
            m.frames_out(frame.kind(), 1);
            return self.after(sio.send(frame));
        }
        match encode_ws(self.encoding, frame) {
            Some(b) => {
                m.frames_out(frame.kind(), 1);
                self.push(b, frame.is_ephemeral())
            }
            None => Pushed::Closed,
        }
    }

    /// Encode and queue a frame, waiting while the queue is full (replay:
    /// the connection's own task is the one waiting, so a client that asks
    /// for a long replay is paced by its own reading; its drain runs
    /// meanwhile, see `conn`). False if the connection is gone.
    pub async fn send_wait(&self, frame: &ServerFrame) -> bool {
        if let Some(sio) = &self.shared.sio {
            self.shared.metrics.frames_out(frame.kind(), 1);
            return sio.send_wait(frame, &self.shared.cancel).await;
        }
        let Some(b) = encode_ws(self.encoding, frame) else {
            return false;
        };
        self.shared.metrics.frames_out(frame.kind(), 1);
        loop {
            let space = self.shared.space.notified();
            tokio::pin!(space);
            // Registered before the check, so a drain between the check
            // and the wait is not missed.
            space.as_mut().enable();
            {
                let o = self.shared.out.lock();
                if o.closed {
                    return false;
                }
                if o.queue.len() < self.shared.limit {
                    drop(o);
                    return self.push(b, false) == Pushed::Queued;
                }
            }
            tokio::select! {
                _ = space => {}
                _ = self.shared.cancel.cancelled() => return false,
            }
        }
    }

    /// Close the connection with `code` (first caller wins): no frame is
    /// accepted after it, and the drainer sends the close frame.
    pub fn close(&self, code: CloseCode) {
        if self
            .shared
            .code
            .compare_exchange(0, code.as_u16(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.shared.out.lock().closed = true;
            self.shared.metrics.close(code);
            self.shared.cancel.cancel();
        }
    }

    /// The close code chosen, if any.
    pub fn close_code(&self) -> Option<CloseCode> {
        let c = self.shared.code.load(Ordering::Acquire);
        CloseCode::ALL.into_iter().find(|k| k.as_u16() == c)
    }

    /// Token cancelled when the connection ends.
    pub fn cancel_token(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// Resolves when the connection must end.
    pub async fn cancelled(&self) {
        self.shared.cancel.cancelled().await
    }

    /// Resolves when frames were queued for the drainer.
    pub async fn queued(&self) {
        self.shared.wake.notified().await
    }

    /// True once the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// A Socket.IO socket's output.
    pub fn sio(&self) -> Option<&crate::sio::SioOut> {
        self.shared.sio.as_deref()
    }

    /// The socket of a direct connection.
    pub fn socket(&self) -> Option<&Arc<TcpStream>> {
        self.shared.sock.as_ref()
    }

    /// Write what is queued to a direct connection's socket without
    /// blocking, up to `--write-batch` frames per vectored write. Err: the
    /// socket failed.
    pub fn drain_now(&self) -> std::io::Result<Drained> {
        let s = &*self.shared;
        let Some(sock) = &s.sock else {
            return Ok(Drained::Empty);
        };
        let mut o = s.out.lock();
        let mut wrote = false;
        let r = loop {
            if o.queue.is_empty() {
                // Free the queue's buffer: an idle connection holds none.
                o.queue = VecDeque::new();
                break Ok(Drained::Empty);
            }
            let mut slices = [IoSlice::new(&[]); MAX_WRITE_BATCH];
            let k = o.queue.len().min(s.batch);
            for (slot, b) in slices.iter_mut().zip(o.queue.iter()) {
                *slot = IoSlice::new(b);
            }
            match sock.try_write_vectored(&slices[..k]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    s.metrics.write_batch_frames.observe(k as f64);
                    s.metrics.bytes_out.inc_by(n as u64);
                    advance(&mut o, n);
                    wrote = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    s.metrics.outbound_queue_depth.observe(o.queue.len() as f64);
                    break Ok(Drained::Blocked);
                }
                Err(e) => break Err(e),
            }
        };
        drop(o);
        if wrote {
            s.space.notify_waiters();
        }
        r
    }

    /// Drain a direct connection until its queue is empty, waiting for the
    /// socket; fails if the socket takes nothing for `timeout`.
    pub async fn drain(&self, timeout: Duration) -> std::io::Result<()> {
        let Some(sock) = self.socket().cloned() else {
            return Ok(());
        };
        while self.drain_now()? == Drained::Blocked {
            tokio::time::timeout(timeout, sock.writable())
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
        Ok(())
    }

    /// Queue the close frame (after what is queued, or for a slow consumer
    /// after only the frame already begun), then drain a direct connection
    /// for at most `timeout` and shut its socket down. Drained connections
    /// are finished by their writer.
    pub async fn finish(&self, timeout: Duration) {
        let code = self.close_frame_queued();
        if let Some(sock) = &self.shared.sock {
            let _ = tokio::time::timeout(timeout, self.drain(timeout)).await;
            // FIN after the close frame, now: the socket itself closes only
            // when the last handle is dropped, and closing a socket with
            // unread input would send RST, which can make the client
            // discard the close frame.
            let _ = socket2::SockRef::from(sock.as_ref()).shutdown(std::net::Shutdown::Write);
        }
        tracing::trace!(conn = self.id, ?code, "close frame queued");
    }

    /// Mark closed and queue the close frame; the code it carries.
    fn close_frame_queued(&self) -> CloseCode {
        let code = self.close_code().unwrap_or(CloseCode::GoingAway);
        let mut o = self.shared.out.lock();
        o.closed = true;
        if code == CloseCode::SlowConsumer {
            let keep = usize::from(o.front_started);
            o.queue.truncate(keep);
        }
        o.queue.push_back(close_frame(code));
        code
    }

    /// Take up to `--write-batch` whole frames off the queue (a drained
    /// connection's writer).
    fn take_batch(&self, into: &mut Vec<Bytes>) {
        let mut o = self.shared.out.lock();
        let k = o.queue.len().min(self.shared.batch);
        into.extend(o.queue.drain(..k));
        if o.queue.is_empty() {
            o.queue = VecDeque::new();
        }
        o.front_started = false;
        drop(o);
        self.shared.space.notify_waiters();
    }
}

/// Drop `n` written bytes from the front of the queue.
fn advance(o: &mut Outbox, mut n: usize) {
    while n > 0 {
        let Some(front) = o.queue.front_mut() else {
            return;
        };
        if n >= front.len() {
            n -= front.len();
            o.queue.pop_front();
            o.front_started = false;
        } else {
            bytes::Buf::advance(front, n);
            o.front_started = true;
            return;
        }
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

/// Do every write of a drained connection (TLS) until it is cancelled,
/// then send the close frame. On a normal close or shutdown what is
/// already queued is flushed first (bounded by the queue size and the
/// write timeout); a slow consumer is closed without draining.
pub async fn run_socket_writer<W: AsyncWrite + Unpin>(
    mut io: W,
    conn: ConnHandle,
    write_timeout: Duration,
) {
    let metrics = conn.shared.metrics.clone();
    // Grown on first use: an idle connection holds no batch buffer.
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = conn.cancelled() => break,
            _ = conn.queued() => {}
        }
        loop {
            conn.take_batch(&mut batch);
            if batch.is_empty() {
                break;
            }
            if write_batch(&mut io, &mut batch, write_timeout, &metrics)
                .await
                .is_err()
            {
                conn.shared.cancel.cancel();
                return;
            }
        }
    }
    conn.close_frame_queued();
    let last = Duration::from_secs(2).min(write_timeout);
    loop {
        conn.take_batch(&mut batch);
        if batch.is_empty()
            || write_batch(&mut io, &mut batch, last, &metrics)
                .await
                .is_err()
        {
            break;
        }
    }
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
        // timeout.
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

/// The receiving end of a [`Sink::Drained`] connection for tests: takes
/// frames off the queue as a writer would.
#[cfg(test)]
pub struct Inbox(ConnHandle);

#[cfg(test)]
impl Inbox {
    /// A handle with no socket and its inbox.
    pub fn pair(user: &str, enc: Encoding, queue: usize, m: Arc<Metrics>) -> (ConnHandle, Inbox) {
        let h = ConnHandle::new(
            user.into(),
            "j".into(),
            enc,
            (queue, 64),
            Sink::Drained,
            &CancellationToken::new(),
            m,
        );
        (h.clone(), Inbox(h))
    }

    /// The next queued frame, if any.
    pub fn try_recv(&mut self) -> Result<Bytes, ()> {
        let mut o = self.0.shared.out.lock();
        let b = o.queue.pop_front().ok_or(())?;
        drop(o);
        self.0.shared.space.notify_waiters();
        Ok(b)
    }

    /// The next frame, waiting for one; None once the connection is closed
    /// and nothing is left.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            if let Ok(b) = self.try_recv() {
                return Some(b);
            }
            if self.0.is_closing() {
                return None;
            }
            tokio::select! {
                _ = self.0.queued() => {}
                _ = self.0.cancelled() => {}
            }
        }
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
        let (h, _rx) = Inbox::pair("u", Encoding::Json, 2, m);
        assert_eq!(h.push(Bytes::from_static(b"1"), false), Pushed::Queued);
        assert_eq!(h.push(Bytes::from_static(b"2"), false), Pushed::Queued);
        assert_eq!(h.push(Bytes::from_static(b"e"), true), Pushed::Dropped);
        assert!(!h.is_closing());
        assert_eq!(h.push(Bytes::from_static(b"3"), false), Pushed::Closed);
        assert!(h.is_closing());
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
        // Nothing is accepted after the close.
        assert_eq!(h.push(Bytes::from_static(b"4"), true), Pushed::Closed);
    }

    #[tokio::test]
    async fn writer_batches_and_closes() {
        let m = Arc::new(Metrics::new("t"));
        let (h, _inbox) = Inbox::pair("u", Encoding::Json, 16, m);
        for i in 0..5u8 {
            h.push(ws_frame(OpCode::Text, &[b'a' + i]), false);
        }
        let (client, server) = tokio::io::duplex(4096);
        let w = tokio::spawn(run_socket_writer(server, h.clone(), Duration::from_secs(1)));
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

    /// A loopback pair whose server side is a direct handle.
    async fn direct_pair(queue: usize) -> (ConnHandle, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        let h = ConnHandle::new(
            "u".into(),
            "j".into(),
            Encoding::Json,
            (queue, 8),
            Sink::Direct(Arc::new(server)),
            &CancellationToken::new(),
            Arc::new(Metrics::new("t")),
        );
        (h, client)
    }

    /// Server frames (unmasked) read off `c` until a close frame: each
    /// frame's opcode and payload.
    async fn read_frames(c: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut out = vec![];
        loop {
            let mut h = [0u8; 2];
            c.read_exact(&mut h).await.expect("head");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut n = [0u8; 2];
                    c.read_exact(&mut n).await.expect("len");
                    usize::from(u16::from_be_bytes(n))
                }
                127 => {
                    let mut n = [0u8; 8];
                    c.read_exact(&mut n).await.expect("len");
                    u64::from_be_bytes(n) as usize
                }
                n => usize::from(n),
            };
            let mut p = vec![0u8; len];
            c.read_exact(&mut p).await.expect("payload");
            let op = h[0] & 0x0f;
            out.push((op, p));
            if op == 8 {
                return out;
            }
        }
    }

    fn numbered(i: u32, size: usize) -> Bytes {
        let mut p = vec![(i % 251) as u8; size];
        p[..4].copy_from_slice(&i.to_be_bytes());
        ws_frame(OpCode::Binary, &p)
    }

    #[tokio::test]
    async fn direct_writes_keep_order_through_a_full_socket_and_its_drain() {
        let (h, mut client) = direct_pair(100_000).await;
        // Nobody reads: the socket fills, the rest queues behind it.
        let mut n = 0u32;
        while h.drain_now().expect("drain") == Drained::Empty || n < 50 {
            assert_eq!(h.push(numbered(n, 16 * 1024), false), Pushed::Queued);
            n += 1;
            assert!(n < 20_000, "the socket never filled");
        }
        for _ in 0..50 {
            assert_eq!(h.push(numbered(n, 16 * 1024), false), Pushed::Queued);
            n += 1;
        }
        // The connection's drainer, as `conn` runs it.
        let d = h.clone();
        let drainer = tokio::spawn(async move {
            loop {
                d.drain(Duration::from_secs(5)).await.expect("drain");
                tokio::select! {
                    _ = d.queued() => {}
                    _ = d.cancelled() => break,
                }
            }
            d.finish(Duration::from_secs(5)).await;
        });
        let reader = tokio::spawn(async move { read_frames(&mut client).await });
        // More while it drains: still in order.
        for _ in 0..50 {
            assert_eq!(h.push(numbered(n, 1000), false), Pushed::Queued);
            n += 1;
            tokio::task::yield_now().await;
        }
        h.close(CloseCode::GoingAway);
        drainer.await.expect("drainer");
        let frames = reader.await.expect("reader");
        let (close, data) = frames.split_last().expect("frames");
        assert_eq!(close.0, 8);
        assert_eq!(&close.1[..2], &1001u16.to_be_bytes());
        assert_eq!(data.len(), n as usize);
        for (i, (op, p)) in data.iter().enumerate() {
            assert_eq!(*op, 2);
            assert_eq!(&p[..4], &(i as u32).to_be_bytes(), "frame {i} out of order");
        }
    }

    #[tokio::test]
    async fn a_full_queue_closes_a_slow_consumer_with_4003_after_the_frame_begun() {
        let (h, mut client) = direct_pair(8).await;
        let mut n = 0u32;
        let pushed = loop {
            match h.push(numbered(n, 16 * 1024), false) {
                Pushed::Queued => n += 1,
                other => break other,
            }
            assert!(n < 20_000, "never closed");
        };
        assert_eq!(pushed, Pushed::Closed);
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
        let reader = tokio::spawn(async move { read_frames(&mut client).await });
        h.finish(Duration::from_secs(5)).await;
        drop(h);
        let frames = reader.await.expect("reader");
        let (close, data) = frames.split_last().expect("frames");
        assert_eq!(&close.1[..2], &4003u16.to_be_bytes());
        // What reached the client is a prefix, in order, whole frames only
        // (the queued rest was dropped, the frame begun was finished).
        assert!(!data.is_empty() && data.len() < n as usize);
        for (i, (_, p)) in data.iter().enumerate() {
            assert_eq!(p.len(), 16 * 1024);
            assert_eq!(&p[..4], &(i as u32).to_be_bytes());
        }
    }
}
