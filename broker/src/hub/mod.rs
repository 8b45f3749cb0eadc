//! The room registry and the user registry, both sharded by name hash,
//! and the ordering rules that tie them to storage and the cluster.
//!
//! Locks are `parking_lot` mutexes held only for in-memory work, never
//! across `.await`. Lock order is always shard -> room -> user shard; the
//! user registry never takes a room lock.
//!
//! Joining with `since` replays from storage up to `committed`, then
//! attaches under the room lock only if `committed` has not moved, so the
//! seam between replay and live traffic has no gap and no duplicate.
//!
//! Queueing to connections is a non-blocking `try_send`; a full queue
//! closes that one consumer (see `outbound`), it never blocks the room.
//!
//! Where the rest lives:
//! - `room`: a room's state; its ordering (seq, committed, epoch) moves
//!   only through `room::Order`;
//! - `local`: single-node sequencing and the group-commit callbacks;
//! - `cluster`: bus publish, in-order delivery from the bus, gap fill,
//!   resync;
//! - `ops`: the operations that differ between one node and a cluster,
//!   decided there so that nothing outside the hub asks;
//! - `acl`: who may do what in a room (owner, roles, bans, mutes),
//!   changed only by the room's moderation entries as they are delivered;
//! - `error`: [`HubError`], every refusal.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use shoal_proto::{names::RoomName, Body, ErrorCode, MarkState, Meta, ServerFrame};
use tokio::sync::{mpsc, oneshot};

use crate::{
    bus::{presence::PresenceOp, Bus},
    clock::now_ms,
    config::{NamespaceOpts, NamespaceTable, PublishPolicy},
    metrics::Metrics,
    outbound::{ConnHandle, SharedFrame},
    store::Store,
};

/// Longest accepted client message id, in bytes.
pub const MAX_CID_LEN: usize = 64;
/// Client message ids remembered per room (oldest forgotten first).
pub const MAX_CIDS_PER_ROOM: usize = 4096;

pub mod acl;
mod cluster;
mod local;
mod ops;
mod room;
use cluster::bus_unavailable;
pub use room::Room;
use room::{Order, RoomState};

fn cid_key(user: &str, cid: &str) -> String {
    format!("{user}\0{cid}")
}

/// Whose idempotency space a publish's `cid` lives in: the sender's, or,
/// for the server API, one no user name can spell (`@` is not a name
/// character), so a user's cid can never shadow an API publish.
fn cid_owner(from: &str, via_api: bool) -> &str {
    if via_api {
        API_CID_OWNER
    } else {
        from
    }
}

/// Idempotency space of the server API.
const API_CID_OWNER: &str = "@api";

/// The idempotency space of a stored message: API messages are stored
/// with the reserved sender name, which no user may hold.
fn stored_cid_owner(sender: &str) -> &str {
    cid_owner(sender, sender == shoal_proto::names::SERVER_SENDER)
}

mod error;
pub use error::HubError;

fn unavailable(e: impl std::fmt::Display) -> HubError {
    tracing::warn!(error = %e, "store unavailable");
    HubError::new(ErrorCode::Unavailable, "storage unavailable; retry later")
}

#[derive(Default)]
struct RoomShard {
    map: HashMap<Arc<str>, Arc<Room>>,
    /// Counts evictions, so a head loaded from the store while the shard
    /// was unlocked is known to be stale if a room was evicted meanwhile.
    evictions: u64,
}

type UserShard = Mutex<HashMap<Arc<str>, Vec<ConnHandle>>>;

/// What a publish carries: the body, and what makes the entry an event,
/// a reply or a message with mentions (empty for a plain message).
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    /// Body.
    pub body: Body,
    /// Entry metadata (`shoal_proto::entry`).
    pub meta: Meta,
}

impl From<Body> for Post {
    fn from(body: Body) -> Self {
        Post {
            body,
            meta: Meta::default(),
        }
    }
}

/// A live connection as the admin console lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnInfo {
    /// Process-unique id (with the node's id, it names the connection).
    pub id: u64,
    /// User.
    pub user: String,
    /// Wire encoding (its subprotocol).
    pub encoding: &'static str,
    /// `websocket` or `socket.io`.
    pub transport: &'static str,
    /// Client address, where known.
    pub addr: Option<String>,
    /// Seconds since it connected.
    pub age_secs: u64,
    /// Frames waiting in its outbound queue.
    pub queued: usize,
    /// Rooms it is in.
    pub rooms: Vec<String>,
}

/// A room held by a node, as the admin console lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomInfo {
    /// Room.
    pub room: String,
    /// Member connections on this node.
    pub connections: usize,
    /// Distinct users among them.
    pub users: usize,
    /// Last seq delivered.
    pub last_seq: u64,
    /// Members only.
    pub private: bool,
    /// Owner, if created.
    pub owner: Option<String>,
}

/// Where the outcome of a request goes.
pub enum Reply {
    /// Nobody waits.
    None,
    /// A WebSocket request: answered with a frame carrying `id`.
    Conn {
        /// The requesting connection.
        conn: ConnHandle,
        /// Request id.
        id: Option<u64>,
    },
    /// A REST request waiting for the publish outcome.
    Chan(oneshot::Sender<Result<Published, HubError>>),
    /// A `delete` request: answered `deleted` with the deleted message's
    /// seq (the event's own seq reaches members as the entry).
    Deleted {
        /// The requesting connection.
        conn: ConnHandle,
        /// Request id.
        id: Option<u64>,
        /// Seq of the deleted message.
        seq: u64,
    },
}

