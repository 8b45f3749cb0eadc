//! The operations whose workings differ between one node and a cluster,
//! decided here and nowhere else: callers (the connection handler, the
//! REST layer, start-up) never ask whether there is a bus.
//!
//! - One node: the hub sequences under the room lock, the store keeps
//!   history, presence and health are local.
//! - A cluster: the bus sequences and keeps the hot history, the shared
//!   database (if any) keeps the rest, presence and health are the bus's.

use std::sync::Arc;

use shoal_proto::{names::RoomName, Body, ErrorCode, StoredMsg};

use super::{Hub, HubError, Reply, Room};
use crate::{
    directory::Registry,
    store::{Replay, StoreError},
};

/// Stored messages read per replay query.
pub const REPLAY_PAGE: usize = 512;

impl Hub {
    /// Publish to a room `from` is a member of (so it is loaded and never
    /// evicted meanwhile); the outcome goes to `reply`.
    pub async fn publish_to_room(
        &self,
        room: &Arc<Room>,
        from: &Arc<str>,
        body: Body,
        cid: Option<String>,
        reply: Reply,
    ) {
        if self.bus().is_some() {
            // Sequenced by the bus; delivery (to this node too) comes from
            // the subscription.
            return match RoomName::parse(&room.name) {
                Ok(name) => {
                    self.publish_async(&name, from, body, cid, false, reply)
                        .await
                }
                Err(e) => reply.fail(HubError::new(ErrorCode::BadRequest, e.to_string())),
            };
        }
        let permit = match self.permit_for(room).await {
            Ok(p) => p,
            Err(e) => return reply.fail(e),
        };
        if let Err(reply) = self.publish(room, from, body, cid, false, reply, permit) {
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
    /// and whether older messages exist: from the store, or, where
    /// messages live only in the bus, from its hot history (as far back as
    /// `--redis-stream-len`), so a room that has messages never answers an
    /// empty page.
    pub async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        let Some(bus) = self.bus().filter(|_| self.history_is_hot_only()) else {
            return self.store.history(room, before, limit).await;
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
        let messages = page.entries.into_iter().rev().map(|e| e.msg).collect();
        Ok((messages, more))
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
