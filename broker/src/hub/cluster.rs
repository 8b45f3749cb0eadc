//! Cluster sequencing: the bus assigns each room's seqs (see `bus`), and
//! this node delivers them in order. Rules:
//!
//! - a publish goes to the bus, whose reply is the ack; delivery, to this
//!   node too, comes from the subscription;
//! - a seq is delivered only if it is the room's next ([`Order::accept`]);
//!   a gap makes the node read the missing seqs from the hot history first
//!   ([`Hub::fill_gap`]), and what the history no longer has, or cannot be
//!   read, is announced to members as a `gap`, never skipped in silence;
//! - after a subscription loss or dropped inbound payloads, every local
//!   room is brought up to the bus head ([`Hub::bus_resync`]).
//!
//! [`pump`] feeds what arrived on the node's subscription to the entry
//! points below (private to the hub: only the pump calls them), and
//! [`watchdog`] sends clients elsewhere when the node loses the bus.

use std::{sync::Arc, time::Instant};

use shoal_proto::{
    bus::{BusPayload, BusRecord},
    names::RoomName,
    Body, ErrorCode, Meta, ServerFrame,
};
use tokio_util::sync::CancellationToken;

use crate::bus::{Inbound, InboundRx, RevokeHook, GLOBAL_CHANNEL};

use super::{
    broadcast, check_publish, cid_owner, now_ms, room::Accept, Bus, Hub, HubError, Post, Published,
    Reply, Room, SharedFrame,
};

/// Hot-history entries read per gap-fill query.
const GAP_FILL_PAGE: usize = 512;

pub(super) fn bus_unavailable(e: crate::bus::BusError) -> HubError {
    tracing::warn!(error = %e, "cluster bus unavailable");
    HubError::new(
        ErrorCode::Unavailable,
        "cluster bus unavailable; retry later",
    )
}

