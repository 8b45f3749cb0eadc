//! The Redis bus (`--bus redis`).
//!
//! The key layout is in `keys` (one place); in short, keys of a room share
//! the hash tag `{room}`, so a Redis Cluster keeps
//! them (and the room's sharded channel) on one shard and spreads rooms
//! over shards:
//! - `shoal:{room}:seq`: the last assigned seq;
//! - `shoal:{room}:log`: the hot history, a stream capped near
//!   `--redis-stream-len` entries, entry id `<seq>-0`, field `r` = record;
//! - `shoal:{room}:cid:<user>\0<cid>`: `<seq>:<ts>` of a publish with a
//!   client message id, expiring after the idempotency window;
//! - channel `shoal:{room}`: sharded pub/sub (SPUBLISH/SSUBSCRIBE);
//! - channel `shoal:{@user}`: direct messages to a user (`@` cannot occur
//!   in room names), published by the same script in DM rooms;
//! - channel `shoal:{@}` and hash `shoal:{@}:revoked` (jti -> `exp user`):
//!   cluster-wide token revocations;
//! - set `shoal:{@}:users`: user names the cluster knows (direct messages
//!   to other names are refused).
//!
//! One Lua script per publish does the idempotency check, appends to the
//! stream, advances the counter and publishes, so a message is either
//! sequenced, kept and published, or none of these. Its first write is the
//! XADD, so an out-of-memory refusal happens before anything changed.
//!
//! On a Redis Cluster (`redis+cluster://`, see `redis_conn`) a script may
//! only touch the slot of its room, so three steps that live in other
//! slots leave it: the per-user rate counter is taken first (its own
//! slot; nothing is sequenced when it refuses), and the archive note
//! (`ZADD GT`) and the DM notifications to the parties' user channels go
//! out after the script, before the sender's ack. A node crash between the
//! script and those steps loses no message: the sender had no ack and
//! retries with its `cid` (a duplicate still writes the archive note), and
//! a DM party that missed the notification sees the room in its room list.
//!
//! With `--redis-wait-replicas N` (Redis with replicas) the script only
//! sequences and keeps the message; the node then runs `WAIT N` on the
//! room's primary and only once N replicas hold it announces it (a second
//! script publishes it from the stream and moves the room's announced head
//! `shoal:{room}:ann`, which is what other nodes catch up to) and acks it.
//! So a failover can neither lose an acked message nor reuse a seq that
//! anyone saw; a retry with the same `cid` announces again, which delivers
//! a message whose announcement a crash cut short (receivers ignore
//! repeats by seq).
//!
//! On a Redis Cluster, health is per shard: a node that reaches any
//! primary is healthy, a room on an unreachable shard gets 503 and its
//! subscription is retried until the shard (or its promoted replica)
//! answers, then caught up from the hot history. A node's subscription
//! link dropping makes the node subscribe every room again (each
//! SSUBSCRIBE goes to the room's current owner) and resync.
//!
//! Commands go over `--redis-connections` multiplexed connections
//! (`ConnectionManager`: reconnects itself; one cluster connection, which
//! holds one per shard); concurrent publishes from all WebSocket
//! connections share them and are written in batches (redis-rs flushes
//! whatever is queued in one write). Subscriptions use one more RESP3
//! connection owned by a supervisor task, which takes reference counts,
//! reconnects with backoff, re-subscribes every room and then asks the
//! pump to resync (see `bus`).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use redis::{PushKind, Value};
use shoal_proto::{bus::BusRecord, ServerFrame, StoredMsg};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::{
    keys::{self, announced_key, channel, channel_room, log_key, seq_key, REVOKED_KEY, USERS_KEY},
    redis_conn::{Conn, Reach, SubConn},
    Bus, BusError, Inbound, InboundQueue, Sequenced,
};
use crate::{
    config::{ClusterOpts, RedisTarget},
    metrics::Metrics,
    store::{Replay, ReplayEntry},
};

/// Settings of the Redis bus (from `Config`).
#[derive(Clone)]
pub struct RedisSettings {
    /// The cluster group of the configuration: URL, connections, stream
    /// length, timeouts, presence lease, the cluster-wide user rate and
    /// `WAIT` replicas.
    pub opts: ClusterOpts,
    /// Idempotency window of client message ids.
    pub cid_window: Duration,
    /// This node's id (presence leases).
    pub node: String,
    /// Rooms whose messages go to the shared store (`archive`); None: no
    /// shared store.
    pub archive: Option<ArchivePredicate>,
}

