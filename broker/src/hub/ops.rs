//! The operations whose workings differ between one node and a cluster,
//! decided here and nowhere else: callers (the connection handler, the
//! REST layer, start-up) never ask whether there is a bus.
//!
//! - One node: the hub sequences under the room lock, the store keeps
//!   history, presence and health are local.
//! - A cluster: the bus sequences and keeps the hot history, the shared
//!   database (if any) keeps the rest, presence and health are the bus's.

use std::sync::Arc;

use shoal_proto::{
    codec::body_text,
    entry::{self, ModAction, ReplyRef, Version},
    names::RoomName,
    Body, ErrorCode, EventKind, Meta, StoredMsg,
};

use super::{Hub, HubError, Post, Reply, Room};
use crate::{
    directory::Registry,
    store::{Replay, StoreError, TargetInfo},
};

/// Stored messages read per replay query.
pub const REPLAY_PAGE: usize = 512;
/// Hot-history pages folded into what is known of an event's target.
const TARGET_FOLD_PAGES: usize = 4;

/// Hand each entry of the hot history in `(after, upto]` to `f`, in seq
/// order, a page at a time (at most `max_pages`; None: to the end).
async fn each_hot_entry(
    bus: &dyn crate::bus::Bus,
    room: &str,
    mut after: u64,
    upto: u64,
    max_pages: Option<usize>,
    mut f: impl FnMut(crate::store::ReplayEntry),
) -> Result<(), StoreError> {
    let mut pages = 0;
    while after < upto && max_pages.is_none_or(|m| pages < m) {
        let page = bus
            .replay(room, after, upto, REPLAY_PAGE)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let Some(last) = page.entries.last().map(|e| e.msg.seq) else {
            break;
        };
        page.entries.into_iter().for_each(&mut f);
        after = last;
        pages += 1;
    }
    Ok(())
}

/// Apply one log entry to what is known of message `seq` (rules in
/// `shoal_proto::entry`).
fn fold_entry(info: &mut Option<TargetInfo>, seq: u64, viewer: &str, e: crate::store::ReplayEntry) {
    if e.msg.seq == seq {
        if info.is_none() {
            *info = Some(TargetInfo::new(
                e.msg.from,
                e.deleted,
                e.meta.kind.is_some(),
                e.msg.body,
                vec![],
            ));
        }
        return;
    }
    let (Some(t), Some(kind)) = (info.as_mut(), e.meta.kind) else {
        return;
    };
    if e.meta.target != Some(seq) || t.event {
        return;
    }
    let emoji = e.msg.body.as_str().unwrap_or_default().to_string();
    match kind {
        EventKind::Edit if e.msg.from == t.from && !t.deleted => t.body = e.msg.body,
        EventKind::Delete if e.msg.from == t.from => t.deleted = true,
        EventKind::React if !t.deleted => {
            if !t.reactions.contains(&emoji) {
                t.reactions.push(emoji.clone());
            }
            if e.msg.from == viewer && !t.mine.contains(&emoji) {
                t.mine.push(emoji);
            }
        }
        // Whether others still have it is not known here; the count of
        // distinct reactions errs on the high side.
        EventKind::Unreact if e.msg.from == viewer => t.mine.retain(|m| *m != emoji),
        _ => {}
    }
}

impl Hub {
    /// Publish to a room `from` is a member of (so it is loaded and never
    /// evicted meanwhile); the outcome goes to `reply`.
    pub async fn publish_to_room(
        &self,
        room: &Arc<Room>,
        from: &Arc<str>,
        post: Post,
        cid: Option<String>,
        reply: Reply,
    ) {
        if self.bus().is_some() {
            // Sequenced by the bus; delivery (to this node too) comes from
            // the subscription.
            return match RoomName::parse(&room.name) {
                Ok(name) => {
                    self.publish_async(&name, from, post, cid, false, reply)
                        .await
                }
                Err(e) => reply.fail(HubError::new(ErrorCode::BadRequest, e.to_string())),
            };
        }
        let permit = match self.permit_for(room).await {
            Ok(p) => p,
            Err(e) => return reply.fail(e),
        };
        if let Err(reply) = self.publish(room, from, post, cid, false, reply, permit) {
            reply.fail(HubError::new(ErrorCode::Unavailable, "room is busy; retry"));
        }
    }