impl Reply {
    /// The message was stored (if persistent) and delivered.
    pub fn ack(self, p: Published) {
        match self {
            Reply::None => {}
            Reply::Conn { conn, id } => {
                conn.send(&ServerFrame::Ack {
                    id,
                    room: p.room.to_string(),
                    seq: p.seq,
                    ts: p.ts,
                });
            }
            Reply::Chan(tx) => {
                let _ = tx.send(Ok(p));
            }
            Reply::Deleted { conn, id, seq } => {
                conn.send(&ServerFrame::Deleted {
                    id,
                    room: p.room.to_string(),
                    seq,
                });
            }
        }
    }

    /// The request failed.
    pub fn fail(self, e: impl Into<HubError>) {
        let e = e.into();
        match self {
            Reply::None => {}
            Reply::Conn { conn, id } | Reply::Deleted { conn, id, .. } => {
                conn.send(&ServerFrame::error(id, e.code, e.message));
            }
            Reply::Chan(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Work for the group-commit writer, in the order it must happen.
pub enum Pending {
    /// A sequenced message to store, then deliver and ack.
    Msg {
        /// Seq.
        seq: u64,
        /// Server timestamp (ms).
        ts: u64,
        /// Sender.
        from: Arc<str>,
        /// Body.
        body: Body,
        /// Entry metadata.
        meta: Meta,
        /// Client message id.
        cid: Option<String>,
        /// When the publish was accepted (for `publish_seconds`).
        started: Instant,
    },
    /// A retried publish whose original is still uncommitted: ack it once
    /// the original's batch commits.
    AckOnly {
        /// Seq of the original.
        seq: u64,
        /// Timestamp of the original.
        ts: u64,
    },
    /// Record membership.
    Join(Arc<str>),
    /// Drop membership.
    Leave(Arc<str>),
    /// Raise a receipt watermark.
    Mark {
        /// User.
        user: Arc<str>,
        /// Watermark.
        seq: u64,
        /// Which.
        state: MarkState,
    },
}

/// One unit of work for the writer.
pub struct Item {
    /// Room concerned.
    pub room: Arc<Room>,
    /// Room epoch when queued.
    pub epoch: u64,
    /// What to do.
    pub op: Pending,
    /// Who to answer.
    pub reply: Reply,
}

/// What goes down the writer's queue.
// The large variant is the common one (every message); boxing it would
// allocate per message to shrink the rare small ones.
#[allow(clippy::large_enum_variant)]
pub enum Job {
    /// Work.
    Item(Item),
    /// Answered once everything queued before it has committed.
    Flush(oneshot::Sender<()>),
}

/// Sender side of the writer's bounded queue.
pub type JobSender = mpsc::Sender<Job>;
/// A reserved slot in the writer's queue.
pub type JobPermit = mpsc::OwnedPermit<Job>;

/// Registry of rooms and connected users.
pub struct Hub {
    rooms: Box<[Mutex<RoomShard>]>,
    users: Box<[UserShard]>,
    hasher: std::hash::RandomState,
    mask: usize,
    namespaces: NamespaceTable,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    jobs: JobSender,
    cid_window: Duration,
    /// Largest body, in bytes, in either encoding (`--max-message-size`).
    max_body: usize,
    /// How this node reaches the rest of its cluster; `None` on a single
    /// node. Fixed at construction: the one place "one node or cluster"
    /// is decided.
    cluster: Option<ClusterLink>,
}

/// A node's link to its cluster, given to [`Hub::new`].
pub struct ClusterLink {
    /// The cluster bus (sequencing, hot history, presence, fan-out).
    pub bus: Arc<dyn Bus>,
    /// This node's id on the bus.
    pub node: Arc<str>,
    /// Whether the store is shared by every node (PostgreSQL) rather than
    /// this node's own.
    pub shared_store: bool,
}

/// The hub's own settings, from the configuration.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Registry shards (rounded up to a power of two).
    pub shards: usize,
    /// Per-namespace options.
    pub namespaces: NamespaceTable,
    /// How long a client message id is remembered per room.
    pub cid_window: Duration,
    /// Largest body, in bytes, in either encoding (`--max-message-size`).
    pub max_body: usize,
}

/// Checks every publish passes before it is sequenced, whatever its
/// ingress: the namespace's publish policy, the cid, and the body policy
/// of `shoal_proto::body` (nesting depth, size in every encoding), so a
/// sequenced message is always deliverable by every node to every client.
fn check_publish(
    opts: &NamespaceOpts,
    cid: Option<&str>,
    via_api: bool,
    body: &Body,
    max_body: usize,
) -> Result<(), HubError> {
    if !via_api && opts.publish == PublishPolicy::Api {
        return Err(HubError::from((
            ErrorCode::Forbidden,
            "only the server API publishes in this namespace".into(),
        )));
    }
    // Control characters (NUL among them) are refused: PostgreSQL cannot
    // store NUL in text, and one unstorable message would stall the batch
    // it travels in.
    if cid.is_some_and(|c| c.is_empty() || c.len() > MAX_CID_LEN || c.chars().any(char::is_control))
    {
        return Err(HubError::from((
            ErrorCode::BadRequest,
            format!("cid must be 1 to {MAX_CID_LEN} bytes without control characters"),
        )));
    }
    shoal_proto::check_body(body, max_body).map_err(|e| {
        let code = match e {
            shoal_proto::BodyError::TooDeep { .. } => ErrorCode::BadRequest,
            shoal_proto::BodyError::TooLarge { .. } => ErrorCode::TooLarge,
        };
        HubError::new(code, e.to_string())
    })
}

/// What a publish produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Room (for a DM, the DM room).
    pub room: Arc<str>,
    /// Assigned seq.
    pub seq: u64,
    /// Server timestamp (ms).
    pub ts: u64,
    /// Connections the message was queued to (0 for an idempotent retry).
    pub recipients: usize,
}

/// Outcome of [`Hub::attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Member now; the room's committed seq.
    Joined(u64),
    /// The room moved past the expected seq; replay more and retry.
    Behind(u64),
    /// The room was evicted meanwhile; look it up again.
    Evicted,
}

impl Hub {
    /// A hub over `store`, sending its writes to the group-commit queue
    /// `jobs`, part of a cluster through `cluster` (or on its own).
    pub fn new(
        settings: HubSettings,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
        jobs: JobSender,
        cluster: Option<ClusterLink>,
    ) -> Self {
        let HubSettings {
            shards,
            namespaces,
            cid_window,
            max_body,
        } = settings;
        let n = shards.max(1).next_power_of_two();
        Hub {
            rooms: (0..n).map(|_| Mutex::new(RoomShard::default())).collect(),
            users: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
            mask: n - 1,
            namespaces,
            metrics,
            store,
            jobs,
            cid_window,
            max_body,
            cluster,
        }
    }