/// Whether a room's messages are archived to the shared store.
pub type ArchivePredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Announce a kept message (after `WAIT`): publish it from the hot stream
/// and move the announced head. Idempotent: a repeat (a retried publish)
/// publishes again, which receivers ignore by seq.
const ANNOUNCE_LUA: &str = r#"
-- KEYS: 1 hot stream, 2 announced head. ARGV: 1 seq, 2 channel,
--       3 direct-message prefix ('' for a room), 4.. the parties' user channels
local e = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', ARGV[1] .. '-0')
if #e == 0 then return false end
local rec = e[1][2][2]
local msg = ARGV[1] .. ':' .. rec
redis.call('SPUBLISH', ARGV[2], msg)
for i = 4, #ARGV do redis.call('SPUBLISH', ARGV[i], ARGV[3] .. msg) end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[1])
end
return rec
"#;

const PUBLISH_LUA: &str = r#"
-- KEYS: 1 seq counter, 2 hot stream, 3 cid key (the counter again if none),
--       4 rooms waiting for the archiver, 5 the sender's rate counter for
--       this second
-- ARGV 10: publishes per second per user (0: no limit)
-- ARGV: 1 record, 2 channel, 3 stream cap, 4 ts, 5 cid window ms (0: none), 6 floor,
--       7 archive ('1': note the room for the archiver), 8 direct-message
--       prefix ('' for a room), 9 hold ('1': sequence and keep only; the
--       caller waits for replicas, then runs ANNOUNCE), 11.. the parties'
--       user channels
local win = tonumber(ARGV[5])
if win > 0 then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local sep = string.find(prev, ':', 1, true)
    return {tonumber(string.sub(prev, 1, sep - 1)), tonumber(string.sub(prev, sep + 1)), 1}
  end
end
local limit = tonumber(ARGV[10])
if limit > 0 then
  local n = redis.call('INCR', KEYS[5])
  if n == 1 then redis.call('EXPIRE', KEYS[5], 2) end
  if n > limit then return {0, 0, 2} end
end
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[6])
if seq < floor then seq = floor end
seq = seq + 1
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'r', ARGV[1])
redis.call('SET', KEYS[1], seq)
if win > 0 then redis.call('SET', KEYS[3], seq .. ':' .. ARGV[4], 'PX', win) end
if ARGV[7] == '1' then redis.call('ZADD', KEYS[4], seq, KEYS[2]) end
if ARGV[9] == '1' then return {seq, tonumber(ARGV[4]), 0} end
local msg = seq .. ':' .. ARGV[1]
redis.call('SPUBLISH', ARGV[2], msg)
for i = 11, #ARGV do redis.call('SPUBLISH', ARGV[i], ARGV[8] .. msg) end
return {seq, tonumber(ARGV[4]), 0}
"#;

enum SubCmd {
    Sub(Arc<str>, oneshot::Sender<Result<(), BusError>>),
    Unsub(Arc<str>),
}

