//! One WebSocket connection after the upgrade: its task (reading, frame
//! assembly, limits, decoding, dispatch, pings and timeouts, and on plain
//! TCP its writes) and the session state it owns.
//!
//! Rules:
//! - **One task per plain-TCP connection, no buffer while idle.** The task
//!   waits for readiness and reads with `try_read` into a buffer its
//!   runtime thread owns; the connection keeps bytes only for a frame not
//!   complete yet (`wsframe` parses heads; fastwebsockets unmasks). Its
//!   writes are direct (see `outbound`); the task drains only what the
//!   socket did not take. TLS connections read the same way from their
//!   stream and write through a writer task.
//! - Messages are handled one at a time, in order; a direct connection's
//!   queue keeps draining while one is handled.
//! - One timer per connection, moved only when it fires: pings, the idle
//!   timeout, the token's expiry.
//! - The connection ends when its cancellation token fires; the first
//!   close code set wins and is the one sent.

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use fastwebsockets::OpCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use shoal_proto::{ClientFrame, CloseCode, Encoding, ServerFrame};
use tokio::time::Instant;

use crate::{
    auth::Claims,
    outbound::{run_socket_writer, ws_frame, ConnHandle},
    session::{Admit, Session},
    state::AppState,
};

/// What one WebSocket frame amounts to, after fragment assembly.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A fragment was buffered; nothing to do yet.
    Pending,
    /// The frame itself is a complete data message (no copy made).
    Whole,
    /// A fragmented message, reassembled.
    Reassembled(bytes::Bytes),
    /// A ping to answer (after the rate check).
    Ping,
    /// A pong: nothing to do.
    Pong,
    /// The connection must close with this code.
    Close(CloseCode),
}

/// Reassembles fragmented messages under the message size cap (the frame
/// parser caps each frame, not a reassembled message), enforces the
/// fragmentation rules of RFC 6455 §5.4, and checks that text messages are
/// UTF-8.
pub struct Assembler {
    max: usize,
    message: Option<(OpCode, BytesMut)>,
}

impl Assembler {
    /// Messages over `max` bytes close the connection with 1009.
    pub fn new(max: usize) -> Self {
        Assembler { max, message: None }
    }

    /// Feed one frame.
    pub fn feed(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) -> Step {
        match opcode {
            OpCode::Close => Step::Close(close_reply(payload)),
            OpCode::Pong => Step::Pong,
            OpCode::Ping => Step::Ping,
            OpCode::Text | OpCode::Binary => {
                if self.message.is_some() {
                    return Step::Close(CloseCode::Protocol);
                }
                if payload.len() > self.max {
                    return Step::Close(CloseCode::TooBig);
                }
                if fin {
                    // A text message must be UTF-8 (RFC 6455 §8.1): 1007.
                    if opcode == OpCode::Text && std::str::from_utf8(payload).is_err() {
                        return Step::Close(CloseCode::InvalidPayload);
                    }
                    return Step::Whole;
                }
                let mut buf = BytesMut::with_capacity((payload.len() * 2).min(self.max));
                buf.extend_from_slice(payload);
                self.message = Some((opcode, buf));
                Step::Pending
            }
            OpCode::Continuation => {
                let Some((op, buf)) = self.message.as_mut() else {
                    return Step::Close(CloseCode::Protocol);
                };
                if buf.len() + payload.len() > self.max {
                    self.message = None;
                    return Step::Close(CloseCode::TooBig);
                }
                buf.extend_from_slice(payload);
                if !fin {
                    return Step::Pending;
                }
                let op = *op;
                let buf = self.message.take().map(|(_, b)| b).unwrap_or_default();
                if op == OpCode::Text && std::str::from_utf8(&buf).is_err() {
                    return Step::Close(CloseCode::InvalidPayload);
                }
                Step::Reassembled(buf.freeze())
            }
        }
    }
}

/// The code to answer a client's close frame with (RFC 6455 §5.5.1,
/// §7.4): an empty body or a valid code with a UTF-8 reason is a normal
/// close; a 1-byte body or a code no endpoint may send is a protocol error
/// (1002); a reason that is not UTF-8 is 1007.
fn close_reply(payload: &[u8]) -> CloseCode {
    match payload {
        [] => CloseCode::Normal,
        [_] => CloseCode::Protocol,
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                CloseCode::Protocol
            } else if std::str::from_utf8(reason).is_err() {
                CloseCode::InvalidPayload
            } else {
                CloseCode::Normal
            }
        }
    }
}

