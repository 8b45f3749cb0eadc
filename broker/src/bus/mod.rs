//! The cluster bus: how brokers share rooms.
//!
//! A single node needs no bus: the hub sequences each room under its lock
//! and the group-commit writer makes messages durable (see `hub`). With a
//! bus (`--bus redis`), the bus owns each room's order instead:
//! [`Bus::publish`] assigns the seq, keeps the message in the room's hot
//! history and publishes it to every node subscribed to the room, in one
//! atomic step, and its reply is the sender's ack. Every node, the sender's
//! included, then delivers from its subscription.
//!
//! Delivery is gap-checked per room (`hub::pump`): a message that is not the
//! next seq makes the node read the missing ones from the hot history
//! first, so a node that lost its subscription for a while (Redis restart,
//! a full inbound queue) catches up in order, and nothing is delivered
//! twice. A node subscribes only to rooms it has local members in,
//! reference-counted (`subscribe`/`unsubscribe` pairs).
//!
//! Implementations: [`memory::MemoryBus`] (in-process, several hubs in one
//! process; used by tests and as the reference behaviour) and
//! [`redis::RedisBus`].

pub mod archive;
pub mod keys;
// Only the hub's cluster tests run on the in-process bus; a single node
// has no bus at all.
#[cfg(test)]
pub mod memory;
pub mod presence;
pub mod redis;
pub mod redis_conn;

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use bytes::Bytes;
use shoal_proto::{bus::BusRecord, ServerFrame};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::{metrics::Metrics, store::Replay};

/// Why a bus operation failed.
#[derive(Debug, Error)]
pub enum BusError {
    /// The bus cannot be reached (refused, timed out, reconnecting). The
    /// operation may or may not have happened; a publish retried with the
    /// same `cid` is answered with the original seq if it did.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The bus answered with something this node cannot use.
    #[error("unexpected reply from the bus: {0}")]
    Protocol(String),
    /// The sender is over its cluster-wide publish rate; nothing was
    /// published.
    #[error("publish rate limit reached")]
    RateLimited,
}

/// Outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequenced {
    /// The message's seq in its room.
    pub seq: u64,
    /// Its server timestamp (the original's, for a duplicate).
    pub ts: u64,
    /// True if `cid` matched an earlier publish, which was not repeated.
    pub duplicate: bool,
}

/// What a bus hands to this node's pump (`hub::pump`).
#[derive(Debug)]
pub enum Inbound {
    /// A payload received on a room's channel (decoded by the pump).
    Payload {
        /// Room name.
        room: Arc<str>,
        /// Raw payload.
        bytes: Bytes,
    },
    /// The subscription was (re)established or messages were dropped:
    /// check every local room against the bus head.
    Resync,
}