/// The Redis bus. See the module docs.
pub struct RedisBus {
    cmds: Vec<Conn>,
    cluster: bool,
    next: AtomicUsize,
    inflight: Arc<AtomicUsize>,
    script: redis::Script,
    announce: redis::Script,
    sub: mpsc::UnboundedSender<SubCmd>,
    presence: mpsc::UnboundedSender<super::presence::PresenceOp>,
    sub_up: Arc<AtomicBool>,
    cmd_ok: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    settings: RedisSettings,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RedisBus {
    /// Set up connections (lazily: a Redis that is down at start makes the
    /// node unhealthy, not fail) and start the supervisor and health
    /// tasks. Fails only on a bad URL.
    pub fn start(
        settings: RedisSettings,
        metrics: Arc<Metrics>,
        inbound: InboundQueue,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let target = settings
            .opts
            .redis_url
            .clone()
            .ok_or_else(|| BusError::Protocol("--bus redis needs --redis-url".into()))?;
        let timeout = settings.opts.redis_timeout;
        let cmds = super::redis_conn::commands(&target, settings.opts.redis_connections, timeout)
            .map_err(|e| BusError::Protocol(format!("redis: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, prx) = mpsc::unbounded_channel();
        tokio::spawn(
            super::presence::Worker {
                conn: cmds[0].clone(),
                node: super::presence::holder_name(&settings.node),
                lease: settings.opts.presence_lease,
                metrics: metrics.clone(),
            }
            .run(prx, stop.clone()),
        );
        let bus = Arc::new(RedisBus {
            presence: ptx,
            cmds,
            cluster: matches!(target, RedisTarget::Cluster(_)),
            next: AtomicUsize::new(0),
            inflight: Arc::new(AtomicUsize::new(0)),
            script: redis::Script::new(PUBLISH_LUA),
            announce: redis::Script::new(ANNOUNCE_LUA),
            sub: tx,
            sub_up: Arc::new(AtomicBool::new(false)),
            cmd_ok: Arc::new(AtomicBool::new(false)),
            metrics: metrics.clone(),
            settings: settings.clone(),
        });
        metrics.bus_up.set(0);
        tokio::spawn(
            Supervisor {
                target,
                timeout,
                inbound,
                up: bus.sub_up.clone(),
                metrics,
                // Every node hears cluster-wide announcements.
                rooms: HashMap::from([(Arc::from(super::GLOBAL_CHANNEL), 1)]),
                pending: Default::default(),
                settle_until: None,
            }
            .run(rx, stop.clone()),
        );
        tokio::spawn(health(bus.clone(), stop));
        Ok(bus)
    }

    /// A command connection (shared, pipelined) for other cluster tasks.
    pub fn command_connection(&self) -> Conn {
        self.conn()
    }

    fn conn(&self) -> Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.cmds.len();
        self.cmds[i].clone()
    }

    /// Run one command, with the metrics every command gets.
    async fn run<T: redis::FromRedisValue>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BusError> {
        let depth = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.redis_pipeline_depth.observe(depth as f64);
        let started = Instant::now();
        // redis-rs bounds each attempt, but a request caught in a cluster
        // topology refresh can wait for good: every command has a deadline
        // of its own (its attempts and their backoff fit inside it).
        let r = tokio::time::timeout(self.settings.opts.redis_timeout * 3, f)
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "command deadline passed",
                )))
            });
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .redis_command_seconds
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                self.metrics.redis_errors.inc();
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    // One Redis failing is the bus failing. On a cluster it
                    // may be one shard: the health loop decides whether
                    // any shard still answers.
                    if !self.cluster {
                        self.cmd_ok.store(false, Ordering::Release);
                        self.update_up();
                    }
                    Err(unavailable(e))
                } else {
                    Err(BusError::Protocol(e.to_string()))
                }
            }
        }
    }

    /// Count a publish against the sender's cluster-wide rate (a cluster's
    /// separate step; on one Redis the publish script does it).
    async fn take_rate(&self, key: &str) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(key)
            .cmd("EXPIRE")
            .arg(key)
            .arg(2)
            .arg("NX")
            .ignore();
        let mut c = self.conn();
        let (n,): (u64,) = self.run(pipe.query_async(&mut c)).await?;
        if n > self.settings.opts.user_publish_rate {
            return Err(BusError::RateLimited);
        }
        Ok(())
    }

    /// Run independent commands concurrently (pipelined on the shared
    /// connections, routed per slot on a cluster); the first error wins.
    async fn each(&self, cmds: Vec<redis::Cmd>) -> Result<(), BusError> {
        let runs = cmds.into_iter().map(|cmd| async move {
            let mut c = self.conn();
            let _: Value = self.run(cmd.query_async(&mut c)).await?;
            Ok::<_, BusError>(())
        });
        futures_util::future::try_join_all(runs).await.map(|_| ())
    }

    fn update_up(&self) {
        self.metrics.bus_up.set(i64::from(self.healthy()));
    }
}

/// Ping the command connections every 500 ms: health is "the last ping
/// and the subscription connection are fine". On a Redis Cluster a node is
/// healthy while it reaches *any* primary: rooms on an unreachable shard
/// get `error 503` (their commands fail) while the others carry on, and
/// only a node that reaches no shard sends its clients elsewhere
/// (`shoal_bus_degraded` is 1 while some shards are out of reach).
async fn health(bus: Arc<RedisBus>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let mut worst = Reach::All;
        for c in &bus.cmds {
            let mut c = c.clone();
            let r = tokio::time::timeout(bus.settings.opts.redis_timeout, c.reach())
                .await
                .unwrap_or(Reach::None);
            worst = match (worst, r) {
                (Reach::None, _) | (_, Reach::None) => Reach::None,
                (Reach::Some, _) | (_, Reach::Some) => Reach::Some,
                _ => Reach::All,
            };
        }
        bus.cmd_ok.store(worst != Reach::None, Ordering::Release);
        bus.metrics
            .bus_degraded
            .set(i64::from(worst == Reach::Some));
        bus.update_up();
    }
}

