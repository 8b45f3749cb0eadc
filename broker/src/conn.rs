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

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::BytesMut;
use fastwebsockets::OpCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use shoal_proto::{names::RoomName, ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame};
use tokio::time::Instant;

use crate::{
    auth::Claims,
    hub::{Attach, HubError, Pending, Reply, Room},
    limiter::TokenBucket,
    metrics::client_kind_index,
    outbound::{run_socket_writer, ws_frame, ConnHandle},
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

/// Outcome of the per-frame rate check.
enum Admit {
    Yes,
    Refused,
    Close,
}

/// Window over which rate-limit strikes are counted.
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

struct Session {
    state: Arc<AppState>,
    handle: ConnHandle,
    rooms: HashMap<Arc<str>, Arc<Room>>,
    bucket: TokenBucket,
    strikes: u32,
    strike_window_start: Instant,
    last_typing: HashMap<Arc<str>, Instant>,
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
                match session.admit() {
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
    let mut session = Session {
        state: state.clone(),
        handle: handle.clone(),
        rooms: HashMap::new(),
        bucket: TokenBucket::new(cfg.rate_limit, cfg.rate_burst),
        strikes: 0,
        strike_window_start: Instant::now(),
        last_typing: HashMap::new(),
    };
    let mut reader = Reader {
        partial: Vec::new(),
        assembler: Assembler::new(cfg.max_message_size),
        // fastwebsockets' limit was `len >= max + 1`: the same cap.
        max_payload: cfg.max_message_size,
    };

    // `exp` is the peer's (signed, but any u64): no arithmetic on it may
    // overflow. A deadline past MAX_TOKEN_WAIT is as good as never.
    let expires_in = Duration::from_secs(claims.exp.saturating_sub(crate::clock::now_secs()))
        .min(MAX_TOKEN_WAIT);
    let now = Instant::now();
    let token_deadline = now
        .checked_add(expires_in)
        .unwrap_or_else(|| now + MAX_TOKEN_WAIT);
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

impl Drop for Session {
    /// Leave rooms (presence offline), unregister, stop the writer, and
    /// count the connection gone. In `Drop` so that it runs however the
    /// connection task ends, a panic included.
    fn drop(&mut self) {
        for (_, room) in self.rooms.drain() {
            self.state.hub.leave(&self.handle, &room);
        }
        self.state.hub.unregister(&self.handle);
        self.handle.cancel_token().cancel();
        self.state.metrics.connections.dec();
    }
}

impl Session {
    /// Handle one complete message. Returns false if the connection must end.
    /// Take a token for one incoming frame (data or ping). Over the rate:
    /// `error 429` and a strike; too many strikes: close 1008.
    fn admit(&mut self) -> Admit {
        if self.bucket.take() {
            return Admit::Yes;
        }
        self.state.metrics.rate_limited("frame");
        let now = Instant::now();
        if now.duration_since(self.strike_window_start) > STRIKE_WINDOW {
            self.strike_window_start = now;
            self.strikes = 0;
        }
        self.strikes += 1;
        if self.strikes > self.state.cfg.conn.rate_strikes {
            self.handle.close(CloseCode::Policy);
            return Admit::Close;
        }
        self.reply_err(
            None,
            ErrorCode::RateLimited,
            "rate limit exceeded; slow down",
        );
        Admit::Refused
    }

    /// Take a complete message: its rate token, then decode it. None if
    /// refused (answered with an error frame) or the connection must end
    /// (then it is closing).
    fn accept(&mut self, payload: &[u8]) -> Option<ClientFrame> {
        match self.admit() {
            Admit::Yes => {}
            Admit::Refused | Admit::Close => return None,
        }
        let m = &self.state.metrics;
        match self.handle.encoding.decode_client(payload) {
            Ok(f) => {
                m.frame_in(client_kind_index(f.kind()));
                Some(f)
            }
            Err(e) => {
                m.frame_in(client_kind_index("invalid"));
                self.reply_err(None, ErrorCode::BadRequest, e.to_string());
                None
            }
        }
    }

    /// Handle one decoded message. Returns false if the connection must
    /// end. While it runs (a request may wait on the store), a direct
    /// connection's queue keeps draining, and a closing connection stops
    /// it.
    async fn run(&mut self, frame: ClientFrame) -> bool {
        let handle = self.handle.clone();
        let write_timeout = self.state.cfg.conn.write_timeout;
        let drain = async {
            if handle.socket().is_none() {
                return std::future::pending().await;
            }
            loop {
                if handle.drain(write_timeout).await.is_err() {
                    handle.cancel_token().cancel();
                    return;
                }
                handle.queued().await;
            }
        };
        tokio::select! {
            _ = self.dispatch(frame) => {}
            _ = handle.cancelled() => {}
            _ = drain => {}
        }
        !self.handle.is_closing()
    }

    fn reply(&self, f: ServerFrame) {
        self.handle.send(&f);
    }

    fn reply_err(&self, id: Option<u64>, code: ErrorCode, msg: impl Into<String>) {
        self.handle.send(&ServerFrame::error(id, code, msg));
    }

    fn reply_hub_err(&self, id: Option<u64>, e: HubError) {
        self.reply_err(id, e.code, e.message);
    }

    fn conn_reply(&self, id: Option<u64>) -> Reply {
        Reply::Conn {
            conn: self.handle.clone(),
            id,
        }
    }

    fn joined_room(&self, id: Option<u64>, room: &str) -> Option<Arc<Room>> {
        match self.rooms.get(room) {
            Some(r) => Some(r.clone()),
            None => {
                self.reply_err(
                    id,
                    ErrorCode::NotFound,
                    format!("not in room `{room}`; join it first"),
                );
                None
            }
        }
    }

    /// A joined room whose namespace is stored; otherwise answers 404
    /// ("this namespace keeps no {what}").
    fn stored_room(&self, id: Option<u64>, room: &str, what: &str) -> Option<Arc<Room>> {
        let r = self.joined_room(id, room)?;
        if r.opts.persist {
            return Some(r);
        }
        self.reply_err(
            id,
            ErrorCode::NotFound,
            format!("this namespace keeps no {what}"),
        );
        None
    }

    async fn dispatch(&mut self, frame: ClientFrame) {
        let hub = self.state.hub.clone();
        match frame {
            ClientFrame::Ping { id } => self.reply(ServerFrame::Pong { id }),
            ClientFrame::Join { id, room, since } => self.join(id, room, since).await,
            ClientFrame::Leave { id, room } => {
                if let Some(r) = self.joined_room(id, &room) {
                    self.rooms.remove(room.as_str());
                    self.last_typing.remove(room.as_str());
                    hub.leave(&self.handle, &r);
                    if r.opts.persist {
                        hub.enqueue(&r, Pending::Leave(self.handle.user.clone()), Reply::None)
                            .await;
                    }
                    self.reply(ServerFrame::Left { id, room });
                }
            }
            ClientFrame::Pub {
                id,
                room,
                to,
                cid,
                body,
            } => {
                let reply = self.conn_reply(id);
                let user = self.handle.user.clone();
                match (room, to) {
                    (Some(room), None) => {
                        let Some(r) = self.joined_room(id, &room) else {
                            return;
                        };
                        hub.publish_to_room(&r, &user, body, cid, reply).await;
                    }
                    (None, Some(to)) => {
                        if let Err(e) = shoal_proto::names::validate_user(&to) {
                            return reply
                                .fail((ErrorCode::BadRequest, format!("user `{to}`: {e}")));
                        }
                        if *to == *user {
                            return reply.fail((
                                ErrorCode::BadRequest,
                                "cannot send a direct message to yourself".into(),
                            ));
                        }
                        // Never kept for whoever takes the name later.
                        match self.state.directory.exists(&to).await {
                            Ok(true) => {}
                            Ok(false) => {
                                return reply.fail((ErrorCode::NotFound, format!("no user `{to}`")))
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "user lookup failed");
                                return reply.fail((
                                    ErrorCode::Unavailable,
                                    "storage unavailable; retry later".into(),
                                ));
                            }
                        }
                        let full = shoal_proto::names::dm_room(&user, &to);
                        match RoomName::parse(&full) {
                            Ok(name) => {
                                hub.publish_async(&name, &user, body, cid, false, reply)
                                    .await
                            }
                            Err(e) => reply.fail((ErrorCode::BadRequest, e.to_string())),
                        }
                    }
                    _ => reply.fail((
                        ErrorCode::BadRequest,
                        "pub needs exactly one of `room` or `to`".into(),
                    )),
                }
            }
            ClientFrame::Typing { id, room } => {
                let Some(r) = self.joined_room(id, &room) else {
                    return;
                };
                let now = Instant::now();
                let min = self.state.cfg.conn.typing_interval;
                if let Some(last) = self.last_typing.get(room.as_str()) {
                    if now.duration_since(*last) < min {
                        self.state.metrics.rate_limited("typing");
                        self.reply_err(id, ErrorCode::RateLimited, "typing sent too often");
                        return;
                    }
                }
                self.last_typing.insert(r.name.clone(), now);
                hub.typing(&r, &self.handle);
            }
            ClientFrame::Members { id, room } => {
                let Some(r) = self.joined_room(id, &room) else {
                    return;
                };
                let users = match hub.present(&r).await {
                    Ok(u) => u,
                    Err(e) => return self.reply_hub_err(id, e),
                };
                let receipts = if r.opts.persist {
                    match self.state.store.receipts(&room).await {
                        Ok(v) => v,
                        Err(e) => return self.store_err(id, e),
                    }
                } else {
                    vec![]
                };
                self.reply(ServerFrame::Members {
                    id,
                    room,
                    users,
                    receipts,
                });
            }
            ClientFrame::History {
                id,
                room,
                before,
                limit,
            } => {
                let name = match hub.check_access(&room, &self.handle.user) {
                    Ok(n) => n,
                    Err(e) => return self.reply_hub_err(id, e),
                };
                if !hub.persists(&name) {
                    return self.reply_err(
                        id,
                        ErrorCode::NotFound,
                        "this namespace keeps no history",
                    );
                }
                let limit = limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE) as usize;
                match self.state.hub.history(&room, before, limit).await {
                    Ok((messages, more)) => self.reply(ServerFrame::History {
                        id,
                        room,
                        messages,
                        more,
                    }),
                    Err(e) => self.store_err(id, e),
                }
            }
            ClientFrame::Mark {
                id,
                room,
                seq,
                state,
            } => {
                let Some(r) = self.stored_room(id, &room, "receipts") else {
                    return;
                };
                if seq == 0 || seq > hub.committed(&r) {
                    return self.reply_err(
                        id,
                        ErrorCode::BadRequest,
                        "seq is not a message in this room",
                    );
                }
                let op = Pending::Mark {
                    user: self.handle.user.clone(),
                    seq,
                    state,
                };
                hub.enqueue(&r, op, self.conn_reply(id)).await;
            }
            ClientFrame::Delete { id, room, seq } => {
                let Some(r) = self.stored_room(id, &room, "messages") else {
                    return;
                };
                let op = Pending::Delete {
                    user: self.handle.user.clone(),
                    seq,
                    conn: Some(self.handle.id),
                };
                hub.enqueue(&r, op, self.conn_reply(id)).await;
            }
        }
    }

    fn store_err(&self, id: Option<u64>, e: crate::store::StoreError) {
        tracing::warn!(error = %e, "store read failed");
        self.reply_err(
            id,
            ErrorCode::Unavailable,
            "storage unavailable; retry later",
        );
    }

    /// Join, replaying stored messages after `since` first. Replayed frames
    /// come before `joined`; live messages after it, with nothing missed or
    /// repeated at the seam (see `hub`).
    async fn join(&mut self, id: Option<u64>, room: String, since: Option<u64>) {
        let hub = self.state.hub.clone();
        if self.rooms.contains_key(room.as_str()) {
            let seq = self
                .rooms
                .get(room.as_str())
                .map(|r| hub.committed(r))
                .unwrap_or(0);
            return self.reply(ServerFrame::Joined { id, room, seq });
        }
        if self.rooms.len() >= self.state.cfg.conn.max_rooms_per_connection {
            self.state.metrics.rate_limited("rooms");
            return self.reply_err(
                id,
                ErrorCode::RateLimited,
                format!(
                    "at most {} rooms per connection",
                    self.state.cfg.conn.max_rooms_per_connection
                ),
            );
        }
        let name = match hub.check_access(&room, &self.handle.user) {
            Ok(n) => n,
            Err(e) => return self.reply_hub_err(id, e),
        };
        let persist = hub.persists(&name);
        if persist {
            // Membership is durable before `joined`, so REST calls that check
            // it (files, room list) agree at once.
            let r = match hub.ensure_room(&name).await {
                Ok(r) => r,
                Err(e) => return self.reply_hub_err(id, e),
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            hub.enqueue(&r, Pending::Join(self.handle.user.clone()), Reply::Chan(tx))
                .await;
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return self.reply_hub_err(id, e),
                Err(_) => return self.reply_err(id, ErrorCode::Unavailable, "shutting down"),
            }
        }
        let mut gap_checked = false;
        // A cluster keeps every namespace's hot history in the bus.
        let mut cursor = since.filter(|_| hub.replays(persist));
        for _ in 0..JOIN_ATTEMPTS {
            let r = match hub.ensure_room(&name).await {
                Ok(r) => r,
                Err(e) => return self.reply_hub_err(id, e),
            };
            if let Some(c) = cursor.as_mut() {
                let target = hub.committed(&r);
                if *c > target {
                    // The client claims more than exists; nothing to replay.
                    *c = target;
                }
                if let Err(e) = self.replay(&r, c, target, &mut gap_checked).await {
                    return self.store_err(id, e);
                }
            }
            match hub.attach(&self.handle, &r, cursor, id) {
                Ok(Attach::Joined(_)) => {
                    self.rooms.insert(r.name.clone(), r);
                    return;
                }
                Ok(Attach::Behind(_)) | Ok(Attach::Evicted) => continue,
                Err(e) => {
                    if persist {
                        hub.enqueue(&r, Pending::Leave(self.handle.user.clone()), Reply::None)
                            .await;
                    }
                    hub.maybe_evict(&r);
                    return self.reply_hub_err(id, e);
                }
            }
        }
        self.reply_err(
            id,
            ErrorCode::Unavailable,
            "room is too busy to join right now; retry",
        );
    }

    /// Queue stored entries in `(*cursor, target]` and advance the cursor.
    async fn replay(
        &self,
        room: &Room,
        cursor: &mut u64,
        target: u64,
        gap_checked: &mut bool,
    ) -> Result<(), crate::store::StoreError> {
        while *cursor < target {
            let (page, recheck) = self
                .state
                .hub
                .replay_page(&room.name, *cursor, target)
                .await?;
            if recheck {
                // Neither the hot history nor the shared database holds
                // (cursor, floor]: announce it, even after earlier pages.
                *gap_checked = false;
            }
            if !*gap_checked {
                *gap_checked = true;
                if page.floor > *cursor {
                    self.handle.send(&ServerFrame::Gap {
                        room: room.name.to_string(),
                        from: *cursor + 1,
                        to: page.floor.min(target),
                    });
                    // Announced: the hole check below must not say it again.
                    *cursor = page.floor.min(target);
                }
            }
            if page.entries.is_empty() {
                if *cursor < target {
                    // Nothing stored in (cursor, target] although the room
                    // sequenced it: unreadable entries at the end.
                    self.handle.send(&ServerFrame::Gap {
                        room: room.name.to_string(),
                        from: *cursor + 1,
                        to: target,
                    });
                }
                *cursor = target;
                break;
            }
            let n = page.entries.len() as u64;
            for e in page.entries {
                // Every seq up to the room's head exists; one the page
                // skips (an entry that could not be read back) is
                // announced, never passed over in silence.
                if e.msg.seq > *cursor + 1 {
                    let gap = ServerFrame::Gap {
                        room: room.name.to_string(),
                        from: *cursor + 1,
                        to: e.msg.seq - 1,
                    };
                    if !self.handle.send_wait(&gap).await {
                        return Ok(());
                    }
                }
                *cursor = e.msg.seq;
                let f = if e.deleted {
                    ServerFrame::Deleted {
                        id: None,
                        room: room.name.to_string(),
                        seq: e.msg.seq,
                    }
                } else {
                    ServerFrame::Msg {
                        room: room.name.to_string(),
                        seq: e.msg.seq,
                        from: e.msg.from,
                        ts: e.msg.ts,
                        body: e.msg.body,
                    }
                };
                if !self.handle.send_wait(&f).await {
                    return Ok(());
                }
            }
            self.state.metrics.replayed.inc_by(n);
        }
        Ok(())
    }
}

/// Largest `history` page.
pub const MAX_HISTORY_PAGE: u32 = 200;
/// Replay-then-attach rounds before a join into a very busy room gives up.
const JOIN_ATTEMPTS: usize = 32;

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

    #[test]
    fn bucket_limits_burst() {
        let mut b = TokenBucket::new(1.0, 3.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
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
