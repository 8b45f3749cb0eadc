//! An in-process bus: several hubs in one process share one
//! [`MemoryCore`]. It behaves like the Redis bus (atomic sequencing,
//! capped hot history, idempotency keys, per-room subscriptions), so the
//! hub's cluster paths are tested without a Redis server, and it can be
//! switched off and on to play an outage.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use parking_lot::Mutex;
use shoal_proto::{bus::BusRecord, ServerFrame, StoredMsg};

use super::{Bus, BusError, Inbound, InboundQueue, Sequenced};
use crate::store::{Replay, ReplayEntry};

#[derive(Default)]
struct RoomLog {
    seq: u64,
    log: VecDeque<(u64, BusRecord)>,
    cids: HashMap<String, (u64, u64)>,
}

#[derive(Default)]
struct CoreState {
    revoked: Vec<(String, String, u64)>,
    users: std::collections::HashSet<String>,
    /// room -> user -> nodes
    presence: HashMap<String, HashMap<String, std::collections::HashSet<u64>>>,
    rooms: HashMap<String, RoomLog>,
    /// room -> node -> queue
    subs: HashMap<String, HashMap<u64, InboundQueue>>,
    nodes: HashMap<u64, InboundQueue>,
    /// Announced admin addresses: node -> (url, expiry ms).
    announced: HashMap<String, (String, u64)>,
}

/// State shared by every node's [`MemoryBus`].
pub struct MemoryCore {
    state: Mutex<CoreState>,
    up: AtomicBool,
    next_node: AtomicU64,
    max_len: usize,
}

impl MemoryCore {
    /// A core whose rooms keep `max_len` messages each.
    pub fn new(max_len: usize) -> Arc<Self> {
        Arc::new(MemoryCore {
            state: Mutex::new(CoreState::default()),
            up: AtomicBool::new(true),
            next_node: AtomicU64::new(1),
            max_len: max_len.max(1),
        })
    }

    /// A bus handle for one node, delivering into `inbound`.
    pub fn node(self: &Arc<Self>, inbound: InboundQueue) -> MemoryBus {
        let id = self.next_node.fetch_add(1, Ordering::Relaxed);
        self.state.lock().nodes.insert(id, inbound);
        MemoryBus {
            core: self.clone(),
            id,
            refs: Mutex::new(HashMap::new()),
        }
    }

    /// Play an outage (`false`) or the recovery (`true`, every node is
    /// told to resync, as after a Redis reconnect).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if up {
            for q in self.state.lock().nodes.values() {
                q.push(Inbound::Resync);
            }
        }
    }

    fn check(&self) -> Result<(), BusError> {
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(BusError::Unavailable("memory bus is down".into()))
        }
    }
}

/// One node's handle on a [`MemoryCore`].
pub struct MemoryBus {
    core: Arc<MemoryCore>,
    id: u64,
    refs: Mutex<HashMap<String, usize>>,
}

fn payload(seq: u64, record: &BusRecord) -> Bytes {
    let mut b = format!("{seq}:").into_bytes();
    b.extend(shoal_proto::bus::encode_record(record));
    b.into()
}

impl CoreState {
    /// Hand `bytes` to every node subscribed to channel `ch`.
    fn fan(&self, ch: &str, bytes: &Bytes) {
        for q in self.subs.get(ch).into_iter().flat_map(|m| m.values()) {
            q.push(Inbound::Payload {
                room: ch.into(),
                bytes: bytes.clone(),
            });
        }
    }
}

#[async_trait::async_trait]
impl Bus for MemoryBus {
    async fn publish(
        &self,
        room: &str,
        record: &BusRecord,
        cid: Option<(&str, &str)>,
        floor: u64,
    ) -> Result<Sequenced, BusError> {
        self.core.check()?;
        let mut st = self.core.state.lock();
        let log = st.rooms.entry(room.to_string()).or_default();
        let key = cid.map(|(u, c)| format!("{u}\0{c}"));
        if let Some(&(seq, ts)) = key.as_ref().and_then(|k| log.cids.get(k)) {
            return Ok(Sequenced {
                seq,
                ts,
                duplicate: true,
            });
        }
        let seq = log.seq.max(floor) + 1;
        log.seq = seq;
        log.log.push_back((seq, record.clone()));
        if log.log.len() > self.core.max_len {
            log.log.pop_front();
        }
        if let Some(k) = key {
            log.cids.insert(k, (seq, record.ts));
        }
        let bytes = payload(seq, record);
        st.fan(room, &bytes);
        if let Some(parties) = super::dm_channels(room) {
            let mut direct = format!("{}{room} ", shoal_proto::bus::DIRECT_PREFIX).into_bytes();
            direct.extend_from_slice(&bytes);
            let direct = Bytes::from(direct);
            for ch in parties {
                st.fan(&ch, &direct);
            }
        }
        Ok(Sequenced {
            seq,
            ts: record.ts,
            duplicate: false,
        })
    }

    async fn ephemeral(&self, room: &str, frame: &ServerFrame) -> Result<(), BusError> {
        self.core.check()?;
        let bytes: Bytes = shoal_proto::bus::encode_ephemeral(frame).into();
        self.core.state.lock().fan(room, &bytes);
        Ok(())
    }

    async fn relay(&self, room: &str, frame: &ServerFrame, origin: &str) -> Result<(), BusError> {
        self.core.check()?;
        let bytes: Bytes = shoal_proto::bus::encode_relayed(origin, frame).into();
        let st = self.core.state.lock();
        match super::dm_channels(room) {
            Some(parties) => parties.iter().for_each(|ch| st.fan(ch, &bytes)),
            None => st.fan(room, &bytes),
        }
        Ok(())
    }