/// How a connection's bytes travel after the upgrade.
pub enum Transport {
    /// Plain TCP, recovered from hyper after the upgrade (its buffers
    /// released): read on readiness into a per-thread scratch buffer,
    /// written directly, one task for everything.
    Plain {
        /// The socket.
        sock: Arc<tokio::net::TcpStream>,
        /// Bytes hyper had read past the handshake.
        early: bytes::Bytes,
    },
    /// Any other stream (TLS): buffered reads in the connection's task,
    /// every write in a writer task.
    Stream(TokioIo<Upgraded>),
}

impl Transport {
    /// Recover the TCP socket from an upgraded plain connection; any other
    /// stream stays as it is.
    pub fn from_upgraded(up: Upgraded) -> Self {
        type PlainIo = TokioIo<crate::httpconn::WriteDeadline<tokio::net::TcpStream>>;
        match up.downcast::<PlainIo>() {
            Ok(parts) => {
                let sock = parts.io.into_inner().into_inner();
                // The socket's read and write waker slots still hold the
                // HTTP connection task's wakers, and a waker keeps its
                // task's memory (~5 KB, sized for hyper's connection
                // future) allocated. This engine waits with `readable()`
                // and `writable()`, which never overwrite those slots, so
                // replace them with no-op wakers now.
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                let _ = sock.poll_read_ready(&mut cx);
                let _ = sock.poll_write_ready(&mut cx);
                Transport::Plain {
                    sock: Arc::new(sock),
                    // A copy, so that hyper's read buffer is not pinned.
                    early: bytes::Bytes::copy_from_slice(&parts.read_buf),
                }
            }
            Err(up) => Transport::Stream(TokioIo::new(up)),
        }
    }
}

/// Bytes read from a client per read call, into a buffer each runtime
/// thread owns; a connection keeps bytes only for a frame not complete yet.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on this thread's scratch buffer (allocated on first use). `f`
/// is synchronous: the buffer is never held across an `.await`.
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|cell| {
        let mut scratch = cell.borrow_mut();
        if scratch.len() < SCRATCH {
            scratch.resize(SCRATCH, 0);
        }
        f(&mut scratch[..])
    })
}

/// The read side of one connection: the bytes of a frame not complete
/// yet, and fragment assembly.
struct Reader {
    /// Empty (no allocation) between frames.
    partial: Vec<u8>,
    assembler: Assembler,
    /// Largest payload of one frame.
    max_payload: usize,
}

/// What reading produced.
enum Read {
    /// Messages to dispatch, in order (possibly none).
    Messages(Vec<ClientFrame>),
    /// Readiness without data (it happens): not activity.
    Nothing,
    /// The peer closed the TCP connection, or reading failed.
    Eof,
}

impl Reader {
    /// Parse every complete frame in `data` (unmasking in place), act on
    /// control frames, and collect the messages; returns how many bytes
    /// were consumed, or false in `go_on` if the connection must end.
    fn frames(
        &mut self,
        data: &mut [u8],
        session: &mut Session,
        out: &mut Vec<ClientFrame>,
    ) -> (usize, bool) {
        let mut off = 0;
        loop {
            let rest = &mut data[off..];
            let head = match crate::wsframe::parse_head(rest, self.max_payload) {
                Ok(Some(h)) if h.frame_len() <= rest.len() => h,
                Ok(_) => return (off, true),
                Err(e) => {
                    tracing::debug!(conn = session.handle.id, error = %e, "websocket protocol error");
                    session.handle.close(e.close_code());
                    return (off, false);
                }
            };
            let payload = &mut rest[head.head_len..head.frame_len()];
            crate::wsframe::unmask(payload, head.mask);
            off += head.frame_len();
            let step = self.assembler.feed(head.fin, head.opcode, payload);
            // Every inbound frame takes a token, whatever it is: pongs and
            // fragments cost the broker as much as messages do. A complete
            // message takes its token in `accept`.
            if matches!(step, Step::Pending | Step::Pong | Step::Ping) {
                match session.admit(None) {
                    Admit::Yes => {}
                    Admit::Refused => continue,
                    Admit::Close => return (off, false),
                }
            }
            match step {
                Step::Pending | Step::Pong => {}
                Step::Close(code) => {
                    session.handle.close(code);
                    return (off, false);
                }
                Step::Ping => {
                    // Best effort, like other ephemeral frames.
                    let _ = session.handle.push(ws_frame(OpCode::Pong, payload), true);
                }
                Step::Whole => {
                    if let Some(f) = session.accept(payload) {
                        out.push(f);
                    } else if session.handle.is_closing() {
                        return (off, false);
                    }
                }
                Step::Reassembled(buf) => {
                    if let Some(f) = session.accept(&buf) {
                        out.push(f);
                    } else if session.handle.is_closing() {
                        return (off, false);
                    }
                }
            }
        }
    }