    /// Users present in a joined room: this node's members, or the
    /// cluster's.
    pub async fn present(&self, room: &Room) -> Result<Vec<String>, HubError> {
        match self.bus() {
            Some(bus) => bus.members(&room.name).await.map_err(|e| {
                tracing::warn!(error = %e, "cluster presence unavailable");
                HubError::new(
                    ErrorCode::Unavailable,
                    "cluster bus unavailable; retry later",
                )
            }),
            None => Ok(self.members(room)),
        }
    }

    /// Whether a join with `since` can replay this room: a stored
    /// namespace, or any namespace in a cluster (the bus keeps every
    /// room's hot history).
    pub fn replays(&self, persist: bool) -> bool {
        persist || self.bus().is_some()
    }

    /// A page of replay in `(after, upto]`: from the store on one node; in
    /// a cluster from the bus's hot history, and what it no longer holds
    /// from the shared database. The flag is true when neither holds
    /// `(after, floor]`, which the caller announces as a gap even after
    /// earlier pages.
    pub async fn replay_page(
        &self,
        room: &str,
        after: u64,
        upto: u64,
    ) -> Result<(Replay, bool), StoreError> {
        let Some(bus) = self.bus() else {
            return Ok((
                self.store.replay(room, after, upto, REPLAY_PAGE).await?,
                false,
            ));
        };
        let hot = bus
            .replay(room, after, upto, REPLAY_PAGE)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if hot.floor <= after || !self.shared_store() {
            return Ok((hot, false));
        }
        let old = self
            .store
            .replay(room, after, hot.floor.min(upto), REPLAY_PAGE)
            .await?;
        Ok(if old.entries.is_empty() {
            (hot, true)
        } else {
            (old, false)
        })
    }

    /// True when messages live only in the bus's hot history: a cluster
    /// whose nodes each have their own embedded store.
    pub fn history_is_hot_only(&self) -> bool {
        self.bus().is_some() && !self.shared_store()
    }