    /// Whether the store is shared by every node of the cluster.
    fn shared_store(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.shared_store)
    }

    /// This node's id on the bus ("" without one).
    fn node(&self) -> &str {
        self.cluster.as_ref().map_or("", |c| &c.node)
    }

    /// The cluster bus, if this node is part of a cluster. Private to the
    /// hub: nothing outside it branches on whether there is one.
    fn bus(&self) -> Option<&Arc<dyn Bus>> {
        self.cluster.as_ref().map(|c| &c.bus)
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn shard<T: Hash + ?Sized>(&self, key: &T) -> usize {
        (self.hasher.hash_one(key) as usize) & self.mask
    }

    /// Parse a room name and check that `user` may use it (DM privacy).
    pub fn check_access<'a>(&self, room: &'a str, user: &str) -> Result<RoomName<'a>, HubError> {
        let name = RoomName::parse(room)
            .map_err(|e| (ErrorCode::BadRequest, format!("room `{room}`: {e}")))?;
        if name.dm.is_some() && !name.dm_allows(user) {
            return Err(HubError::from((
                ErrorCode::Forbidden,
                "not a party of this direct-message room".into(),
            )));
        }
        Ok(name)
    }

    /// Whether rooms named like this are stored.
    pub fn persists(&self, name: &RoomName<'_>) -> bool {
        self.namespaces.get(name.namespace).persist
    }

    /// The room, loading its head from the store if it is not in memory.
    pub async fn ensure_room(&self, name: &RoomName<'_>) -> Result<Arc<Room>, HubError> {
        let idx = self.shard(name.full);
        loop {
            let evictions = {
                let sh = self.rooms[idx].lock();
                if let Some(r) = sh.map.get(name.full) {
                    return Ok(r.clone());
                }
                sh.evictions
            };
            let opts = self.namespaces.get(name.namespace);
            if let Some(bus) = self.bus() {
                let head = bus.subscribe(name.full).await.map_err(bus_unavailable)?;
                let acl = match self.load_acl(name.full, opts.persist, head).await {
                    Ok(a) => a,
                    Err(e) => {
                        bus.unsubscribe(name.full);
                        return Err(unavailable(e));
                    }
                };
                let mut sh = self.rooms[idx].lock();
                if let Some(r) = sh.map.get(name.full) {
                    bus.unsubscribe(name.full);
                    return Ok(r.clone());
                }
                if sh.evictions != evictions {
                    bus.unsubscribe(name.full);
                    continue;
                }
                let mut st = RoomState::default();
                st.acl = acl;
                return Ok(self.insert_room(&mut sh, name, opts, head, st));
            }
            let (head, acl) = if opts.persist {
                let since = now_ms().saturating_sub(self.cid_window.as_millis() as u64);
                let head = self
                    .store
                    .room_head(name.full, since)
                    .await
                    .map_err(unavailable)?;
                let acl = self
                    .load_acl(name.full, true, head.last_seq)
                    .await
                    .map_err(unavailable)?;
                (head, acl)
            } else {
                Default::default()
            };
            let mut sh = self.rooms[idx].lock();
            if let Some(r) = sh.map.get(name.full) {
                return Ok(r.clone());
            }
            if sh.evictions != evictions {
                continue;
            }
            let mut st = RoomState::default();
            st.acl = acl;
            let window = self.cid_window.as_millis() as u64;
            for c in head.cids.into_iter().rev() {
                st.remember_cid(
                    cid_key(stored_cid_owner(&c.user), &c.cid),
                    c.seq,
                    c.ts,
                    window,
                );
            }
            return Ok(self.insert_room(&mut sh, name, opts, head.last_seq, st));
        }
    }

    fn insert_room(
        &self,
        sh: &mut RoomShard,
        name: &RoomName<'_>,
        opts: NamespaceOpts,
        head: u64,
        mut st: RoomState,
    ) -> Arc<Room> {
        st.order = Order::at(head);
        let room = Arc::new(Room {
            name: name.full.into(),
            opts,
            dm: name.dm.map(|(a, b)| (a.into(), b.into())),
            state: Mutex::new(st),
        });
        self.metrics.rooms.inc();
        sh.map.insert(room.name.clone(), room.clone());
        room
    }

    /// The seq delivered to members so far.
    pub fn committed(&self, room: &Room) -> u64 {
        room.state.lock().order.committed()
    }

    /// Make `conn` a member. With `at`, only if the room's committed seq is
    /// exactly `at` (the client has everything up to it). On success the
    /// `joined` reply (with `id`) is queued under the room lock, so it comes
    /// before any live message of the room.
    pub fn attach(
        &self,
        conn: &ConnHandle,
        room: &Arc<Room>,
        at: Option<u64>,
        id: Option<u64>,
    ) -> Result<Attach, HubError> {
        let mut st = room.state.lock();
        if st.evicted {
            return Ok(Attach::Evicted);
        }
        let joined = |seq| {
            conn.send(&ServerFrame::Joined {
                id,
                room: room.name.to_string(),
                seq,
            });
            Ok(Attach::Joined(seq))
        };
        if st.members.contains_key(&conn.id) {
            return joined(st.order.committed());
        }
        if let Some(at) = at {
            if st.order.committed() != at {
                return Ok(Attach::Behind(st.order.committed()));
            }
        }
        st.acl.may_enter(room.opts.open, &conn.user, now_ms())?;
        if st.members.len() >= room.opts.max_members {
            return Err(HubError::from((ErrorCode::Conflict, "room is full".into())));
        }
        st.members.insert(conn.id, conn.clone());
        self.metrics.room_members.inc();
        let count = st.users.entry(conn.user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 && room.opts.presence {
            // Under the room lock, so joins and leaves reach the bus in order.
            match self.bus() {
                Some(bus) => bus.presence(PresenceOp::Join {
                    room: room.name.clone(),
                    user: conn.user.clone(),
                }),
                None => {
                    let f = ServerFrame::Presence {
                        room: room.name.to_string(),
                        user: conn.user.to_string(),
                        online: true,
                    };
                    broadcast(&st, &f, |m| m.id != conn.id, &self.metrics);
                }
            }
        }
        joined(st.order.committed())
    }

    /// Remove `conn` from a room (explicit leave or disconnect).
    pub fn leave(&self, conn: &ConnHandle, room: &Arc<Room>) {
        let mut st = room.state.lock();
        if st.members.remove(&conn.id).is_none() {
            return;
        }
        self.metrics.room_members.dec();
        let last = match st.users.get_mut(&conn.user) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            _ => {
                st.users.remove(&conn.user);
                true
            }
        };
        if last && room.opts.presence {
            match self.bus() {
                Some(bus) => bus.presence(PresenceOp::Leave {
                    room: room.name.clone(),
                    user: conn.user.clone(),
                }),
                None => {
                    let f = ServerFrame::Presence {
                        room: room.name.to_string(),
                        user: conn.user.to_string(),
                        online: false,
                    };
                    broadcast(&st, &f, |_| true, &self.metrics);
                }
            }
        }
        drop(st);
        self.maybe_evict(room);
    }

    /// Remove every connection of `user` on this node from the room (a
    /// kick or a ban): each is told `left {reason}`; presence goes as for
    /// a leave. Called with the room locked, as the entry is delivered.
    fn remove_user(&self, room: &Room, st: &mut RoomState, user: &str, reason: &str) {
        let ids: Vec<u64> = st
            .members
            .values()
            .filter(|c| &*c.user == user)
            .map(|c| c.id)
            .collect();
        if ids.is_empty() {
            return;
        }
        let left = ServerFrame::Left {
            id: None,
            room: room.name.to_string(),
            reason: Some(reason.to_string()),
        };
        for id in ids {
            if let Some(c) = st.members.remove(&id) {
                self.metrics.room_members.dec();
                c.send(&left);
            }
        }
        let Some((user, _)) = st.users.remove_entry(user) else {
            return;
        };
        if room.opts.presence {
            match self.bus() {
                Some(bus) => bus.presence(PresenceOp::Leave {
                    room: room.name.clone(),
                    user,
                }),
                None => {
                    let f = ServerFrame::Presence {
                        room: room.name.to_string(),
                        user: user.to_string(),
                        online: false,
                    };
                    broadcast(st, &f, |_| true, &self.metrics);
                }
            }
        }
    }

    /// Whether connection `conn` is still a member (a kick or a ban
    /// removes it without its session knowing).
    pub fn is_attached(&self, room: &Room, conn: u64) -> bool {
        room.state.lock().members.contains_key(&conn)
    }

    /// Read the room's access rules (under its lock, briefly).
    pub fn with_acl<T>(&self, room: &Room, f: impl FnOnce(&acl::Acl) -> T) -> T {
        f(&room.state.lock().acl)
    }

    /// Free a room with no members and nothing in flight. Its head is in
    /// the store (persistent) or not worth keeping (non-persistent rooms
    /// restart at seq 0 once idle).
    /// Called after every committed message, so the common case (a room
    /// with members) is answered under the room lock alone, without taking
    /// the shard lock that every join and lookup in the shard shares.
    pub fn maybe_evict(&self, room: &Arc<Room>) {
        let idle = |st: &RoomState| !st.evicted && st.members.is_empty() && st.order.idle();
        if !idle(&room.state.lock()) {
            return;
        }
        let mut sh = self.rooms[self.shard(&*room.name)].lock();
        let mut st = room.state.lock();
        if !idle(&st) {
            return;
        }
        if sh.map.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room)) {
            st.evicted = true;
            sh.map.remove(&room.name);
            sh.evictions += 1;
            self.metrics.rooms.dec();
            if let Some(bus) = self.bus() {
                bus.unsubscribe(&room.name);
            }
        }
    }

    /// Queue `f` to a room's audience: the members, or for a DM room every
    /// live connection of both parties (they need not have joined).
    fn send_to_room(
        &self,
        room: &Room,
        st: &RoomState,
        f: &ServerFrame,
        filter: impl Fn(&ConnHandle) -> bool,
    ) -> usize {
        let Some((a, b)) = &room.dm else {
            return broadcast(st, f, filter, &self.metrics);
        };
        let mut shared = SharedFrame::new(f);
        let n =
            self.push_to_user(a, &mut shared, &filter) + self.push_to_user(b, &mut shared, &filter);
        self.metrics.frames_out(f.kind(), n as u64);
        n
    }

    /// Queue a frame (encoded at most once per encoding, across calls with
    /// the same `shared`) to every live connection of `user` on this node
    /// that passes `filter`.
    fn push_to_user(
        &self,
        user: &str,
        shared: &mut SharedFrame<'_>,
        filter: impl Fn(&ConnHandle) -> bool,
    ) -> usize {
        let ephemeral = shared.frame().is_ephemeral();
        let users = self.users[self.shard(user)].lock();
        let mut n = 0;
        for c in users.get(user).into_iter().flatten().filter(|c| filter(c)) {
            if c.deliver(shared, ephemeral) {
                n += 1;
            }
        }
        n
    }

    /// Send a notice (an unsequenced frame every member should see: a
    /// read mark, a deletion) to the room's audience, optionally sparing
    /// one connection. In a cluster the other nodes get it relayed through
    /// the bus. Ephemeral frames (typing) go through [`Hub::typing`].
    pub fn notify(&self, room: &Room, f: &ServerFrame, except: Option<u64>) -> usize {
        if let Some(bus) = self.bus().cloned() {
            let (name, frame, node) = (room.name.clone(), f.clone(), self.node().to_string());
            tokio::spawn(async move {
                if let Err(e) = bus.relay(&name, &frame, &node).await {
                    tracing::debug!(error = %e, "notice not relayed to other nodes");
                }
            });
        }
        let st = room.state.lock();
        self.send_to_room(room, &st, f, |c| Some(c.id) != except)
    }

    /// Publish from async code: loads the room, reserves the writer slot,
    /// and retries if the room is evicted meanwhile.
    pub async fn publish_async(
        &self,
        name: &RoomName<'_>,
        from: &Arc<str>,
        post: Post,
        cid: Option<String>,
        via_api: bool,
        mut reply: Reply,
    ) {
        if let Some(bus) = self.bus() {
            return self
                .publish_bus(&**bus, name, from, post, cid, via_api, reply)
                .await;
        }
        for _ in 0..8 {
            let room = match self.ensure_room(name).await {
                Ok(r) => r,
                Err(e) => return reply.fail(e),
            };
            let permit = match self.permit_for(&room).await {
                Ok(p) => p,
                Err(e) => return reply.fail(e),
            };
            match self.publish(
                &room,
                from,
                post.clone(),
                cid.clone(),
                via_api,
                reply,
                permit,
            ) {
                Ok(()) => {
                    self.maybe_evict(&room);
                    return;
                }
                Err(r) => reply = r,
            }
        }
        reply.fail((ErrorCode::Unavailable, "room is busy; retry".into()));
    }

    /// Forward `typing` to the room's other users (on every node).
    pub fn typing(&self, room: &Room, conn: &ConnHandle) {
        let f = ServerFrame::Typing {
            room: room.name.to_string(),
            user: conn.user.to_string(),
        };
        if let Some(bus) = self.bus().cloned() {
            let name = room.name.clone();
            tokio::spawn(async move {
                if let Err(e) = bus.ephemeral(&name, &f).await {
                    tracing::debug!(error = %e, "typing not forwarded");
                }
            });
            return;
        }
        let st = room.state.lock();
        broadcast(&st, &f, |m| m.user != conn.user, &self.metrics);
    }

    /// Users in a room, sorted.
    pub fn members(&self, room: &Room) -> Vec<String> {
        let st = room.state.lock();
        let mut v: Vec<String> = st.users.keys().map(|u| u.to_string()).collect();
        drop(st);
        v.sort_unstable();
        v
    }

    /// Look up a room in memory.
    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms[self.shard(name)].lock().map.get(name).cloned()
    }

    /// Add a live connection to the user registry. In a cluster, the
    /// user's first connection on this node subscribes to the user's
    /// channel (under the shard lock, so subscribe and unsubscribe reach
    /// the bus in order).
    pub fn register(&self, conn: &ConnHandle) {
        let mut shard = self.users[self.shard(&*conn.user)].lock();
        let v = shard.entry(conn.user.clone()).or_default();
        v.push(conn.clone());
        if v.len() == 1 {
            if let Some(bus) = self.bus() {
                bus.subscribe_user(&conn.user);
            }
        }
    }

    /// Remove a connection from the user registry.
    pub fn unregister(&self, conn: &ConnHandle) {
        let mut shard = self.users[self.shard(&*conn.user)].lock();
        if let Some(v) = shard.get_mut(&conn.user) {
            let before = v.len();
            v.retain(|c| c.id != conn.id);
            if v.is_empty() {
                shard.remove(&conn.user);
                if before > 0 {
                    if let Some(bus) = self.bus() {
                        bus.unsubscribe_user(&conn.user);
                    }
                }
            }
        }
    }

    /// True if the user has at least one live connection on this node.
    pub fn is_online(&self, user: &str) -> bool {
        self.users[self.shard(user)].lock().contains_key(user)
    }

    /// Close every connection of `user` that authenticated with `jti`.
    pub fn close_token(&self, user: &str, jti: &str, code: shoal_proto::CloseCode) -> usize {
        let shard = self.users[self.shard(user)].lock();
        let mut n = 0;
        for c in shard
            .get(user)
            .into_iter()
            .flatten()
            .filter(|c| &*c.jti == jti)
        {
            c.close(code);
            n += 1;
        }
        n
    }

    /// Every live connection on this node, with the rooms it is in, for
    /// the admin console (locks each shard and room briefly, one at a time).
    pub fn connections_snapshot(&self) -> Vec<ConnInfo> {
        let mut rooms_of: HashMap<u64, Vec<String>> = HashMap::new();
        for sh in self.rooms.iter() {
            let rooms: Vec<Arc<Room>> = sh.lock().map.values().cloned().collect();
            for r in rooms {
                for id in r.state.lock().members.keys() {
                    rooms_of.entry(*id).or_default().push(r.name.to_string());
                }
            }
        }
        let mut out = Vec::new();
        for shard in self.users.iter() {
            let conns: Vec<ConnHandle> = shard.lock().values().flatten().cloned().collect();
            for c in conns {
                let (peer, age, queued) = c.describe();
                let mut rooms = rooms_of.remove(&c.id).unwrap_or_default();
                rooms.sort();
                out.push(ConnInfo {
                    id: c.id,
                    user: c.user.to_string(),
                    encoding: c.encoding.subprotocol(),
                    transport: peer.as_ref().map_or("websocket", |p| p.transport),
                    addr: peer.and_then(|p| p.addr).map(|a| a.to_string()),
                    age_secs: age.as_secs(),
                    queued,
                    rooms,
                });
            }
        }
        out.sort_by(|a, b| a.user.cmp(&b.user).then(a.id.cmp(&b.id)));
        out
    }

    /// Every room held on this node: members here and the last seq.
    pub fn rooms_snapshot(&self) -> Vec<RoomInfo> {
        let mut out = Vec::new();
        for sh in self.rooms.iter() {
            let rooms: Vec<Arc<Room>> = sh.lock().map.values().cloned().collect();
            for r in rooms {
                let st = r.state.lock();
                out.push(RoomInfo {
                    room: r.name.to_string(),
                    connections: st.members.len(),
                    users: st.users.len(),
                    last_seq: st.order.committed(),
                    private: st.acl.private,
                    owner: st.acl.owner.as_deref().map(str::to_string),
                });
            }
        }
        out.sort_by(|a, b| a.room.cmp(&b.room));
        out
    }

    /// Close connection `id` on this node with `code`; false if it is not here.
    pub fn close_conn(&self, id: u64, code: shoal_proto::CloseCode) -> bool {
        for shard in self.users.iter() {
            if let Some(c) = shard.lock().values().flatten().find(|c| c.id == id) {
                c.close(code);
                return true;
            }
        }
        false
    }

    /// Close every connection of `user` on this node with `code`; returns
    /// the token ids they used (for revocation) and how many closed.
    pub fn close_user(&self, user: &str, code: shoal_proto::CloseCode) -> Vec<String> {
        let shard = self.users[self.shard(user)].lock();
        let mut jtis = Vec::new();
        for c in shard.get(user).into_iter().flatten() {
            c.close(code);
            jtis.push(c.jti.to_string());
        }
        jtis
    }

    /// Close every connection of this node with `code`; returns how many.
    pub fn close_all(&self, code: shoal_proto::CloseCode) -> usize {
        let mut n = 0;
        for shard in self.users.iter() {
            for c in shard.lock().values().flatten() {
                c.close(code);
                n += 1;
            }
        }
        n
    }
}