    /// Parse what arrived (`n` new bytes at the start of `fresh`), keeping
    /// the bytes of an incomplete frame.
    fn ingest(&mut self, fresh: &mut [u8], session: &mut Session) -> Option<Vec<ClientFrame>> {
        let mut out = Vec::new();
        let go_on = if self.partial.is_empty() {
            let (used, go_on) = self.frames(fresh, session, &mut out);
            if go_on {
                self.partial.extend_from_slice(&fresh[used..]);
            }
            go_on
        } else {
            self.partial.extend_from_slice(fresh);
            let mut buf = std::mem::take(&mut self.partial);
            let (used, go_on) = self.frames(&mut buf, session, &mut out);
            if go_on && used < buf.len() {
                buf.drain(..used);
                self.partial = buf;
            }
            go_on
        };
        go_on.then_some(out)
    }

    /// Read what a plain socket has (it was reported readable) and parse it.
    fn read_plain(&mut self, sock: &tokio::net::TcpStream, session: &mut Session) -> Option<Read> {
        with_scratch(|scratch| match sock.try_read(scratch) {
            Ok(0) => Some(Read::Eof),
            Ok(n) => self.ingest(&mut scratch[..n], session).map(Read::Messages),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(Read::Nothing),
            Err(_) => Some(Read::Eof),
        })
    }
}

