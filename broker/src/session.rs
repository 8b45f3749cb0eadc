//! One client's session, whatever its transport (a `/ws` connection or a
//! Socket.IO socket): its rooms, its rate limit, and the handling of every
//! request it makes, from rate check to reply.
//!
//! Rules:
//! - Requests are handled one at a time, in the order they arrived; a
//!   reply goes out through the session's [`ConnHandle`], so it is ordered
//!   with the deliveries of the rooms the session is in.
//! - Every request takes a rate-limit token first; over the rate it is
//!   refused with error 429 and counts a strike, and too many strikes in
//!   [`STRIKE_WINDOW`] close the connection (1008).
//! - Joining replays what the client missed (`since`) before `joined`, with
//!   no gap and no duplicate at the seam (see `hub`).
//! - Cleanup (leave every room, unregister) runs in `Drop`, so it happens
//!   however the transport's task ends.

use std::{collections::HashMap, sync::Arc, time::Duration};

use shoal_proto::{
    entry::{self, EventKind, ModAction, Role},
    names::RoomName,
    Body, ClientFrame, CloseCode, ErrorCode, Meta, ServerFrame,
};
use tokio::time::Instant;

use crate::{
    clock::now_ms,
    hub::{Attach, HubError, Pending, Post, Reply, Room},
    limiter::TokenBucket,
    metrics::client_kind_index,
    outbound::ConnHandle,
    state::AppState,
    store::TargetInfo,
};

/// Outcome of the per-frame rate check.
pub(crate) enum Admit {
    Yes,
    Refused,
    Close,
}