/// A cluster bus. See the module docs for the guarantees.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sequence, keep and publish a message, atomically. With `cid`, a
    /// repeat within the idempotency window returns the original's seq and
    /// publishes nothing. `floor` is the highest seq this node has seen in
    /// the room (0 if none): the bus never assigns a seq at or below it,
    /// even if it lost its own counter.
    async fn publish(
        &self,
        room: &str,
        record: &BusRecord,
        cid: Option<(&str, &str)>,
        floor: u64,
    ) -> Result<Sequenced, BusError>;

    /// Send an ephemeral frame to every node with members in the room
    /// (this one included). Not stored; lost if the bus is down.
    async fn ephemeral(&self, room: &str, frame: &ServerFrame) -> Result<(), BusError>;

    /// Send a frame that node `origin` already delivered to its own
    /// audience to the other nodes: the room's members, or for a DM room
    /// the parties' connections (through their user channels).
    async fn relay(&self, room: &str, frame: &ServerFrame, origin: &str) -> Result<(), BusError>;

    /// Take a reference on the room's subscription, and return the room's
    /// head seq read after the subscription was active (so every later
    /// message arrives through the subscription, and earlier ones are in
    /// the hot history). On error no reference was taken.
    async fn subscribe(&self, room: &str) -> Result<u64, BusError>;

    /// Drop a reference taken by [`Bus::subscribe`]; the last one
    /// unsubscribes.
    fn unsubscribe(&self, room: &str);

    /// The room's last assigned seq.
    async fn head(&self, room: &str) -> Result<u64, BusError>;

    /// Take a reference on a user's channel (direct messages to the user
    /// arrive on it). Called when the user's first connection on this node
    /// opens; never waits.
    fn subscribe_user(&self, user: &str);

    /// Drop a reference taken by [`Bus::subscribe_user`].
    fn unsubscribe_user(&self, user: &str);

    /// Revoke a token on every node: it is kept until `exp` (seconds since
    /// the epoch) and announced, so nodes close connections that use it.
    async fn revoke(&self, user: &str, jti: &str, exp: u64) -> Result<(), BusError>;

    /// Tokens revoked cluster-wide and not yet expired: (user, jti).
    async fn revoked(&self) -> Result<Vec<(String, String, u64)>, BusError>;

    /// Record a presence change of this node (applied in order, in the
    /// background; the `presence` events come back on the room channel).
    fn presence(&self, op: presence::PresenceOp);

    /// Record users known to the cluster (seen with a valid token, or
    /// registered on some node), for clusters without a shared database.
    async fn remember_users(&self, names: &[String]) -> Result<(), BusError>;

    /// Whether the cluster knows `user` (see [`Bus::remember_users`]).
    async fn user_known(&self, user: &str) -> Result<bool, BusError>;

    /// Users present in a room on any node, sorted.
    async fn members(&self, room: &str) -> Result<Vec<String>, BusError>;

    /// Messages of the hot history with `after < seq <= upto`, oldest
    /// first, at most `limit`. `floor` is the first seq still kept (an
    /// `after + 1` below it means a gap).
    async fn replay(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Replay, BusError>;

    /// Announce node `node`'s admin address `url` for `ttl` (renewed by a
    /// heartbeat; the admin console gathers from every live node).
    async fn announce(
        &self,
        node: &str,
        url: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BusError>;

    /// The live nodes' (id, admin address), sorted by id.
    async fn nodes(&self) -> Result<Vec<(String, String)>, BusError>;

    /// True while the bus is reachable and this node's subscriptions are
    /// in place.
    fn healthy(&self) -> bool;
}

/// Bounded queue from a bus to its pump. Overflow policy: the payload is
/// dropped, counted in `shoal_bus_inbound_dropped_total`, and a resync is
/// flagged, so the pump reads what was dropped from the hot history.
#[derive(Clone)]
pub struct InboundQueue {
    tx: mpsc::Sender<Inbound>,
    overflowed: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl InboundQueue {
    /// A queue of `capacity` payloads and its receiving end.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Self, InboundRx) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        (
            InboundQueue {
                tx,
                overflowed: overflowed.clone(),
                metrics,
            },
            InboundRx { rx, overflowed },
        )
    }

    /// Queue without waiting (the caller is a connection's read loop).
    pub fn push(&self, item: Inbound) {
        if self.tx.try_send(item).is_err() {
            self.metrics.bus_inbound_dropped.inc();
            self.overflowed.store(true, Ordering::Release);
        }
    }
}

/// Receiving end of an [`InboundQueue`].
pub struct InboundRx {
    rx: mpsc::Receiver<Inbound>,
    overflowed: Arc<AtomicBool>,
}

impl InboundRx {
    /// The next item; None once every sender is gone.
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    /// True (once) if items were dropped on a full queue since the last
    /// call: what they carried must be read back (resync).
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }
}

/// Channel name (as [`Inbound::Payload::room`]) of the cluster-wide channel.
pub const GLOBAL_CHANNEL: &str = "@";

/// Channel name of a user's channel.
pub fn user_channel(user: &str) -> String {
    format!("@{user}")
}

/// The user channels of a direct-message room's two parties; None for
/// any other room.
pub fn dm_channels(room: &str) -> Option<[String; 2]> {
    let (a, b) = shoal_proto::RoomName::parse(room).ok()?.dm?;
    Some([user_channel(a), user_channel(b)])
}

/// Called for each revoked token (user, jti): forget it in auth and close
/// the connections that use it.
pub type RevokeHook = Arc<dyn Fn(&str, &str, Option<u64>) + Send + Sync>;