    /// A page of history below `before` (default: newest), newest first,
    /// messages in their current state for `viewer`, and whether older
    /// ones exist: from the store, or, where messages live only in the
    /// bus, from its hot history (as far back as `--redis-stream-len`), so
    /// a room that has messages never answers an empty page. The hot
    /// history holds the log as sent: events are left out of its pages
    /// and reach clients through replay instead.
    pub async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        let Some(bus) = self.bus().filter(|_| self.history_is_hot_only()) else {
            return self.store.history(room, before, limit, viewer).await;
        };
        let unavailable = |e: crate::bus::BusError| StoreError::Unavailable(e.to_string());
        let head = bus.head(room).await.map_err(unavailable)?;
        let upto = before.map_or(head, |b| b.saturating_sub(1).min(head));
        let after = upto.saturating_sub(limit as u64);
        let page = bus
            .replay(room, after, upto, limit)
            .await
            .map_err(unavailable)?;
        let oldest = page.entries.first().map_or(upto + 1, |e| e.msg.seq);
        let more = oldest > page.floor + 1;
        let messages = page
            .entries
            .into_iter()
            .rev()
            .filter(|e| e.meta.kind.is_none())
            .map(|e| {
                let mut m = e.msg;
                m.reply_to = e.meta.reply_to;
                m.mentions = e.meta.mentions;
                m
            })
            .collect();
        Ok((messages, more))
    }

    /// A page of the replies to message `seq`, like [`Hub::history`]; where
    /// messages live only in the bus, from the replies its hot history
    /// still holds.
    pub async fn thread(
        &self,
        room: &str,
        seq: u64,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        let Some(bus) = self.bus().filter(|_| self.history_is_hot_only()) else {
            return self.store.thread(room, seq, before, limit, viewer).await;
        };
        let unavailable = |e: crate::bus::BusError| StoreError::Unavailable(e.to_string());
        let head = bus.head(room).await.map_err(unavailable)?;
        let upto = before.map_or(head, |b| b.saturating_sub(1).min(head));
        let mut replies = Vec::new();
        each_hot_entry(&**bus, room, seq, upto, None, |e| {
            if e.meta.kind.is_none() && e.meta.reply_to.as_ref().is_some_and(|r| r.seq == seq) {
                let mut m = e.msg;
                m.reply_to = e.meta.reply_to;
                m.mentions = e.meta.mentions;
                replies.push(m);
            }
        })
        .await?;
        replies.reverse();
        let more = replies.len() > limit;
        replies.truncate(limit);
        Ok((replies, more))
    }

    /// Previous versions of an edited message (none where messages live
    /// only in the bus: it keeps the log, not versions).
    pub async fn edits(&self, room: &str, seq: u64) -> Result<Vec<Version>, StoreError> {
        if self.history_is_hot_only() {
            return Ok(vec![]);
        }
        self.store.edits(room, seq).await
    }

    /// The metadata of a new message in `room` from `from`: the quoted
    /// message if it replies to one (which must exist, not be deleted,
    /// not be an event: else 404), and the members its text mentions
    /// (`@name`: recognised here, not trusted from the client; a DM's
    /// other party, or a durable member or present user of the room).
    pub async fn message_meta(
        &self,
        room: &Arc<Room>,
        from: &str,
        body: &Body,
        reply_to: Option<u64>,
    ) -> Result<Meta, HubError> {
        let store_err = |e: StoreError| {
            tracing::warn!(error = %e, "store read failed");
            HubError::new(ErrorCode::Unavailable, "storage unavailable; retry later")
        };
        let mut meta = Meta::default();
        if let Some(seq) = reply_to {
            match self
                .target(&room.name, seq, from)
                .await
                .map_err(store_err)?
            {
                Some(t) if !t.event && !t.deleted => {
                    meta.reply_to = Some(ReplyRef {
                        seq,
                        preview: entry::preview(body_text(&t.body).unwrap_or("")),
                        from: t.from,
                    });
                }
                _ => {
                    return Err(HubError::new(
                        ErrorCode::NotFound,
                        format!("no message {seq} to reply to in `{}`", room.name),
                    ))
                }
            }
        }
        meta.mentions = self.mentions(room, from, body).await.map_err(store_err)?;
        Ok(meta)
    }

    /// Members of `room` (other than `from`) named with `@name` in `body`'s
    /// text, sorted.
    pub async fn mentions(
        &self,
        room: &Arc<Room>,
        from: &str,
        body: &Body,
    ) -> Result<Vec<String>, StoreError> {
        let Some(text) = body_text(body) else {
            return Ok(vec![]);
        };
        // Most messages mention nobody: nothing else is looked up for them.
        let candidates: Vec<&str> = entry::mention_candidates(text, entry::MAX_MENTIONS)
            .into_iter()
            .filter(|n| *n != from)
            .collect();
        if candidates.is_empty() {
            return Ok(vec![]);
        }
        // Cheapest first: this node's members, the durable membership,
        // then (once, only if needed) the cluster's presence.
        let mut present: Option<Vec<String>> = None;
        let mut out = Vec::new();
        for name in candidates {
            let member = match &room.dm {
                Some((a, b)) => **a == *name || **b == *name,
                None if room.state.lock().users.contains_key(name) => true,
                None if room.opts.persist && self.store.is_member(&room.name, name).await? => true,
                None if self.bus().is_some() => {
                    if present.is_none() {
                        present = Some(self.present(room).await.unwrap_or_default());
                    }
                    present.iter().flatten().any(|p| p == name)
                }
                None => false,
            };
            if member {
                out.push(name.to_string());
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// What is known of entry `seq` before an event on it is sequenced:
    /// the store's view; in a cluster, with the entries the store does not
    /// have yet (the archive lags the bus; a hot-only cluster's stores
    /// have none) folded in from the hot history by the rules of
    /// `shoal_proto::entry`, so a reaction added a moment ago can be
    /// removed at once.
    pub async fn target(
        &self,
        room: &str,
        seq: u64,
        viewer: &str,
    ) -> Result<Option<TargetInfo>, StoreError> {
        let mut info = self.store.target(room, seq, viewer).await?;
        let Some(bus) = self.bus() else {
            return Ok(info);
        };
        let stored_upto = if self.shared_store() {
            self.store.room_head(room, u64::MAX).await?.last_seq
        } else {
            0
        };
        let head = bus
            .head(room)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // The archive lags by a sweep or two; past this much, what the
        // store says stands.
        let after = stored_upto.max(seq.saturating_sub(1));
        each_hot_entry(&**bus, room, after, head, Some(TARGET_FOLD_PAGES), |e| {
            fold_entry(&mut info, seq, viewer, e)
        })
        .await?;
        Ok(info)
    }

    /// A room's access rules as of seq `head`: the store's, and in a
    /// cluster the moderation entries the archive has not copied yet,
    /// folded in from the hot history (every page: an incomplete fold
    /// would open a private room). Rooms of a namespace without storage
    /// are open.
    pub(super) async fn load_acl(
        &self,
        room: &str,
        persist: bool,
        head: u64,
    ) -> Result<super::acl::Acl, StoreError> {
        if !persist {
            return Ok(Default::default());
        }
        let stored = self.store.room_acl(room).await?;
        let mut acl = stored.map(super::acl::Acl::from).unwrap_or_default();
        let Some(bus) = self.bus().filter(|_| self.shared_store()) else {
            return Ok(acl);
        };
        let after = self.store.room_head(room, u64::MAX).await?.last_seq;
        each_hot_entry(&**bus, room, after, head, None, |e| {
            if let Some(kind) = e.meta.kind.filter(|k| k.is_moderation()) {
                acl.apply(kind, &e.msg.from, &ModAction::from_body(&e.msg.body));
            }
        })
        .await?;
        Ok(acl)
    }

    /// The live nodes and their admin addresses (None on one node).
    pub async fn cluster_nodes(
        &self,
    ) -> Option<Result<Vec<(String, String)>, crate::bus::BusError>> {
        Some(self.bus()?.nodes().await)
    }

    /// Announce this node's admin address (nothing to do alone).
    pub async fn announce(
        &self,
        node: &str,
        url: &str,
        ttl: std::time::Duration,
    ) -> Result<(), crate::bus::BusError> {
        match self.bus() {
            Some(b) => b.announce(node, url, ttl).await,
            None => Ok(()),
        }
    }

    /// The cluster's health: None on one node, else whether the bus is up
    /// (on a Redis Cluster: any shard answers).
    pub fn cluster_health(&self) -> Option<bool> {
        self.bus().map(|b| b.healthy())
    }

    /// Announce a revoked token to the other nodes (nothing to do alone).
    pub async fn revoke_everywhere(&self, user: &str, jti: &str, exp: u64) -> Result<(), HubError> {
        let Some(bus) = self.bus() else {
            return Ok(());
        };
        bus.revoke(user, jti, exp).await.map_err(|e| {
            tracing::warn!(error = %e, "revocation not announced to the cluster");
            HubError::new(
                ErrorCode::Unavailable,
                "cluster bus unavailable; the token is revoked on this node only, retry",
            )
        })
    }

    /// Where known user names live: the shared (or only) store, or the
    /// bus when nodes have their own embedded stores.
    pub fn user_registry(&self) -> Registry {
        match self.bus() {
            Some(bus) if !self.shared_store() => Registry::Bus(bus.clone()),
            _ => Registry::Store(self.store.clone()),
        }
    }
}

impl Hub {
    /// Check a room creation or a moderation action by `actor` and build
    /// its entry (rules in `acl`); the caller sequences it.
    pub async fn moderation(
        &self,
        room: &str,
        actor: &str,
        kind: EventKind,
        what: ModAction,
        directory: &crate::directory::Directory,
        operator: bool,
    ) -> Result<(String, Post), HubError> {
        let bad = |m: String| HubError::new(ErrorCode::BadRequest, m);
        let name = self.check_access(room, actor)?;
        if name.dm.is_some() {
            return Err(bad(
                "direct-message rooms have no owners or moderators".into()
            ));
        }
        if !self.persists(&name) {
            return Err(bad(
                "this namespace keeps no state: its rooms cannot be created or moderated".into(),
            ));
        }
        if self.history_is_hot_only() {
            return Err(bad(
                "rooms are created and moderated with a store the cluster shares (--store postgres)".into(),
            ));
        }
        let text_ok = |t: &str, max: usize| t.len() <= max && !t.chars().any(char::is_control);
        if what
            .title
            .as_deref()
            .is_some_and(|t| !text_ok(t, entry::MAX_TITLE_LEN))
        {
            return Err(bad(format!(
                "a room's name is at most {} bytes, without control characters",
                entry::MAX_TITLE_LEN
            )));
        }
        if what
            .topic
            .as_deref()
            .is_some_and(|t| !text_ok(t, entry::MAX_TOPIC_LEN))
        {
            return Err(bad(format!(
                "a topic is at most {} bytes, without control characters",
                entry::MAX_TOPIC_LEN
            )));
        }
        if what
            .reason
            .as_deref()
            .is_some_and(|t| !text_ok(t, entry::MAX_REASON_LEN))
        {
            return Err(bad(format!(
                "a reason is at most {} bytes, without control characters",
                entry::MAX_REASON_LEN
            )));
        }
        if what.until.is_some_and(|u| u <= crate::clock::now_ms()) {
            return Err(bad("`until` is in the past".into()));
        }
        if let Some(u) = what.user.as_deref() {
            shoal_proto::names::validate_user(u).map_err(|e| bad(format!("user `{u}`: {e}")))?;
        }
        let r = self.ensure_room(&name).await?;
        if kind == EventKind::Create {
            let (created, committed) = {
                let st = r.state.lock();
                (st.acl.created(), st.order.committed())
            };
            if created || committed > 0 {
                return Err(HubError::new(
                    ErrorCode::Conflict,
                    format!("room `{room}` exists already; pick another name"),
                ));
            }
        } else {
            self.with_acl(&r, |a| a.may_act(actor, operator, kind, &what))?;
        }
        if kind == EventKind::Invite {
            let user = what.user.as_deref().unwrap_or_default();
            match directory.exists(user).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(HubError::new(
                        ErrorCode::NotFound,
                        format!("no user `{user}`"),
                    ))
                }
                Err(e) => return Err(unavailable_store(e)),
            }
        }
        Ok((
            name.full.to_string(),
            Post {
                body: what.to_body(),
                meta: Meta {
                    kind: Some(kind),
                    ..Meta::default()
                },
            },
        ))
    }
}