    async fn subscribe(&self, room: &str) -> Result<u64, BusError> {
        self.core.check()?;
        *self.refs.lock().entry(room.to_string()).or_insert(0) += 1;
        let mut st = self.core.state.lock();
        if let Some(q) = st.nodes.get(&self.id).cloned() {
            st.subs
                .entry(room.to_string())
                .or_default()
                .insert(self.id, q);
        }
        Ok(st.rooms.get(room).map_or(0, |r| r.seq))
    }

    fn unsubscribe(&self, room: &str) {
        let mut refs = self.refs.lock();
        let Some(n) = refs.get_mut(room) else { return };
        *n -= 1;
        if *n == 0 {
            refs.remove(room);
            let mut st = self.core.state.lock();
            if let Some(m) = st.subs.get_mut(room) {
                m.remove(&self.id);
                if m.is_empty() {
                    st.subs.remove(room);
                }
            }
        }
    }

    fn subscribe_user(&self, user: &str) {
        let ch = super::user_channel(user);
        *self.refs.lock().entry(ch.clone()).or_insert(0) += 1;
        let mut st = self.core.state.lock();
        if let Some(q) = st.nodes.get(&self.id).cloned() {
            st.subs.entry(ch).or_default().insert(self.id, q);
        }
    }

    fn unsubscribe_user(&self, user: &str) {
        self.unsubscribe(&super::user_channel(user));
    }

    async fn revoke(&self, user: &str, jti: &str, exp: u64) -> Result<(), BusError> {
        self.core.check()?;
        let mut st = self.core.state.lock();
        st.revoked.push((user.into(), jti.into(), exp));
        let bytes = Bytes::from(shoal_proto::bus::encode_revoke(user, jti, exp));
        for q in st.nodes.values() {
            q.push(Inbound::Payload {
                room: super::GLOBAL_CHANNEL.into(),
                bytes: bytes.clone(),
            });
        }
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<(String, String, u64)>, BusError> {
        self.core.check()?;
        let now = crate::clock::now_secs();
        let st = self.core.state.lock();
        Ok(st
            .revoked
            .iter()
            .filter(|r| r.2 > now)
            .map(|r| (r.0.clone(), r.1.clone(), r.2))
            .collect())
    }

    fn presence(&self, op: super::presence::PresenceOp) {
        use super::presence::PresenceOp;
        let (room, user, join) = match &op {
            PresenceOp::Join { room, user } => (room, user, true),
            PresenceOp::Leave { room, user } => (room, user, false),
        };
        let mut st = self.core.state.lock();
        let users = st.presence.entry(room.to_string()).or_default();
        let nodes = users.entry(user.to_string()).or_default();
        let changed = if join {
            nodes.insert(self.id) && nodes.len() == 1
        } else {
            nodes.remove(&self.id) && nodes.is_empty()
        };
        if nodes.is_empty() {
            users.remove(&**user);
        }
        if changed {
            let f = ServerFrame::Presence {
                room: room.to_string(),
                user: user.to_string(),
                online: join,
            };
            st.fan(room, &Bytes::from(shoal_proto::bus::encode_ephemeral(&f)));
        }
    }

    async fn remember_users(&self, names: &[String]) -> Result<(), BusError> {
        self.core.check()?;
        self.core.state.lock().users.extend(names.iter().cloned());
        Ok(())
    }

    async fn user_known(&self, user: &str) -> Result<bool, BusError> {
        self.core.check()?;
        Ok(self.core.state.lock().users.contains(user))
    }

    async fn announce(
        &self,
        node: &str,
        url: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BusError> {
        self.core.check()?;
        let expiry = crate::clock::now_ms() + ttl.as_millis() as u64;
        self.core
            .state
            .lock()
            .announced
            .insert(node.to_string(), (url.to_string(), expiry));
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<(String, String)>, BusError> {
        self.core.check()?;
        let now = crate::clock::now_ms();
        let mut st = self.core.state.lock();
        st.announced.retain(|_, (_, exp)| *exp > now);
        let mut v: Vec<_> = st
            .announced
            .iter()
            .map(|(n, (u, _))| (n.clone(), u.clone()))
            .collect();
        v.sort();
        Ok(v)
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, BusError> {
        self.core.check()?;
        let st = self.core.state.lock();
        let mut v: Vec<String> = st
            .presence
            .get(room)
            .map(|u| u.keys().cloned().collect())
            .unwrap_or_default();
        v.sort_unstable();
        Ok(v)
    }

    async fn head(&self, room: &str) -> Result<u64, BusError> {
        self.core.check()?;
        Ok(self.core.state.lock().rooms.get(room).map_or(0, |r| r.seq))
    }

    async fn replay(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Replay, BusError> {
        self.core.check()?;
        let st = self.core.state.lock();
        let Some(log) = st.rooms.get(room) else {
            return Ok(Replay::default());
        };
        let floor = log.log.front().map_or(log.seq, |(s, _)| s - 1);
        let entries = log
            .log
            .iter()
            .filter(|(s, _)| *s > after && *s <= upto)
            .take(limit)
            .map(|(seq, r)| ReplayEntry {
                msg: StoredMsg::new(*seq, r.from.clone(), r.ts, r.body.clone()),
                deleted: false,
                meta: r.meta.clone(),
            })
            .collect();
        Ok(Replay { floor, entries })
    }

    fn healthy(&self) -> bool {
        self.core.up.load(Ordering::SeqCst)
    }
}