impl Hub {
    /// Cluster publish: the bus sequences, keeps and publishes; its reply
    /// is the ack. Delivery (here too) comes from the subscription.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn publish_bus(
        &self,
        bus: &dyn Bus,
        name: &RoomName<'_>,
        from: &Arc<str>,
        post: Post,
        cid: Option<String>,
        via_api: bool,
        reply: Reply,
    ) {
        let Post { body, meta } = post;
        let opts = self.namespaces.get(name.namespace);
        if let Err(e) = check_publish(&opts, cid.as_deref(), via_api, &body, self.max_body) {
            return reply.fail(e);
        }
        let started = Instant::now();
        let floor = self
            .room(name.full)
            .map_or(0, |r| r.state.lock().order.committed());
        let record = BusRecord {
            ts: now_ms(),
            from: from.to_string(),
            body,
            meta,
        };
        let key = cid.as_deref().map(|c| (cid_owner(from, via_api), c));
        match bus.publish(name.full, &record, key, floor).await {
            Ok(s) => {
                if s.duplicate {
                    self.metrics.idempotent_retries.inc();
                }
                self.metrics
                    .publish_seconds
                    .observe(started.elapsed().as_secs_f64());
                reply.ack(Published {
                    room: name.full.into(),
                    seq: s.seq,
                    ts: s.ts,
                    recipients: 0,
                });
            }
            Err(crate::bus::BusError::RateLimited) => {
                self.metrics.rate_limited("user");
                reply.fail((
                    ErrorCode::RateLimited,
                    "too many messages from this user; slow down".into(),
                ));
            }
            Err(e) => reply.fail(bus_unavailable(e)),
        }
    }

    /// Pump side: a sequenced message arrived from the bus. Delivered if it
    /// is the room's next seq; after a gap the missing ones are read from
    /// the hot history first; a repeat is ignored.
    pub(super) async fn bus_message(&self, bus: &dyn Bus, room: &str, seq: u64, record: BusRecord) {
        let Some(r) = self.room(room) else { return };
        let BusRecord {
            ts,
            from,
            body,
            meta,
        } = record;
        if let Some((committed, body, meta)) = self.accept_bus(&r, seq, ts, &from, body, meta) {
            self.fill_gap(bus, &r, committed, seq - 1).await;
            self.accept_bus(&r, seq, ts, &from, body, meta);
        }
    }

    /// Deliver `seq` if it is next. On a gap, returns the committed seq and
    /// hands the entry back (so the common case never copies it).
    pub(super) fn accept_bus(
        &self,
        room: &Room,
        seq: u64,
        ts: u64,
        from: &str,
        body: Body,
        meta: Meta,
    ) -> Option<(u64, Body, Meta)> {
        let mut st = room.state.lock();
        if st.evicted {
            return None;
        }
        match st.order.accept(seq) {
            Accept::Stale => return None,
            Accept::Gap { committed } => return Some((committed, body, meta)),
            Accept::Deliver => {}
        }
        // Direct messages reach the parties through their user channels.
        if room.dm.is_none() {
            self.deliver_locked(room, &mut st, seq, ts, from, body, meta);
        }
        None
    }

    /// Pump side: a sequenced message whose record does not decode. Its
    /// seq exists, so members are told it is missing (`gap`), in order
    /// after everything before it, and the failure is logged as the bug it
    /// is; it is never skipped in silence.
    pub(super) async fn bus_undeliverable(
        &self,
        bus: &dyn Bus,
        room: &str,
        seq: u64,
        error: &shoal_proto::DecodeError,
    ) {
        self.metrics.bus_undeliverable.inc();
        tracing::error!(room, seq, %error, "sequenced bus message does not decode; members get a gap");
        let Some(r) = self.room(room) else { return };
        let committed = r.state.lock().order.committed();
        if seq > committed + 1 {
            self.fill_gap(bus, &r, committed, seq - 1).await;
        }
        self.skip_gap(&r, seq);
    }

    /// Pump side: the direct-message counterpart of
    /// [`Hub::bus_undeliverable`], for the user's connections here.
    pub(super) fn bus_direct_undeliverable(
        &self,
        user: &str,
        room: &str,
        seq: u64,
        error: &shoal_proto::DecodeError,
    ) {
        self.metrics.bus_undeliverable.inc();
        tracing::error!(room, seq, %error, "direct message on the bus does not decode; the parties get a gap");
        let f = ServerFrame::Gap {
            room: room.to_string(),
            from: seq,
            to: seq,
        };
        self.bus_user_frame(user, &f);
    }

    /// Deliver `(after, upto]` from the hot history. What the history no
    /// longer has is announced to members as a `gap`. False if the bus
    /// failed (retried on the next message or resync).
    pub(super) async fn fill_gap(
        &self,
        bus: &dyn Bus,
        room: &Room,
        mut after: u64,
        upto: u64,
    ) -> bool {
        while after < upto {
            let page = match bus.replay(&room.name, after, upto, GAP_FILL_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(room = %room.name, error = %e, "gap fill failed");
                    return false;
                }
            };
            let first = page.entries.first().map_or(upto + 1, |e| e.msg.seq);
            let missing_to = page.floor.max(first - 1).min(upto);
            if missing_to > after {
                self.skip_gap(room, missing_to);
                after = missing_to;
            }
            let n = page.entries.len() as u64;
            for e in page.entries {
                // A seq the history skips (an entry it could not decode)
                // is announced, never passed over in silence.
                if e.msg.seq > after + 1 {
                    self.skip_gap(room, e.msg.seq - 1);
                }
                after = after.max(e.msg.seq);
                self.accept_bus(room, e.msg.seq, e.msg.ts, &e.msg.from, e.msg.body, e.meta);
            }
            self.metrics.bus_gap_filled.inc_by(n);
            if n == 0 {
                break;
            }
        }
        true
    }

    /// Members cannot get seqs up to `to`: say so and move on.
    pub(super) fn skip_gap(&self, room: &Room, to: u64) {
        let mut st = room.state.lock();
        if st.evicted {
            return;
        }
        let Some((from, to)) = st.order.skip_to(to) else {
            return;
        };
        let f = ServerFrame::Gap {
            room: room.name.to_string(),
            from,
            to,
        };
        self.send_to_room(room, &st, &f, |_| true);
    }

    /// Pump side: the subscription was re-established, or inbound payloads
    /// were dropped: bring every local room up to the bus head. False if
    /// the bus failed meanwhile (try again later).
    pub(super) async fn bus_resync(&self, bus: &dyn Bus) -> bool {
        let rooms: Vec<Arc<Room>> = self
            .rooms
            .iter()
            .flat_map(|sh| sh.lock().map.values().cloned().collect::<Vec<_>>())
            .collect();
        // A room whose shard is out of reach (a Redis Cluster) does not
        // hold up the others; the pass reports failure and is retried.
        let mut all = true;
        for r in rooms {
            let head = match bus.head(&r.name).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(room = %r.name, error = %e, "resync of a room failed: bus unavailable");
                    all = false;
                    continue;
                }
            };
            let committed = r.state.lock().order.committed();
            if head > committed && !self.fill_gap(bus, &r, committed, head).await {
                all = false;
            }
        }
        if !all {
            tracing::warn!("resync incomplete: some rooms' bus unavailable; retried");
        }
        all
    }

    /// Pump side: an ephemeral frame for the room's local members.
    pub(super) fn bus_ephemeral(&self, room: &str, f: &ServerFrame) {
        let Some(r) = self.room(room) else { return };
        let st = r.state.lock();
        match f {
            // As on a single node: nobody hears their own typing or presence.
            ServerFrame::Typing { user, .. } | ServerFrame::Presence { user, .. } => {
                broadcast(&st, f, |m| *m.user != **user, &self.metrics)
            }
            _ => broadcast(&st, f, |_| true, &self.metrics),
        };
    }

    /// Pump side: a frame for one user's local connections.
    pub(super) fn bus_user_frame(&self, user: &str, f: &ServerFrame) -> usize {
        let n = self.push_to_user(user, &mut SharedFrame::new(f), |_| true);
        self.metrics.frames_out(f.kind(), n as u64);
        n
    }

    /// Pump side: a direct message for `user`, from the user's channel:
    /// to every local connection of that user (the other party's
    /// connections get it from their own channel).
    pub(super) fn bus_direct(&self, user: &str, room: &str, seq: u64, record: BusRecord) {
        let f = ServerFrame::entry(
            room.to_string(),
            seq,
            record.from,
            record.ts,
            record.body,
            record.meta,
        );
        let n = self.bus_user_frame(user, &f);
        self.metrics.deliveries.inc_by(n as u64);
    }
}

