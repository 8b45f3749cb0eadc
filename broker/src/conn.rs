//! One WebSocket connection after the upgrade: the reader loop (frame
//! assembly, limits, decoding, dispatch) and the session state it owns.
//!
//! The reader runs in the connection's task; a separate writer task (see
//! `outbound`) owns the socket's write half. Both stop when the
//! connection's cancellation token fires; the first close code set wins.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::BytesMut;
use fastwebsockets::{after_handshake_split, OpCode, Role, WebSocketError};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use shoal_proto::{names::RoomName, ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame};
use tokio::time::Instant;

use crate::{
    auth::Claims,
    hub::{Attach, HubError, Pending, Reply, Room},
    limiter::TokenBucket,
    metrics::client_kind_index,
    outbound::{run_socket_writer, ws_frame, ConnCtl, ConnHandle, WriterOpts},
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

/// Reassembles fragmented messages under the message size cap
/// (fastwebsockets caps each frame, not a reassembled message) and enforces
/// the fragmentation rules of RFC 6455 §5.4.
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

/// Serve an upgraded connection until it ends.
pub async fn serve(
    state: Arc<AppState>,
    io: TokioIo<Upgraded>,
    claims: Claims,
    encoding: Encoding,
) {
    let cfg = &state.cfg.conn;
    let metrics = state.metrics.clone();
    let ctl = Arc::new(ConnCtl::new(&state.shutdown));
    let (handle, rx) = ConnHandle::new(
        claims.sub.as_str().into(),
        claims.jti.as_str().into(),
        encoding,
        cfg.outbound_queue,
        ctl.clone(),
        metrics.clone(),
    );
    let (r, w) = tokio::io::split(io);
    let unmasked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = crate::maskcheck::MaskCheck::new(r, unmasked.clone());
    let (mut rd, _) = after_handshake_split(r, tokio::io::sink(), Role::Server);
    rd.set_auto_close(false);
    // Pings are answered here, not by fastwebsockets, so that they count
    // against the frame rate limit (a ping flood is a flood).
    rd.set_auto_pong(false);
    // fastwebsockets rejects a frame when `len >= limit`, before reading its payload.
    rd.set_max_message_size(cfg.max_message_size + 1);

    let writer = tokio::spawn(run_socket_writer(
        w,
        rx,
        ctl.clone(),
        WriterOpts {
            batch: cfg.write_batch,
            write_timeout: cfg.write_timeout,
            ping_interval: cfg.ping_interval,
        },
        metrics.clone(),
    ));
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

    // `exp` is the peer's (signed, but any u64): no arithmetic on it may
    // overflow. A deadline past MAX_TOKEN_WAIT is as good as never.
    let expires_in = Duration::from_secs(claims.exp.saturating_sub(crate::clock::now_secs()))
        .min(MAX_TOKEN_WAIT);
    let token_deadline = Instant::now()
        .checked_add(expires_in)
        .unwrap_or_else(|| Instant::now() + MAX_TOKEN_WAIT);
    // Auto-close and auto-pong are off, so fastwebsockets never has
    // anything to send on our behalf.
    let mut send_fn = |_f: fastwebsockets::Frame<'_>| std::future::ready(Ok::<(), Infallible>(()));
    let mut assembler = Assembler::new(cfg.max_message_size);
    loop {
        let idle_deadline = Instant::now() + cfg.idle_timeout;
        // read_frame is not cancel-safe; every branch that wins over it
        // ends the connection, so no partial frame is ever resumed.
        let frame = tokio::select! {
            biased;
            _ = ctl.cancel.cancelled() => break,
            _ = tokio::time::sleep_until(token_deadline) => {
                handle.close(CloseCode::TokenExpired);
                break;
            }
            r = tokio::time::timeout_at(idle_deadline, rd.read_frame(&mut send_fn)) => match r {
                Err(_) => {
                    handle.close(CloseCode::IdleTimeout);
                    break;
                }
                Ok(Err(_)) if unmasked.load(std::sync::atomic::Ordering::Acquire) => {
                    handle.close(CloseCode::Protocol);
                    break;
                }
                Ok(Err(e)) => {
                    if let Some(code) = close_code_for(&e) {
                        tracing::debug!(conn = handle.id, error = %e, "websocket protocol error");
                        handle.close(code);
                    }
                    break;
                }
                Ok(Ok(f)) => f,
            },
        };
        let step = assembler.feed(frame.fin, frame.opcode, &frame.payload);
        // Every inbound frame takes a token, whatever it is: pongs and
        // fragments cost the broker as much as messages do. A complete
        // message takes its token in `on_message`.
        if matches!(step, Step::Pending | Step::Pong | Step::Ping) {
            match session.admit() {
                Admit::Yes => {}
                Admit::Refused => continue,
                Admit::Close => break,
            }
        }
        match step {
            Step::Pending | Step::Pong => {}
            Step::Close(code) => {
                handle.close(code);
                break;
            }
            Step::Ping => {
                // Best effort, like other ephemeral frames.
                let _ = handle.push(ws_frame(OpCode::Pong, &frame.payload), true);
            }
            // Boxed: the handlers' futures (joins with replay, history
            // queries) would otherwise be part of every idle connection's
            // state, which waits at the read above.
            Step::Whole => {
                if !Box::pin(session.on_message(&frame.payload)).await {
                    break;
                }
            }
            Step::Reassembled(buf) => {
                if !Box::pin(session.on_message(&buf)).await {
                    break;
                }
            }
        }
    }

    // Cleanup (see `Drop for Session`), then give the writer time to send
    // the close frame.
    drop(session);
    let _ = tokio::time::timeout(cfg.write_timeout + Duration::from_secs(1), writer).await;
    tracing::debug!(conn = handle.id, code = ?ctl.code(), "disconnected");
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

fn close_code_for(e: &WebSocketError) -> Option<CloseCode> {
    use WebSocketError::*;
    match e {
        FrameTooLarge => Some(CloseCode::TooBig),
        InvalidUTF8 => Some(CloseCode::InvalidPayload),
        InvalidFragment
        | InvalidContinuationFrame
        | ReservedBitsNotZero
        | ControlFrameFragmented
        | PingFrameTooLarge
        | InvalidCloseFrame
        | InvalidCloseCode
        | InvalidValue => Some(CloseCode::Protocol),
        // EOF, IO errors: the peer is gone; nothing to send.
        _ => None,
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

    async fn on_message(&mut self, payload: &[u8]) -> bool {
        match self.admit() {
            Admit::Yes => {}
            Admit::Refused => return true,
            Admit::Close => return false,
        }
        let m = &self.state.metrics;
        let frame = match self.handle.encoding.decode_client(payload) {
            Ok(f) => f,
            Err(e) => {
                m.frame_in(client_kind_index("invalid"));
                self.reply_err(None, ErrorCode::BadRequest, e.to_string());
                return true;
            }
        };
        m.frame_in(client_kind_index(frame.kind()));
        let cancel = self.handle.cancel_token();
        // A request may wait on the store; a closing connection stops it.
        tokio::select! {
            _ = self.dispatch(frame) => {}
            _ = cancel.cancelled() => {}
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
        // life (2.7 KB before the message handlers were boxed). A large
        // future awaited inline in `serve` would grow it for every
        // connection, idle or not.
        let n = future_size(super::serve);
        assert!(n <= 1536, "conn::serve future is {n} bytes");
    }
}