/// Serve an upgraded connection until it ends.
pub async fn serve(state: Arc<AppState>, transport: Transport, claims: Claims, encoding: Encoding) {
    let cfg = &state.cfg.conn;
    let metrics = state.metrics.clone();
    // For the admin console (a TLS stream's peer is not kept here).
    let handle_sink_addr = match &transport {
        Transport::Plain { sock, .. } => sock.peer_addr().ok(),
        Transport::Stream(_) => None,
    };
    let (sink, early, stream) = match transport {
        Transport::Plain { sock, early } => (crate::outbound::Sink::Direct(sock), early, None),
        Transport::Stream(io) => (
            crate::outbound::Sink::Drained,
            bytes::Bytes::new(),
            Some(io),
        ),
    };
    let handle = ConnHandle::new(
        claims.sub.as_str().into(),
        claims.jti.as_str().into(),
        encoding,
        (cfg.outbound_queue, cfg.write_batch),
        sink,
        &state.shutdown,
        metrics.clone(),
    );
    handle.set_peer(crate::outbound::Peer {
        addr: handle_sink_addr,
        transport: "websocket",
    });
    // TLS: reads here, every write in a writer task.
    let (mut tls_read, writer) = match stream {
        Some(io) => {
            let (r, w) = tokio::io::split(io);
            let writer = tokio::spawn(run_socket_writer(w, handle.clone(), cfg.write_timeout));
            (Some(r), Some(writer))
        }
        None => (None, None),
    };
    let sock = handle.socket().cloned();
    state.hub.register(&handle);
    state.directory.seen(&handle.user);
    handle.send(&ServerFrame::Hello {
        user: claims.sub.clone(),
        node: state.node.clone(),
        max_message_size: cfg.max_message_size as u64,
        ping_interval_ms: cfg.ping_interval.as_millis() as u64,
    });
    tracing::debug!(conn = handle.id, user = %handle.user, enc = encoding.name(), "connected");

    // From here the session's drop runs the cleanup, however the task
    // ends (return, cancellation, or a panic unwinding through it).
    metrics.connections.inc();
    let mut session = Session::new(state.clone(), handle.clone());
    let mut reader = Reader {
        partial: Vec::new(),
        assembler: Assembler::new(cfg.max_message_size),
        // fastwebsockets' limit was `len >= max + 1`: the same cap.
        max_payload: cfg.max_message_size,
    };

    let token_deadline = token_deadline(claims.exp);
    let now = Instant::now();
    // One timer for pings, the idle timeout and the token's expiry; it is
    // moved only when it fires (a read just records when it happened).
    let mut last_read = now;
    let mut next_ping = now + cfg.ping_interval;
    let timer = tokio::time::sleep_until(next_ping.min(token_deadline));
    tokio::pin!(timer);
    let mut blocked_since: Option<Instant> = None;
    let mut tls_buf = bytes::BytesMut::new();
    let mut pending: Vec<ClientFrame> = Vec::new();
    if !early.is_empty() {
        let mut first = early.to_vec();
        drop(early);
        match reader.ingest(&mut first, &mut session) {
            Some(m) => pending = m,
            None => return Box::pin(finish(session, handle, writer, cfg.write_timeout)).await,
        }
    }
    'conn: loop {
        // Messages first, one at a time, in order.
        for frame in std::mem::take(&mut pending) {
            // Boxed: handling a message (a join with replay, a history
            // query) takes far more state than waiting does, and every
            // idle connection's task would otherwise carry it.
            if !Box::pin(session.run(frame)).await {
                break 'conn;
            }
        }
        // Drain what is queued (a direct connection's own writes).
        let blocked = match handle.drain_now() {
            Ok(crate::outbound::Drained::Empty) => {
                blocked_since = None;
                false
            }
            Ok(crate::outbound::Drained::Blocked) => {
                if blocked_since.is_none() {
                    let now = Instant::now();
                    blocked_since = Some(now);
                    // The timer fires by the write deadline at the latest.
                    let stalled = now + cfg.write_timeout;
                    if stalled < timer.deadline() {
                        timer.as_mut().reset(stalled);
                    }
                }
                true
            }
            Err(_) => break,
        };
        let wait_writable = async {
            match (&sock, blocked) {
                (Some(s), true) => {
                    let _ = s.writable().await;
                }
                _ => std::future::pending().await,
            }
        };
        let readable = async {
            match (&sock, &mut tls_read) {
                (Some(s), _) => s.readable().await.is_ok(),
                (None, Some(r)) => {
                    tls_buf.reserve(4096);
                    matches!(tokio::io::AsyncReadExt::read_buf(r, &mut tls_buf).await, Ok(n) if n > 0)
                }
                (None, None) => false,
            }
        };
        tokio::select! {
            biased;
            _ = handle.cancelled() => break,
            _ = handle.queued(), if sock.is_some() => {}
            _ = wait_writable => {}
            ok = readable => {
                if !ok {
                    break;
                }
                let got = match &sock {
                    Some(s) => reader.read_plain(s, &mut session),
                    None => {
                        let mut data = tls_buf.split().to_vec();
                        reader.ingest(&mut data, &mut session).map(Read::Messages)
                    }
                };
                match got {
                    Some(Read::Messages(m)) => {
                        last_read = Instant::now();
                        pending = m;
                    }
                    Some(Read::Nothing) => {}
                    Some(Read::Eof) | None => break,
                }
                if tls_buf.is_empty() && tls_buf.capacity() > 0 {
                    tls_buf = bytes::BytesMut::new();
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if blocked_since.is_some_and(|t| now.duration_since(t) >= cfg.write_timeout) {
                    // The peer takes nothing: a slow consumer.
                    handle.close(CloseCode::SlowConsumer);
                    break;
                }
                if now >= token_deadline {
                    handle.close(CloseCode::TokenExpired);
                    break;
                }
                if now.duration_since(last_read) >= cfg.idle_timeout {
                    handle.close(CloseCode::IdleTimeout);
                    break;
                }
                if now >= next_ping {
                    let _ = handle.push(ws_frame(OpCode::Ping, b""), true);
                    next_ping = now + cfg.ping_interval;
                }
                let mut next = next_ping.min(last_read + cfg.idle_timeout).min(token_deadline);
                if let Some(t) = blocked_since {
                    next = next.min(t + cfg.write_timeout);
                }
                timer.as_mut().reset(next);
            }
        }
    }
    Box::pin(finish(session, handle, writer, cfg.write_timeout)).await
}