impl Hub {
    /// May `user` read room `name` (join it, or its history, files,
    /// search over REST)? Checked against the room's access rules in
    /// memory, or as stored if it is not loaded here.
    pub async fn may_read(&self, name: &RoomName<'_>, user: &str) -> Result<(), HubError> {
        let now = crate::clock::now_ms();
        let open = self.namespaces.get(name.namespace).open;
        if let Some(r) = self.room(name.full) {
            return self.with_acl(&r, |a| a.may_enter(open, user, now));
        }
        if !self.persists(name) {
            return Ok(());
        }
        let head = match self.bus() {
            Some(bus) => bus
                .head(name.full)
                .await
                .map_err(super::cluster::bus_unavailable)?,
            None => 0,
        };
        let acl = self
            .load_acl(name.full, true, head)
            .await
            .map_err(unavailable_store)?;
        acl.may_enter(open, user, now)
    }

    /// What a member sees of a room's rules (`GET /api/rooms/{room}/info`).
    pub async fn room_info(
        &self,
        name: &RoomName<'_>,
        user: &str,
    ) -> Result<serde_json::Value, HubError> {
        let r = self.ensure_room(name).await?;
        let info = self.with_acl(&r, |a| {
            let with = |want: entry::Role| {
                let mut v: Vec<&str> = a
                    .roles
                    .iter()
                    .filter(|(_, r)| **r == want)
                    .map(|(u, _)| &**u)
                    .collect();
                v.sort_unstable();
                v
            };
            serde_json::json!({
                "room": name.full,
                "created": a.created(),
                "private": a.private,
                "owner": a.owner.as_deref(),
                "topic": a.topic,
                "title": a.title,
                "admins": with(entry::Role::Admin),
                "members": if a.private { with(entry::Role::Member) } else { vec![] },
                "you": a.role(user).map(entry::Role::name),
            })
        });
        self.maybe_evict(&r);
        Ok(info)
    }

    /// Whether `user` owns or administers `room`.
    pub async fn is_moderator(&self, room: &str, user: &str) -> Result<bool, HubError> {
        let name = self.check_access(room, user)?;
        let r = self.ensure_room(&name).await?;
        let yes = self.with_acl(&r, |a| a.role(user) >= Some(entry::Role::Admin));
        self.maybe_evict(&r);
        Ok(yes)
    }
}

fn unavailable_store(e: StoreError) -> HubError {
    tracing::warn!(error = %e, "store read failed");
    HubError::new(ErrorCode::Unavailable, "storage unavailable; retry later")
}