#[async_trait::async_trait]
impl Bus for RedisBus {
    async fn publish(
        &self,
        room: &str,
        record: &BusRecord,
        cid: Option<(&str, &str)>,
        floor: u64,
    ) -> Result<Sequenced, BusError> {
        let bytes = shoal_proto::bus::encode_record(record);
        let cid_key = match cid {
            Some((u, c)) => keys::cid_key(room, u, c),
            None => seq_key(room),
        };
        let window = if cid.is_some() {
            self.settings.cid_window.as_millis().max(1) as u64
        } else {
            0
        };
        let archive = self.settings.archive.as_ref().is_some_and(|a| a(room));
        let rate_key = keys::rate_key(&record.from, crate::clock::now_secs());
        let parties = super::dm_channels(room);
        let prefix = parties.as_ref().map_or(String::new(), |_| {
            format!("{}{room} ", shoal_proto::bus::DIRECT_PREFIX)
        });
        // On one Redis the script does every step. On a cluster it may
        // touch only the room's slot: the steps in other slots run around
        // it (module docs), and it gets the seq key in place of theirs.
        let whole = !self.cluster;
        let own_slot = |key: String| if whole { key } else { seq_key(room) };
        let hold = self.settings.opts.redis_wait_replicas > 0;
        if !whole && self.settings.opts.user_publish_rate > 0 {
            self.take_rate(&rate_key).await?;
        }
        let mut inv = self.script.prepare_invoke();
        inv.key(seq_key(room))
            .key(log_key(room))
            .key(cid_key)
            .key(own_slot(keys::ARCHIVE_KEY.to_string()))
            .key(own_slot(rate_key))
            .arg(&bytes)
            .arg(channel(room))
            .arg(self.settings.opts.redis_stream_len)
            .arg(record.ts)
            .arg(window)
            .arg(floor)
            .arg(if archive && whole { "1" } else { "0" })
            .arg(&prefix)
            .arg(if hold { "1" } else { "" })
            .arg(if whole {
                self.settings.opts.user_publish_rate
            } else {
                0
            });
        if whole {
            for ch in parties.iter().flatten() {
                inv.arg(channel(ch));
            }
        }
        let mut c = self.conn();
        let (seq, ts, dup): (u64, u64, u8) = self.run(inv.invoke_async(&mut c)).await?;
        if dup == 2 {
            return Err(BusError::RateLimited);
        }
        if hold {
            // Delivered and acked only once replicas hold it, so a failover
            // can neither lose an acked message nor reuse a seq someone
            // saw. A retry (duplicate) announces again: after a crash
            // between keeping and announcing, that is what delivers it.
            let acks = self
                .run(c.wait_replicas(
                    &seq_key(room),
                    self.settings.opts.redis_wait_replicas,
                    // Inside the command timeout, so a shortfall is an
                    // answer (0 replicas) rather than a lost connection.
                    self.settings.opts.redis_timeout / 2,
                ))
                .await?;
            if acks < self.settings.opts.redis_wait_replicas {
                self.metrics.redis_errors.inc();
                return Err(unavailable(format!(
                    "seq {seq} held by {acks} of {} replicas in time; retry with the cid",
                    self.settings.opts.redis_wait_replicas
                )));
            }
            let mut inv = self.announce.prepare_invoke();
            inv.key(log_key(room))
                .key(announced_key(room))
                .arg(seq)
                .arg(channel(room))
                .arg(&prefix);
            if whole {
                for ch in parties.iter().flatten() {
                    inv.arg(channel(ch));
                }
            }
            let rec: Option<Vec<u8>> = self.run(inv.invoke_async(&mut c)).await?;
            if !whole {
                if let Some(rec) = rec {
                    let msg = [prefix.as_bytes(), format!("{seq}:").as_bytes(), &rec].concat();
                    let steps = parties
                        .iter()
                        .flatten()
                        .map(|ch| redis::cmd("SPUBLISH").arg(channel(ch)).arg(&msg).to_owned())
                        .collect();
                    self.each(steps).await?;
                }
            }
        }
        if !whole {
            let mut steps = vec![];
            if archive {
                steps.push(
                    redis::cmd("ZADD")
                        .arg(keys::ARCHIVE_KEY)
                        .arg("GT")
                        .arg(seq)
                        .arg(log_key(room))
                        .to_owned(),
                );
            }
            if dup == 0 && !hold {
                let msg = [prefix.as_bytes(), format!("{seq}:").as_bytes(), &bytes].concat();
                for ch in parties.iter().flatten() {
                    steps.push(redis::cmd("SPUBLISH").arg(channel(ch)).arg(&msg).to_owned());
                }
            }
            self.each(steps).await?;
        }
        Ok(Sequenced {
            seq,
            ts,
            duplicate: dup == 1,
        })
    }