impl Hub {
    /// Start this node's cluster side: the pump that delivers what the bus
    /// brings (`inbound`, from the bus's [`crate::bus::InboundQueue`]) and
    /// the watchdog that closes every client once the bus has been down
    /// for `grace`. Does nothing on a hub without a cluster link.
    pub fn start_cluster(
        self: &Arc<Self>,
        inbound: InboundRx,
        on_revoke: RevokeHook,
        grace: std::time::Duration,
        stop: CancellationToken,
    ) {
        let Some(bus) = self.bus().cloned() else {
            return;
        };
        tokio::spawn(watchdog(self.clone(), bus.clone(), grace, stop.clone()));
        tokio::spawn(pump(self.clone(), bus, inbound, on_revoke, stop));
    }
}

/// Deliver what the bus receives to local members, in seq order, filling
/// gaps from the hot history. Runs until `stop` or the bus goes away.
async fn pump(
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
    mut rx: InboundRx,
    on_revoke: RevokeHook,
    stop: CancellationToken,
) {
    // A resync that failed (the bus went away again) is retried on a
    // timer, so rooms never wait for their next message to catch up.
    let mut resync_due = false;
    loop {
        let retry = async {
            if resync_due {
                tokio::time::sleep(RESYNC_RETRY).await
            } else {
                std::future::pending().await
            }
        };
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = retry => Some(Inbound::Resync),
            _ = stop.cancelled() => return,
        };
        let Some(item) = item else { return };
        match item {
            Inbound::Payload { room, bytes } => match shoal_proto::bus::decode_payload(&bytes) {
                Ok(BusPayload::Msg { seq, record }) => {
                    hub.bus_message(&*bus, &room, seq, record).await;
                }
                Ok(BusPayload::Ephemeral(frame)) => hub.bus_ephemeral(&room, &frame),
                Ok(BusPayload::Relayed { origin, frame }) => {
                    if origin != hub.node() {
                        match room.strip_prefix('@') {
                            Some(user) => {
                                hub.bus_user_frame(user, &frame);
                            }
                            None => hub.bus_ephemeral(&room, &frame),
                        }
                    }
                }
                Ok(BusPayload::Direct {
                    room: dm,
                    seq,
                    record,
                }) => {
                    if let Some(user) = room.strip_prefix('@') {
                        hub.bus_direct(user, &dm, seq, record);
                    }
                }
                Ok(BusPayload::Undeliverable { direct, seq, error }) => {
                    match (direct, room.strip_prefix('@')) {
                        (Some(dm), Some(user)) => {
                            hub.bus_direct_undeliverable(user, &dm, seq, &error)
                        }
                        (None, None) => hub.bus_undeliverable(&*bus, &room, seq, &error).await,
                        _ => {
                            hub.metrics().bus_bad_payloads.inc();
                            tracing::error!(room = %room, seq, error = %error, "undecodable sequenced bus payload on the wrong channel");
                        }
                    }
                }
                Ok(BusPayload::Revoke { user, jti, exp }) => {
                    if &*room == GLOBAL_CHANNEL {
                        on_revoke(&user, &jti, exp);
                    }
                }
                Err(e) => {
                    hub.metrics().bus_bad_payloads.inc();
                    tracing::warn!(room = %room, error = %e, "undecodable bus payload");
                }
            },
            Inbound::Resync => {
                // Revocations announced while this node was cut off.
                match bus.revoked().await {
                    Ok(list) => list.iter().for_each(|(u, j, e)| on_revoke(u, j, Some(*e))),
                    Err(e) => tracing::warn!(error = %e, "loading revocations failed"),
                }
                resync_due = !hub.bus_resync(&*bus).await;
            }
        }
        if rx.take_overflow() {
            resync_due = !hub.bus_resync(&*bus).await;
        }
    }
}

/// Delay before retrying a failed resync.
const RESYNC_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// A node that cannot reach the bus can neither deliver other nodes'
/// messages nor sequence its own, so past `grace` its clients are sent
/// away (4006) to reconnect, through the load balancer, to a node that
/// can; they recover what they missed with `since`. Shorter blips are
/// ridden out with the connections kept.
async fn watchdog(
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
    grace: std::time::Duration,
    shutdown: CancellationToken,
) {
    let tick = (grace / 4).clamp(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_millis(500),
    );
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut evicted = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        if bus.healthy() {
            if evicted {
                tracing::info!("bus back; accepting connections again");
            }
            down_since = None;
            evicted = false;
            continue;
        }
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        if !evicted && since.elapsed() >= grace {
            evicted = true;
            let n = hub.close_all(shoal_proto::CloseCode::ClusterLost);
            tracing::warn!(
                connections = n,
                "bus down for longer than the grace period; clients sent to other nodes (4006)"
            );
        }
    }
}