/// Queue `f` to every member passing `filter`, encoding at most once per
/// encoding. Returns how many connections it was queued to.
fn broadcast(
    st: &RoomState,
    f: &ServerFrame,
    filter: impl Fn(&ConnHandle) -> bool,
    metrics: &Metrics,
) -> usize {
    let ephemeral = f.is_ephemeral();
    let mut shared = SharedFrame::new(f);
    let mut n = 0;
    for m in st.members.values().filter(|m| filter(m)) {
        if m.deliver(&mut shared, ephemeral) {
            n += 1;
        }
    }
    metrics.frames_out(f.kind(), n as u64);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{outbound::Inbox, persist::GroupCommit, store::sqlite::SqliteStore};
    use shoal_proto::Encoding;
    use tokio_util::sync::CancellationToken;

    fn conn(user: &str, m: &Arc<Metrics>) -> (ConnHandle, Inbox) {
        Inbox::pair(user, Encoding::Json, 64, m.clone())
    }

    fn drain(rx: &mut Inbox) -> Vec<ServerFrame> {
        let mut out = vec![];
        while let Ok(b) = rx.try_recv() {
            // strip the 2-byte header of small text frames
            out.push(Encoding::Json.decode_server(&b[2..]).expect("decode"));
        }
        out
    }

    fn seqs(frames: &[ServerFrame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Msg { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    struct Fixture {
        hub: Arc<Hub>,
        m: Arc<Metrics>,
        _dir: tempfile::TempDir,
        stop: CancellationToken,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    fn fixture(ns: NamespaceTable) -> Fixture {
        fixture_with(ns, Arc::new(Metrics::new("t")), None)
    }

    fn settings(namespaces: NamespaceTable) -> HubSettings {
        HubSettings {
            shards: 4,
            namespaces,
            cid_window: Duration::from_secs(60),
            max_body: 64 * 1024,
        }
    }

    fn fixture_with(ns: NamespaceTable, m: Arc<Metrics>, cluster: Option<ClusterLink>) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path(), false).expect("open"));
        let (tx, rx) = mpsc::channel(64);
        let hub = Arc::new(Hub::new(
            settings(ns),
            m.clone(),
            store.clone(),
            tx,
            cluster,
        ));
        let stop = CancellationToken::new();
        tokio::spawn(
            GroupCommit {
                hub: hub.clone(),
                store,
                metrics: m.clone(),
                batch: 16,
                max_memberships: 1000,
                webhook: None,
            }
            .run(rx, stop.clone()),
        );
        Fixture {
            hub,
            m,
            _dir: dir,
            stop,
        }
    }

    async fn publish(hub: &Hub, room: &str, from: &str, cid: Option<&str>) -> Published {
        let (tx, rx) = oneshot::channel();
        let name = RoomName::parse(room).expect("name");
        hub.publish_async(
            &name,
            &Arc::from(from),
            Body::from("x").into(),
            cid.map(String::from),
            false,
            Reply::Chan(tx),
        )
        .await;
        rx.await.expect("reply").expect("published")
    }

    async fn join(hub: &Hub, c: &ConnHandle, room: &str) -> Arc<Room> {
        let name = RoomName::parse(room).expect("name");
        let r = hub.ensure_room(&name).await.expect("room");
        assert!(matches!(
            hub.attach(c, &r, None, None),
            Ok(Attach::Joined(_))
        ));
        r
    }

    #[tokio::test]
    async fn seq_presence_eviction_and_reload() {
        let f = fixture(NamespaceTable::default());
        let hub = &f.hub;
        let (a, mut ra) = conn("alice", &f.m);
        let (b, mut rb) = conn("bob", &f.m);
        let room = join(hub, &a, "lobby").await;
        join(hub, &b, "lobby").await;
        assert!(matches!(
            &drain(&mut ra)[..],
            [
                ServerFrame::Joined { .. },
                ServerFrame::Presence { online: true, .. }
            ]
        ));
        let p1 = publish(hub, "lobby", "alice", None).await;
        let p2 = publish(hub, "lobby", "bob", None).await;
        assert_eq!((p1.seq, p2.seq, p2.recipients), (1, 2, 2));
        assert_eq!(seqs(&drain(&mut rb)), vec![1, 2]);
        hub.leave(&b, &room);
        assert!(matches!(
            drain(&mut ra).last(),
            Some(ServerFrame::Presence { online: false, .. })
        ));
        hub.leave(&a, &room);
        assert!(hub.room("lobby").is_none(), "idle room is evicted");
        // Its seq comes back from the store.
        let r2 = join(hub, &a, "lobby").await;
        assert_eq!(hub.committed(&r2), 2);
        assert_eq!(publish(hub, "lobby", "alice", None).await.seq, 3);
    }

    #[tokio::test]
    async fn idempotent_retry_acks_original_seq() {
        let f = fixture(NamespaceTable::default());
        let (a, mut ra) = conn("alice", &f.m);
        join(&f.hub, &a, "r").await;
        let p1 = publish(&f.hub, "r", "alice", Some("c1")).await;
        let p2 = publish(&f.hub, "r", "alice", Some("c1")).await;
        let p3 = publish(&f.hub, "r", "bob", Some("c1")).await;
        assert_eq!((p1.seq, p2.seq, p3.seq), (1, 1, 2));
        assert_eq!(p2.recipients, 0);
        assert_eq!(
            seqs(&drain(&mut ra)),
            vec![1, 2],
            "the retry is not delivered"
        );
    }

    #[tokio::test]
    async fn non_persistent_namespace_delivers_inline() {
        let cfg = crate::Config::parse_from_for_tests(&["--namespace", "tick:persist=off"]);
        let f = fixture(cfg.rooms.namespace_table());
        let (a, mut ra) = conn("alice", &f.m);
        join(&f.hub, &a, "tick:x").await;
        let p = publish(&f.hub, "tick:x", "alice", None).await;
        assert_eq!((p.seq, p.recipients), (1, 1));
        assert_eq!(seqs(&drain(&mut ra)), vec![1]);
    }

    #[tokio::test]
    async fn dm_privacy() {
        let f = fixture(NamespaceTable::default());
        let hub = &f.hub;
        let (a, mut ra) = conn("alice", &f.m);
        let (b, mut rb) = conn("bob", &f.m);
        let (c, mut rc) = conn("carol", &f.m);
        for x in [&a, &b, &c] {
            hub.register(x);
        }
        let p = publish(hub, "dm:alice:bob", "alice", None).await;
        assert_eq!(&*p.room, "dm:alice:bob");
        assert_eq!(p.recipients, 2);
        assert_eq!(drain(&mut ra).len(), 1);
        assert_eq!(drain(&mut rb).len(), 1);
        assert!(drain(&mut rc).is_empty());
        assert_eq!(
            hub.check_access("dm:alice:bob", "carol")
                .err()
                .map(|e| e.code),
            Some(ErrorCode::Forbidden)
        );
        assert!(hub.check_access("dm:alice:bob", "bob").is_ok());
    }

    /// Two nodes on one in-process bus, each with one member.
    fn cluster(
        core: &Arc<crate::bus::memory::MemoryCore>,
        queue: usize,
    ) -> (Fixture, Arc<dyn Bus>) {
        let m = Arc::new(Metrics::new("t"));
        let (inbound, rx) = crate::bus::InboundQueue::new(queue, m.clone());
        let bus: Arc<dyn Bus> = Arc::new(core.node(inbound));
        let link = ClusterLink {
            bus: bus.clone(),
            node: "test-node".into(),
            shared_store: false,
        };
        let f = fixture_with(NamespaceTable::default(), m, Some(link));
        f.hub.start_cluster(
            rx,
            Arc::new(|_: &str, _: &str, _: Option<u64>| {}),
            Duration::from_secs(3600),
            f.stop.clone(),
        );
        (f, bus)
    }

    async fn recv_seqs(rx: &mut Inbox, n: usize) -> Vec<u64> {
        let mut out = vec![];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(b)) => {
                    if let Ok(ServerFrame::Msg { seq, .. }) = Encoding::Json.decode_server(&b[2..])
                    {
                        out.push(seq);
                    }
                }
                _ => break,
            }
        }
        out
    }

    #[tokio::test]
    async fn cluster_nodes_deliver_one_order() {
        let core = crate::bus::memory::MemoryCore::new(1000);
        let (na, _) = cluster(&core, 1024);
        let (nb, _) = cluster(&core, 1024);
        let (a, mut ra) = conn("alice", &na.m);
        let (b, mut rb) = conn("bob", &nb.m);
        join(&na.hub, &a, "lobby").await;
        join(&nb.hub, &b, "lobby").await;
        for i in 0..20 {
            let hub = if i % 2 == 0 { &na.hub } else { &nb.hub };
            let p = publish(hub, "lobby", "alice", None).await;
            assert_eq!(p.seq, i + 1);
        }
        let want: Vec<u64> = (1..=20).collect();
        assert_eq!(recv_seqs(&mut ra, 20).await, want);
        assert_eq!(recv_seqs(&mut rb, 20).await, want);
        // A retried cid is answered with the original seq, not repeated.
        let p1 = publish(&na.hub, "lobby", "alice", Some("c")).await;
        let p2 = publish(&nb.hub, "lobby", "alice", Some("c")).await;
        assert_eq!((p1.seq, p2.seq), (21, 21));
        assert_eq!(recv_seqs(&mut rb, 2).await, vec![21]);
    }

    #[tokio::test]
    async fn cluster_outage_fails_publishes_and_dropped_payloads_are_recovered() {
        let core = crate::bus::memory::MemoryCore::new(1000);
        let (na, _) = cluster(&core, 1024);
        // Node B's inbound queue holds 1 payload: most are dropped and
        // must come back from the hot history, in order.
        let (nb, bus_b) = cluster(&core, 1);
        let (b, mut rb) = conn("bob", &nb.m);
        join(&nb.hub, &b, "lobby").await;
        for _ in 0..50 {
            publish(&na.hub, "lobby", "alice", None).await;
        }
        assert_eq!(recv_seqs(&mut rb, 50).await, (1..=50).collect::<Vec<_>>());
        assert!(nb.m.bus_inbound_dropped.get() > 0, "the queue overflowed");
        core.set_up(false);
        assert!(!bus_b.healthy());
        let (tx, rx) = oneshot::channel();
        let name = RoomName::parse("lobby").expect("name");
        na.hub
            .publish_async(
                &name,
                &Arc::from("alice"),
                Body::from("x").into(),
                None,
                false,
                Reply::Chan(tx),
            )
            .await;
        assert_eq!(
            rx.await.expect("reply").err().map(|e| e.code),
            Some(ErrorCode::Unavailable)
        );
        core.set_up(true);
        assert_eq!(publish(&na.hub, "lobby", "alice", None).await.seq, 51);
        assert_eq!(recv_seqs(&mut rb, 1).await, vec![51]);
    }

    #[tokio::test]
    async fn cluster_gap_beyond_hot_history_is_announced() {
        let core = crate::bus::memory::MemoryCore::new(5);
        let (na, _) = cluster(&core, 1024);
        let (nb, bus_b) = cluster(&core, 1024);
        let (b, mut rb) = conn("bob", &nb.m);
        let room = join(&nb.hub, &b, "lobby").await;
        drain(&mut rb);
        // Node B misses 1..=10 (as if its subscription was down); after
        // the 11th only 7..=11 are still kept.
        bus_b.unsubscribe("lobby");
        for _ in 0..10 {
            publish(&na.hub, "lobby", "alice", None).await;
        }
        bus_b.subscribe("lobby").await.expect("subscribe");
        publish(&na.hub, "lobby", "alice", None).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut got = vec![];
        while got.len() < 6 {
            let Ok(Some(bytes)) = tokio::time::timeout_at(deadline, rb.recv()).await else {
                break;
            };
            got.push(Encoding::Json.decode_server(&bytes[2..]).expect("frame"));
        }
        assert!(
            matches!(&got[0], ServerFrame::Gap { from: 1, to: 6, .. }),
            "{got:?}"
        );
        assert_eq!(seqs(&got), (7..=11).collect::<Vec<_>>());
        assert_eq!(nb.hub.committed(&room), 11);
    }
}