    async fn ephemeral(&self, room: &str, frame: &ServerFrame) -> Result<(), BusError> {
        let mut c = self.conn();
        let cmd = redis::cmd("SPUBLISH")
            .arg(channel(room))
            .arg(shoal_proto::bus::encode_ephemeral(frame))
            .to_owned();
        let _: i64 = self.run(cmd.query_async(&mut c)).await?;
        Ok(())
    }

    async fn relay(&self, room: &str, frame: &ServerFrame, origin: &str) -> Result<(), BusError> {
        let bytes = shoal_proto::bus::encode_relayed(origin, frame);
        let targets = super::dm_channels(room).map_or_else(|| vec![room.to_string()], Vec::from);
        // One command per channel: on a cluster they live in different slots.
        self.each(
            targets
                .iter()
                .map(|t| {
                    redis::cmd("SPUBLISH")
                        .arg(channel(t))
                        .arg(&bytes)
                        .to_owned()
                })
                .collect(),
        )
        .await
    }

    async fn subscribe(&self, room: &str) -> Result<u64, BusError> {
        let (tx, rx) = oneshot::channel();
        self.sub
            .send(SubCmd::Sub(room.into(), tx))
            .map_err(|_| unavailable("shutting down"))?;
        rx.await.map_err(|_| unavailable("shutting down"))??;
        match self.head(room).await {
            Ok(h) => Ok(h),
            Err(e) => {
                self.unsubscribe(room);
                Err(e)
            }
        }
    }

    fn unsubscribe(&self, room: &str) {
        let _ = self.sub.send(SubCmd::Unsub(room.into()));
    }

    fn subscribe_user(&self, user: &str) {
        // The reply is not awaited: a DM that arrives before the
        // subscription is in place is fetched by the client (room list).
        let (tx, _) = oneshot::channel();
        let _ = self
            .sub
            .send(SubCmd::Sub(super::user_channel(user).into(), tx));
    }

    fn unsubscribe_user(&self, user: &str) {
        self.unsubscribe(&super::user_channel(user));
    }

    async fn revoke(&self, user: &str, jti: &str, exp: u64) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(REVOKED_KEY)
            .arg(jti)
            .arg(format!("{exp} {user}"))
            .ignore()
            .cmd("SPUBLISH")
            .arg(channel(super::GLOBAL_CHANNEL))
            .arg(shoal_proto::bus::encode_revoke(user, jti, exp))
            .ignore();
        let mut c = self.conn();
        let () = self.run(pipe.query_async(&mut c)).await?;
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<(String, String, u64)>, BusError> {
        let mut c = self.conn();
        let cmd = redis::cmd("HGETALL").arg(REVOKED_KEY).to_owned();
        let all: HashMap<String, String> = self.run(cmd.query_async(&mut c)).await?;
        let now = crate::clock::now_secs();
        let mut out = vec![];
        let mut expired = vec![];
        for (jti, v) in all {
            let (exp, user) = v.split_once(' ').unwrap_or(("0", ""));
            let exp = exp.parse::<u64>().unwrap_or(0);
            if exp > now {
                out.push((user.to_string(), jti, exp));
            } else {
                expired.push(jti);
            }
        }
        if !expired.is_empty() {
            let cmd = redis::cmd("HDEL").arg(REVOKED_KEY).arg(&expired).to_owned();
            let _: Result<i64, _> = self.run(cmd.query_async(&mut c)).await;
        }
        Ok(out)
    }

    fn presence(&self, op: super::presence::PresenceOp) {
        let _ = self.presence.send(op);
    }