/// Window over which rate-limit strikes are counted.
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// A client's session state.
pub(crate) struct Session {
    state: Arc<AppState>,
    pub(crate) handle: ConnHandle,
    rooms: HashMap<Arc<str>, Arc<Room>>,
    bucket: TokenBucket,
    strikes: u32,
    strike_window_start: Instant,
    last_typing: HashMap<Arc<str>, Instant>,
}

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
    /// A session for a connection that was just registered with the hub.
    pub(crate) fn new(state: Arc<AppState>, handle: ConnHandle) -> Session {
        let cfg = &state.cfg.conn;
        let bucket = TokenBucket::new(cfg.rate_limit, cfg.rate_burst);
        Session {
            state,
            handle,
            rooms: HashMap::new(),
            bucket,
            strikes: 0,
            strike_window_start: Instant::now(),
            last_typing: HashMap::new(),
        }
    }

    /// Take a token for one incoming frame (data or ping). Over the rate:
    /// `error 429` (to request `id`) and a strike; too many strikes: close
    /// 1008.
    pub(crate) fn admit(&mut self, id: Option<u64>) -> Admit {
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
        self.reply_err(id, ErrorCode::RateLimited, "rate limit exceeded; slow down");
        Admit::Refused
    }

    /// Take a complete message: its rate token, then decode it. None if
    /// refused (answered with an error frame) or the connection must end
    /// (then it is closing).
    pub(crate) fn accept(&mut self, payload: &[u8]) -> Option<ClientFrame> {
        let decoded = self
            .handle
            .encoding
            .decode_client(payload)
            .map_err(|e| e.to_string());
        self.take(decoded, None)
    }

    /// Take a request decoded by the transport (or why it did not decode,
    /// answered with error 400 to request `id`): its rate token first.
    pub(crate) fn take(
        &mut self,
        decoded: Result<ClientFrame, String>,
        id: Option<u64>,
    ) -> Option<ClientFrame> {
        match self.admit(id) {
            Admit::Yes => {}
            Admit::Refused | Admit::Close => return None,
        }
        let m = &self.state.metrics;
        match decoded {
            Ok(f) => {
                m.frame_in(client_kind_index(f.kind()));
                Some(f)
            }
            Err(e) => {
                m.frame_in(client_kind_index("invalid"));
                self.reply_err(id, ErrorCode::BadRequest, e);
                None
            }
        }
    }

    /// Handle one decoded message. Returns false if the connection must
    /// end. While it runs (a request may wait on the store), a direct
    /// connection's queue keeps draining, and a closing connection stops
    /// it.
    pub(crate) async fn run(&mut self, frame: ClientFrame) -> bool {
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

    pub(crate) fn reply_err(&self, id: Option<u64>, code: ErrorCode, msg: impl Into<String>) {
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

    fn joined_room(&mut self, id: Option<u64>, room: &str) -> Option<Arc<Room>> {
        match self.rooms.get(room) {
            // A kick or ban removed this connection (it was told `left`).
            Some(r) if !self.state.hub.is_attached(r, self.handle.id) => {
                self.rooms.remove(room);
                self.last_typing.remove(room);
                self.reply_err(
                    id,
                    ErrorCode::Forbidden,
                    format!("you were removed from `{room}`"),
                );
                None
            }
            Some(r) => Some(r.clone()),
            None => {
                // A room whose rules keep this user out says so (403),
                // whatever the request; otherwise: join first.
                let hub = &self.state.hub;
                let refused = hub.room(room).and_then(|r| {
                    hub.with_acl(&r, |a| {
                        a.may_enter(r.opts.open, &self.handle.user, now_ms())
                    })
                    .err()
                });
                if let Some(e) = refused {
                    self.reply_hub_err(id, e);
                    return None;
                }
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
    fn stored_room(&mut self, id: Option<u64>, room: &str, what: &str) -> Option<Arc<Room>> {
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
                    self.reply(ServerFrame::Left {
                        id,
                        room,
                        reason: None,
                    });
                }
            }
            ClientFrame::Pub {
                id,
                room,
                to,
                cid,
                body,
                reply_to,
            } => {
                let reply = self.conn_reply(id);
                let user = self.handle.user.clone();
                match (room, to) {
                    (Some(room), None) => {
                        let Some(r) = self.joined_room(id, &room) else {
                            return;
                        };
                        if let Err(e) = hub.with_acl(&r, |a| a.may_publish(&user, now_ms())) {
                            return reply.fail(e);
                        }
                        let meta = match hub.message_meta(&r, &user, &body, reply_to).await {
                            Ok(m) => m,
                            Err(e) => return reply.fail(e),
                        };
                        hub.publish_to_room(&r, &user, Post { body, meta }, cid, reply)
                            .await;
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
                        let name = match RoomName::parse(&full) {
                            Ok(name) => name,
                            Err(e) => return reply.fail((ErrorCode::BadRequest, e.to_string())),
                        };
                        let mut post = Post::from(body);
                        if reply_to.is_some() {
                            // A reply in a DM quotes from the DM room.
                            let r = match hub.ensure_room(&name).await {
                                Ok(r) => r,
                                Err(e) => return reply.fail(e),
                            };
                            match hub.message_meta(&r, &user, &post.body, reply_to).await {
                                Ok(m) => post.meta = m,
                                Err(e) => return reply.fail(e),
                            }
                        }
                        hub.publish_async(&name, &user, post, cid, false, reply)
                            .await
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
                let Some(limit) = self.page_request(id, &room, limit).await else {
                    return;
                };
                match self
                    .state
                    .hub
                    .history(&room, before, limit, &self.handle.user)
                    .await
                {
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
                self.event(id, &room, seq, EventKind::Delete, Body::Null)
                    .await;
            }
            ClientFrame::Edit {
                id,
                room,
                seq,
                body,
            } => self.event(id, &room, seq, EventKind::Edit, body).await,
            ClientFrame::React {
                id,
                room,
                seq,
                emoji,
                on,
            } => {
                if let Err(e) = entry::check_reaction(&emoji) {
                    return self.reply_err(id, ErrorCode::BadRequest, e.to_string());
                }
                let kind = if on {
                    EventKind::React
                } else {
                    EventKind::Unreact
                };
                self.event(id, &room, seq, kind, Body::String(emoji)).await;
            }
            ClientFrame::Create {
                id,
                room,
                private,
                topic,
                title,
            } => {
                let what = ModAction {
                    private: Some(private),
                    topic,
                    title,
                    ..ModAction::default()
                };
                self.moderate(id, &room, EventKind::Create, what).await;
            }
            ClientFrame::Moderate {
                id,
                room,
                action,
                what,
            } => match EventKind::action(&action) {
                Some(kind) => self.moderate(id, &room, kind, what).await,
                None => self.reply_err(
                    id,
                    ErrorCode::BadRequest,
                    format!(
                        "unknown action `{}` (invite, kick, ban, unban, mute, unmute, role, owner, topic)",
                        action.chars().take(32).collect::<String>()
                    ),
                ),
            },
            ClientFrame::Thread {
                id,
                room,
                seq,
                before,
                limit,
            } => {
                let Some(limit) = self.page_request(id, &room, limit).await else {
                    return;
                };
                match hub
                    .thread(&room, seq, before, limit, &self.handle.user)
                    .await
                {
                    Ok((messages, more)) => self.reply(ServerFrame::Thread {
                        id,
                        room,
                        seq,
                        messages,
                        more,
                    }),
                    Err(e) => self.store_err(id, e),
                }
            }
        }
    }

    /// The checks of a `history` or `thread` request (a room this user may
    /// read, in a stored namespace) and its page size; None once refused.
    async fn page_request(&self, id: Option<u64>, room: &str, limit: Option<u32>) -> Option<usize> {
        let hub = &self.state.hub;
        let name = match hub.check_access(room, &self.handle.user) {
            Ok(n) => n,
            Err(e) => {
                self.reply_hub_err(id, e);
                return None;
            }
        };
        if !hub.persists(&name) {
            self.reply_err(id, ErrorCode::NotFound, "this namespace keeps no history");
            return None;
        }
        // A private room's pages are for its members; a ban keeps out.
        if let Err(e) = hub.may_read(&name, &self.handle.user).await {
            self.reply_hub_err(id, e);
            return None;
        }
        Some(limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE) as usize)
    }

    /// Create a room, or a moderation action in one: checked (see
    /// `hub::acl`), then sequenced as an entry of the room's log.
    async fn moderate(&mut self, id: Option<u64>, room: &str, kind: EventKind, what: ModAction) {
        let hub = self.state.hub.clone();
        let reply = self.conn_reply(id);
        match hub
            .moderation(
                room,
                &self.handle.user,
                kind,
                what,
                &self.state.directory,
                false,
            )
            .await
        {
            Ok((name, post)) => match RoomName::parse(&name) {
                Ok(n) => {
                    hub.publish_async(&n, &self.handle.user, post, None, false, reply)
                        .await
                }
                Err(e) => reply.fail((ErrorCode::BadRequest, e.to_string())),
            },
            Err(e) => reply.fail(e),
        }
    }

    /// An event on message `seq` of a joined, stored room: checked against
    /// what is known of the message (see `shoal_proto::entry` for the
    /// rules the store applies in log order), then sequenced like a
    /// message and acked with its own seq.
    async fn event(&mut self, id: Option<u64>, room: &str, seq: u64, kind: EventKind, body: Body) {
        let Some(r) = self.stored_room(id, room, "messages") else {
            return;
        };
        let hub = &self.state.hub;
        let user = &self.handle.user;
        let moderator = match hub.with_acl(&r, |a| {
            a.may_publish(user, now_ms())
                .map(|()| a.role(user) >= Some(Role::Admin))
        }) {
            Ok(m) => m,
            Err(e) => return self.reply_hub_err(id, e),
        };
        let t = match hub.target(room, seq, user).await {
            Ok(Some(t)) if !t.event => t,
            Ok(_) => {
                return self.reply_err(
                    id,
                    ErrorCode::NotFound,
                    format!("no message {seq} in `{room}`"),
                )
            }
            Err(e) => return self.store_err(id, e),
        };
        if let Err((code, why)) = event_allowed(&t, user, moderator, kind, &body) {
            return self.reply_err(id, code, why.replace("{seq}", &seq.to_string()));
        }
        let mut meta = Meta::event(kind, seq);
        if kind == EventKind::Edit {
            meta.mentions = match hub.mentions(&r, user, &body).await {
                Ok(m) => m,
                Err(e) => return self.store_err(id, e),
            };
        }
        let reply = match kind {
            // As before deletions were events: the requester is answered
            // `deleted` (members get the event).
            EventKind::Delete => Reply::Deleted {
                conn: self.handle.clone(),
                id,
                seq,
            },
            _ => self.conn_reply(id),
        };
        hub.publish_to_room(&r, user, Post { body, meta }, None, reply)
            .await;
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
            // Before the durable membership (attach checks again, under
            // the room lock).
            if let Err(e) = hub.with_acl(&r, |a| {
                a.may_enter(r.opts.open, &self.handle.user, now_ms())
            }) {
                return self.reply_hub_err(id, e);
            }
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
                    ServerFrame::entry(
                        room.name.to_string(),
                        e.msg.seq,
                        e.msg.from,
                        e.msg.ts,
                        e.msg.body,
                        e.meta,
                    )
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

/// Whether `user` may do `kind` to a message as `t` describes it:
/// refusals carry the error code and message (`{seq}` filled in by the
/// caller). The same rules decide, in log order, whether a sequenced event
/// has an effect (`shoal_proto::entry`); checking first gives the user a
/// clear error instead of an event that does nothing.
fn event_allowed(
    t: &TargetInfo,
    user: &str,
    moderator: bool,
    kind: EventKind,
    body: &Body,
) -> Result<(), (ErrorCode, String)> {
    let mine = t.from == user;
    match kind {
        // The room's owner and admins delete anyone's messages.
        EventKind::Delete if !mine && !moderator => {
            Err((ErrorCode::NotFound, "no message {seq} of yours".to_string()))
        }
        EventKind::Edit if !mine => {
            Err((ErrorCode::NotFound, "no message {seq} of yours".to_string()))
        }
        _ if t.deleted => Err((ErrorCode::Conflict, "message {seq} was deleted".to_string())),
        EventKind::React => {
            let emoji = body.as_str().unwrap_or_default();
            if t.mine.iter().any(|m| m == emoji) {
                Err((
                    ErrorCode::Conflict,
                    format!("you already reacted with {emoji}"),
                ))
            } else if t.mine.len() >= entry::MAX_REACTIONS_PER_USER {
                Err((
                    ErrorCode::Conflict,
                    format!(
                        "at most {} reactions of yours per message",
                        entry::MAX_REACTIONS_PER_USER
                    ),
                ))
            } else if !t.reactions.iter().any(|r| r == emoji)
                && t.reactions.len() >= entry::MAX_REACTIONS_PER_MESSAGE
            {
                Err((
                    ErrorCode::Conflict,
                    format!(
                        "at most {} different reactions per message",
                        entry::MAX_REACTIONS_PER_MESSAGE
                    ),
                ))
            } else {
                Ok(())
            }
        }
        EventKind::Unreact => {
            let emoji = body.as_str().unwrap_or_default();
            if t.mine.iter().any(|m| m == emoji) {
                Ok(())
            } else {
                Err((
                    ErrorCode::NotFound,
                    format!("no {emoji} of yours to remove"),
                ))
            }
        }
        _ => Ok(()),
    }
}

/// Largest `history` page.
pub const MAX_HISTORY_PAGE: u32 = 200;
/// Replay-then-attach rounds before a join into a very busy room gives up.
const JOIN_ATTEMPTS: usize = 32;