/// End a connection: clean up its session, then send the close frame (a
/// direct connection here, a TLS one through its writer).
async fn finish(
    session: Session,
    handle: ConnHandle,
    writer: Option<tokio::task::JoinHandle<()>>,
    write_timeout: Duration,
) {
    // Cleanup (see `Drop for Session`) cancels the connection.
    drop(session);
    match writer {
        Some(w) => {
            let _ = tokio::time::timeout(write_timeout + Duration::from_secs(1), w).await;
        }
        None => {
            // The peer gets the write timeout to take the close frame
            // (a slow consumer must read what is before it first).
            handle.finish(write_timeout).await;
            if let Some(sock) = handle.socket() {
                let _ = tokio::time::timeout(LINGER, linger(sock)).await;
            }
        }
    }
    tracing::debug!(conn = handle.id, code = ?handle.close_code(), "disconnected");
}

/// Longest a closed connection's input is read and discarded.
const LINGER: Duration = Duration::from_secs(2);

/// Read and discard until the client closes its side (its answer to our
/// close frame and FIN). Closing a socket with unread input sends RST,
/// and a client that receives RST may discard our close frame unread (a
/// client flooding us when we close it for the flood would never learn
/// why).
async fn linger(sock: &tokio::net::TcpStream) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let done = with_scratch(|scratch| match sock.try_read(scratch) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        });
        if done {
            return;
        }
    }
}

/// Longest a connection waits for its token to expire; a later `exp`
/// (up to `u64::MAX`) means the same.
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// When a connection whose token has `exp` must end (4001). `exp` is the
/// peer's (signed, but any u64): no arithmetic on it may overflow, and a
/// deadline past [`MAX_TOKEN_WAIT`] is as good as never.
pub(crate) fn token_deadline(exp: u64) -> Instant {
    let expires_in =
        Duration::from_secs(exp.saturating_sub(crate::clock::now_secs())).min(MAX_TOKEN_WAIT);
    let now = Instant::now();
    now.checked_add(expires_in)
        .unwrap_or_else(|| now + MAX_TOKEN_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_rules() {
        let mut a = Assembler::new(10);
        assert_eq!(a.feed(true, OpCode::Text, b"hi"), Step::Whole);
        assert_eq!(a.feed(false, OpCode::Text, b"he"), Step::Pending);
        assert_eq!(a.feed(false, OpCode::Continuation, b"ll"), Step::Pending);
        assert_eq!(
            a.feed(true, OpCode::Continuation, b"o"),
            Step::Reassembled(bytes::Bytes::from_static(b"hello"))
        );
        assert_eq!(
            a.feed(true, OpCode::Continuation, b"x"),
            Step::Close(CloseCode::Protocol)
        );
        assert_eq!(a.feed(false, OpCode::Binary, b"12345"), Step::Pending);
        assert_eq!(
            a.feed(true, OpCode::Text, b"x"),
            Step::Close(CloseCode::Protocol)
        );
        let mut a = Assembler::new(10);
        assert_eq!(a.feed(false, OpCode::Binary, b"123456"), Step::Pending);
        assert_eq!(
            a.feed(false, OpCode::Continuation, b"789012"),
            Step::Close(CloseCode::TooBig)
        );
        let mut a = Assembler::new(10);
        assert_eq!(a.feed(false, OpCode::Text, b"\xe2\x82"), Step::Pending);
        assert_eq!(
            a.feed(true, OpCode::Continuation, b"\xac"),
            Step::Reassembled(bytes::Bytes::from_static("€".as_bytes()))
        );
        assert_eq!(a.feed(false, OpCode::Text, b"\xff"), Step::Pending);
        assert_eq!(
            a.feed(true, OpCode::Continuation, b"a"),
            Step::Close(CloseCode::InvalidPayload)
        );
        assert_eq!(a.feed(true, OpCode::Ping, b""), Step::Ping);
        assert_eq!(
            a.feed(true, OpCode::Close, b""),
            Step::Close(CloseCode::Normal)
        );
    }

    /// Size of the future an async fn of four arguments returns.
    fn future_size<A, B, C, D, F: std::future::Future>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_connection_state_stays_small() {
        // Every connection's task holds this state machine for its whole
        // life: its session, reader, timer and what it waits on (it
        // replaced two tasks and an 8 KiB read buffer). A large future
        // awaited inline in `serve` would grow it for every connection,
        // idle or not; message handling and the final close are boxed.
        let n = future_size(super::serve);
        assert!(n <= 1600, "conn::serve future is {n} bytes");
    }
}