    async fn remember_users(&self, names: &[String]) -> Result<(), BusError> {
        if names.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let cmd = redis::cmd("SADD").arg(USERS_KEY).arg(names).to_owned();
        let _: i64 = self.run(cmd.query_async(&mut c)).await?;
        Ok(())
    }

    async fn user_known(&self, user: &str) -> Result<bool, BusError> {
        let mut c = self.conn();
        let cmd = redis::cmd("SISMEMBER").arg(USERS_KEY).arg(user).to_owned();
        self.run(cmd.query_async(&mut c)).await
    }

    async fn announce(
        &self,
        node: &str,
        url: &str,
        ttl: std::time::Duration,
    ) -> Result<(), BusError> {
        let mut c = self.conn();
        let expiry = crate::clock::now_ms() + ttl.as_millis() as u64;
        let cmd = redis::cmd("HSET")
            .arg(super::keys::NODES_KEY)
            .arg(node)
            .arg(format!("{expiry} {url}"))
            .to_owned();
        let _: i64 = self.run(cmd.query_async(&mut c)).await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<(String, String)>, BusError> {
        let mut c = self.conn();
        let cmd = redis::cmd("HGETALL").arg(super::keys::NODES_KEY).to_owned();
        let all: HashMap<String, String> = self.run(cmd.query_async(&mut c)).await?;
        let now = crate::clock::now_ms();
        let (mut live, mut gone) = (vec![], vec![]);
        for (node, v) in all {
            let (exp, url) = v.split_once(' ').unwrap_or(("0", ""));
            if exp.parse::<u64>().unwrap_or(0) > now {
                live.push((node, url.to_string()));
            } else {
                gone.push(node);
            }
        }
        if !gone.is_empty() {
            let cmd = redis::cmd("HDEL")
                .arg(super::keys::NODES_KEY)
                .arg(&gone)
                .to_owned();
            let _: Result<i64, _> = self.run(cmd.query_async(&mut c)).await;
        }
        live.sort();
        Ok(live)
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, BusError> {
        let mut c = self.conn();
        self.run(super::presence::members(&mut c, room)).await
    }

    async fn head(&self, room: &str) -> Result<u64, BusError> {
        let mut c = self.conn();
        if self.settings.opts.redis_wait_replicas > 0 {
            // Only what was announced (replicated) is the room's; a room
            // written before the setting was on has no announced head yet.
            let cmd = redis::cmd("MGET")
                .arg(announced_key(room))
                .arg(seq_key(room))
                .to_owned();
            let (ann, seq): (Option<u64>, Option<u64>) = self.run(cmd.query_async(&mut c)).await?;
            return Ok(ann.or(seq).unwrap_or(0));
        }
        let cmd = redis::cmd("GET").arg(seq_key(room)).to_owned();
        let v: Option<u64> = self.run(cmd.query_async(&mut c)).await?;
        Ok(v.unwrap_or(0))
    }

    async fn replay(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Replay, BusError> {
        if after >= upto {
            return Ok(Replay::default());
        }
        let key = log_key(room);
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XRANGE")
            .arg(&key)
            .arg(format!("{}-0", after + 1))
            .arg(format!("{upto}-0"))
            .arg("COUNT")
            .arg(limit.max(1))
            .cmd("GET")
            .arg(seq_key(room));
        type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let mut c = self.conn();
        let (first, page, head): (Entries, Entries, Option<u64>) =
            self.run(pipe.query_async(&mut c)).await?;
        let id_seq = |id: &str| id.split('-').next().and_then(|s| s.parse::<u64>().ok());
        let floor = match first.first() {
            Some((id, _)) => id_seq(id).unwrap_or(1).saturating_sub(1),
            None => head.unwrap_or(0),
        };
        let mut entries = Vec::with_capacity(page.len());
        for (id, fields) in page {
            let Some(seq) = id_seq(&id) else { continue };
            let Some((_, raw)) = fields.iter().find(|(k, _)| k == "r") else {
                continue;
            };
            match shoal_proto::bus::decode_record(raw) {
                Ok(r) => entries.push(ReplayEntry {
                    msg: StoredMsg::new(seq, r.from, r.ts, r.body),
                    deleted: false,
                    meta: r.meta,
                }),
                Err(e) => {
                    // Left out of the page: readers announce the hole as
                    // a gap (they never skip a seq in silence).
                    self.metrics.bus_undeliverable.inc();
                    tracing::error!(room, seq, error = %e, "undecodable hot-history entry; readers get a gap");
                }
            }
        }
        Ok(Replay { floor, entries })
    }

    fn healthy(&self) -> bool {
        self.cmd_ok.load(Ordering::Acquire) && self.sub_up.load(Ordering::Acquire)
    }
}

/// Owns the subscription connection and the per-room reference counts.
struct Supervisor {
    target: RedisTarget,
    timeout: Duration,
    inbound: InboundQueue,
    up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    rooms: HashMap<Arc<str>, usize>,
    /// Referenced rooms whose SSUBSCRIBE failed because their shard is out
    /// of reach (a cluster only): retried every [`PENDING_RETRY`], then
    /// resynced from the hot history.
    pending: std::collections::HashSet<Arc<str>>,
    /// After a cluster node's link dropped: until then, every room is
    /// subscribed again and caught up each [`SETTLE_EVERY`], because the
    /// slot map moves during a failover and a subscription made while it
    /// moved may sit on a node that no longer gets the room's messages.
    settle_until: Option<Instant>,
}

/// How long subscriptions are renewed after a cluster node's link drops
/// (a failover: node timeout plus election, with room to spare).
const SETTLE_FOR: Duration = Duration::from_secs(10);
/// How often, meanwhile.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// How often subscriptions to unreachable shards are retried.
const PENDING_RETRY: Duration = Duration::from_millis(250);

impl Supervisor {
    async fn connect(&self, lost: Arc<Notify>) -> redis::RedisResult<SubConn> {
        let inbound = self.inbound.clone();
        // On a cluster a disconnection is one node's: the connection stays,
        // every room is subscribed again (each SSUBSCRIBE goes to the
        // room's current owner, after a failover its promoted replica) and
        // what was published meanwhile is read back (resync). One Redis:
        // the connection is gone and is made again.
        let cluster = matches!(self.target, RedisTarget::Cluster(_));
        let sender = move |info: redis::PushInfo| -> Result<(), ()> {
            match info.kind {
                PushKind::SMessage => {
                    if let [Value::BulkString(ch), Value::BulkString(payload)] = &info.data[..] {
                        if let Some(room) = channel_room(ch) {
                            inbound.push(Inbound::Payload {
                                room: room.into(),
                                bytes: Bytes::copy_from_slice(payload),
                            });
                        }
                    }
                }
                PushKind::Disconnection => {
                    if cluster {
                        inbound.push(Inbound::Resync);
                    }
                    lost.notify_one()
                }
                // Subscription confirmations (copies of command replies).
                _ => {}
            }
            Ok(())
        };
        SubConn::connect(&self.target, self.timeout, sender).await
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SubCmd>, stop: CancellationToken) {
        // The connection and the signal of its loss, created together: a
        // dropped old connection reporting its own end must not take the
        // new one down.
        let mut conn: Option<(SubConn, Arc<Notify>)> = None;
        let mut backoff = Duration::from_millis(50);
        let mut retry_at = Instant::now();
        let mut first = true;
        loop {
            if conn.is_none() && Instant::now() >= retry_at {
                let lost = Arc::new(Notify::new());
                match self.establish(lost.clone()).await {
                    Ok(c) => {
                        conn = Some((c, lost));
                        backoff = Duration::from_millis(50);
                        self.up.store(true, Ordering::Release);
                        if !first {
                            self.metrics.redis_reconnects.inc();
                        }
                        first = false;
                        tracing::info!(rooms = self.rooms.len(), "bus subscriptions in place");
                        self.inbound.push(Inbound::Resync);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "redis subscription connection failed");
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            let settling = self.settle_until.is_some_and(|t| Instant::now() < t);
            let wait = if conn.is_none() {
                retry_at.saturating_duration_since(Instant::now())
            } else if !self.pending.is_empty() {
                PENDING_RETRY
            } else if settling {
                SETTLE_EVERY
            } else {
                Duration::from_secs(3600)
            };
            let lost = conn.as_ref().map(|(_, l)| l.clone());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = async { if let Some(l) = &lost { l.notified().await } }, if lost.is_some() => {
                    match conn.as_ref().map(|(c, _)| c.clone()) {
                        Some(c) if c.is_cluster() => {
                            tracing::warn!("a cluster node's subscription link dropped; subscribing again");
                            self.settle_until = Some(Instant::now() + SETTLE_FOR);
                            self.pending.extend(self.rooms.keys().cloned());
                            self.retry_pending(c).await;
                        }
                        _ => {
                            tracing::warn!("redis subscription connection lost");
                            conn = None;
                            self.up.store(false, Ordering::Release);
                            self.metrics.bus_up.set(0);
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    if let Some((c, _)) = conn.as_ref() {
                        if settling && self.pending.is_empty() {
                            self.pending.extend(self.rooms.keys().cloned());
                        }
                        self.retry_pending(c.clone()).await;
                    }
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    let mut c = conn.as_ref().map(|(c, _)| c.clone());
                    if !self.handle(cmd, &mut c).await {
                        conn = None;
                        self.up.store(false, Ordering::Release);
                        self.metrics.bus_up.set(0);
                    }
                }
            }
        }
    }

    /// Connect and subscribe to every referenced room. On a cluster, rooms
    /// whose shard is out of reach become pending (retried) rather than
    /// failing the connection, as long as some shard answers.
    async fn establish(&mut self, lost: Arc<Notify>) -> redis::RedisResult<SubConn> {
        let mut c = self.connect(lost).await?;
        // Pipelined: every SSUBSCRIBE is written before the first reply.
        let futs = self.rooms.keys().map(|r| {
            let mut c = c.clone();
            let r = r.clone();
            async move { (c.ssubscribe(&channel(&r)).await, r) }
        });
        self.pending.clear();
        for (res, room) in futures_util::future::join_all(futs).await {
            match res {
                Ok(()) => {}
                Err(e) if c.is_cluster() => {
                    tracing::warn!(room = %room, error = %e, "shard out of reach; subscription retried");
                    self.pending.insert(room);
                }
                Err(e) => return Err(e),
            }
        }
        c.ping().await?;
        Ok(c)
    }

    /// Retry pending subscriptions; a room that gets its subscription back
    /// is caught up from the hot history (resync).
    async fn retry_pending(&mut self, mut c: SubConn) {
        let rooms: Vec<Arc<str>> = self.pending.iter().cloned().collect();
        let mut recovered = false;
        for room in rooms {
            if !self.rooms.contains_key(&room) {
                self.pending.remove(&room);
                continue;
            }
            if c.ssubscribe(&channel(&room)).await.is_ok() {
                self.pending.remove(&room);
                recovered = true;
            }
        }
        if recovered {
            tracing::info!(
                still_pending = self.pending.len(),
                "subscriptions to a recovered shard in place"
            );
            self.inbound.push(Inbound::Resync);
        }
    }

    /// Apply one command; false if the connection failed doing it.
    async fn handle(&mut self, cmd: SubCmd, conn: &mut Option<SubConn>) -> bool {
        match cmd {
            SubCmd::Sub(room, reply) => {
                if let Some(n) = self.rooms.get_mut(&room) {
                    *n += 1;
                    let _ = reply.send(Ok(()));
                    return true;
                }
                let Some(c) = conn.as_mut() else {
                    let _ = reply.send(Err(unavailable("redis subscription connection is down")));
                    return true;
                };
                match c.ssubscribe(&channel(&room)).await {
                    Ok(()) => {
                        self.rooms.insert(room, 1);
                        self.metrics
                            .redis_subscriptions
                            .set(self.rooms.len() as i64);
                        let _ = reply.send(Ok(()));
                        true
                    }
                    Err(e) => {
                        self.metrics.redis_errors.inc();
                        let _ = reply.send(Err(unavailable(&e)));
                        // On a cluster it is this room's shard, not the
                        // connection: the join gets 503, the rest goes on.
                        c.is_cluster()
                            || !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped())
                    }
                }
            }
            SubCmd::Unsub(room) => {
                let Some(n) = self.rooms.get_mut(&room) else {
                    return true;
                };
                *n -= 1;
                if *n > 0 {
                    return true;
                }
                self.rooms.remove(&room);
                self.pending.remove(&room);
                self.metrics
                    .redis_subscriptions
                    .set(self.rooms.len() as i64);
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = c.sunsubscribe(&channel(&room)).await {
                        self.metrics.redis_errors.inc();
                        tracing::debug!(error = %e, "sunsubscribe failed");
                    }
                }
                true
            }
        }
    }
}
