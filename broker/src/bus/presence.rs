//! Cluster presence over Redis, with per-node leases.
//!
//! A room's presence is the hash `shoal:{room}:presence`: field = user,
//! value = the space-separated ids of the nodes where the user has a
//! connection in the room. Scripts change it atomically and publish the
//! `presence` event on the room's channel only when a user's first node
//! arrives or last node leaves, so a user on two nodes is online once.
//!
//! Presence names a node *process*, not a node id: `<node id>#<incarnation>`,
//! with an incarnation drawn at every start. A node restarted under the
//! same id (the default id is host-port, and supervisors restart nodes
//! with fixed ids) is a new holder, so what its previous process held can
//! never be renewed by it and is reaped like any dead node's.
//!
//! Every node process holds a lease, the key `shoal:node:<id>#<inc>` with
//! a TTL of `--presence-lease-ms`, refreshed at a third of that. Each node
//! checks, every half lease, the other holders named in the presence of
//! its own rooms; a holder whose lease expired (its process died) is
//! removed, with `presence offline` events for the users it alone held.
//! The bound: a crashed process's users leave within 1.5 leases (the lease
//! runs out at most one lease after the last refresh, and the next check
//! comes within half a lease), whether or not the node comes back, as
//! long as some node has a member in the room (only such a room's
//! presence is observable).
//!
//! Operations are applied in order by one worker task per node: a join
//! and a leave of the same user never overtake each other.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use super::redis_conn::Conn;
use shoal_proto::ServerFrame;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A presence change of this node.
#[derive(Debug)]
pub enum PresenceOp {
    /// The user's first connection in the room on this node.
    Join {
        /// Room.
        room: Arc<str>,
        /// User.
        user: Arc<str>,
    },
    /// The user's last connection in the room on this node left.
    Leave {
        /// Room.
        room: Arc<str>,
        /// User.
        user: Arc<str>,
    },
}

const JOIN_LUA: &str = r#"
-- KEYS: 1 presence hash. ARGV: 1 user, 2 node, 3 channel, 4 online event
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  for n in string.gmatch(cur, '%S+') do
    if n == ARGV[2] then return 0 end
  end
  redis.call('HSET', KEYS[1], ARGV[1], cur .. ' ' .. ARGV[2])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SPUBLISH', ARGV[3], ARGV[4])
return 1
"#;

const LEAVE_LUA: &str = r#"
-- KEYS: 1 presence hash. ARGV: 1 channel, 2 nodes to remove (space-separated),
--   then pairs of (user, offline event); no users: every user of the hash
local gone = {}
for n in string.gmatch(ARGV[2], '%S+') do gone[n] = true end
local function strip(user, event)
  local cur = redis.call('HGET', KEYS[1], user)
  if not cur then return 0 end
  local keep = {}
  for n in string.gmatch(cur, '%S+') do
    if not gone[n] then keep[#keep + 1] = n end
  end
  if #keep > 0 then
    redis.call('HSET', KEYS[1], user, table.concat(keep, ' '))
    return 0
  end
  redis.call('HDEL', KEYS[1], user)
  redis.call('SPUBLISH', ARGV[1], event)
  return 1
end
local left = 0
for i = 3, #ARGV, 2 do left = left + strip(ARGV[i], ARGV[i + 1]) end
return left
"#;

use super::keys::{channel, lease_key, presence_key};

fn presence_payload(room: &str, user: &str, online: bool) -> Vec<u8> {
    shoal_proto::bus::encode_ephemeral(&ServerFrame::Presence {
        room: room.to_string(),
        user: user.to_string(),
        online,
    })
}

/// The presence holder name of this process of node `node`: a fresh
/// incarnation at every start.
pub fn holder_name(node: &str) -> String {
    let inc = uuid::Uuid::new_v4().simple().to_string();
    format!("{node}#{}", &inc[..12])
}

/// Users present in a room, cluster-wide, sorted.
pub async fn members(conn: &mut Conn, room: &str) -> redis::RedisResult<Vec<String>> {
    let mut users: Vec<String> = redis::cmd("HKEYS")
        .arg(presence_key(room))
        .query_async(conn)
        .await?;
    users.sort_unstable();
    Ok(users)
}

/// The per-node presence worker.
pub struct Worker {
    /// Command connection.
    pub conn: Conn,
    /// This node process's presence holder name: `<node id>#<incarnation>`
    /// (see [`holder_name`]).
    pub node: String,
    /// Lease length.
    pub lease: Duration,
    /// Metrics (Redis errors).
    pub metrics: Arc<Metrics>,
}

impl Worker {
    /// Apply ops in order; refresh the lease; reap dead nodes. Joins that
    /// failed (Redis down) are re-applied after the next successful lease
    /// refresh, so presence comes back after an outage.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<PresenceOp>, stop: CancellationToken) {
        let join = redis::Script::new(JOIN_LUA);
        let leave = redis::Script::new(LEAVE_LUA);
        // room -> users with a connection here: what this node asserts.
        let mut local: HashMap<Arc<str>, HashSet<Arc<str>>> = HashMap::new();
        let mut lease_tick = tokio::time::interval(self.lease / 3);
        let mut reap_tick = tokio::time::interval(self.lease / 2);
        let mut conn = self.conn.clone();
        let mut stale = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                op = rx.recv() => {
                    let Some(op) = op else { break };
                    let r = match &op {
                        PresenceOp::Join { room, user } => {
                            local.entry(room.clone()).or_default().insert(user.clone());
                            let ch = channel(room);
                            join.key(presence_key(room))
                                .arg(&**user)
                                .arg(&self.node)
                                .arg(ch)
                                .arg(presence_payload(room, user, true))
                                .invoke_async::<i64>(&mut conn)
                                .await
                        }
                        PresenceOp::Leave { room, user } => {
                            if let Some(users) = local.get_mut(room) {
                                users.remove(user);
                                if users.is_empty() {
                                    local.remove(room);
                                }
                            }
                            leave.key(presence_key(room))
                                .arg(channel(room))
                                .arg(&self.node)
                                .arg(&**user)
                                .arg(presence_payload(room, user, false))
                                .invoke_async::<i64>(&mut conn)
                                .await
                        }
                    };
                    if let Err(e) = r {
                        self.metrics.redis_errors.inc();
                        tracing::debug!(error = %e, "presence update failed; re-applied later");
                        stale = true;
                    }
                }
                _ = lease_tick.tick() => {
                    let r: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(lease_key(&self.node))
                        .arg(1)
                        .arg("PX")
                        .arg(self.lease.as_millis() as u64)
                        .query_async(&mut conn)
                        .await;
                    match r {
                        Ok(()) if stale => {
                            stale = self.reassert(&join, &mut conn, &local).await.is_err();
                        }
                        Ok(()) => {}
                        Err(e) => {
                            self.metrics.redis_errors.inc();
                            tracing::debug!(error = %e, "lease refresh failed");
                            stale = true;
                        }
                    }
                }
                _ = reap_tick.tick() => {
                    for room in local.keys() {
                        if let Err(e) = self.reap(&leave, &mut conn, room).await {
                            self.metrics.redis_errors.inc();
                            tracing::debug!(error = %e, "presence reap failed");
                            break;
                        }
                    }
                }
            }
        }
        // Graceful stop: this node's users leave at once, not after a lease.
        for (room, users) in &local {
            for user in users {
                let _ = leave
                    .key(presence_key(room))
                    .arg(channel(room))
                    .arg(&self.node)
                    .arg(&**user)
                    .arg(presence_payload(room, user, false))
                    .invoke_async::<i64>(&mut conn)
                    .await;
            }
        }
        let _: redis::RedisResult<i64> = redis::cmd("DEL")
            .arg(lease_key(&self.node))
            .query_async(&mut conn)
            .await;
    }

    async fn reassert(
        &self,
        join: &redis::Script,
        conn: &mut Conn,
        local: &HashMap<Arc<str>, HashSet<Arc<str>>>,
    ) -> redis::RedisResult<()> {
        for (room, users) in local {
            for user in users {
                join.key(presence_key(room))
                    .arg(&**user)
                    .arg(&self.node)
                    .arg(channel(room))
                    .arg(presence_payload(room, user, true))
                    .invoke_async::<i64>(conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Remove nodes without a lease from a room's presence.
    async fn reap(
        &self,
        leave: &redis::Script,
        conn: &mut Conn,
        room: &str,
    ) -> redis::RedisResult<()> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(presence_key(room))
            .query_async(conn)
            .await?;
        let nodes: HashSet<&str> = all
            .values()
            .flat_map(|v| v.split_whitespace())
            .filter(|n| *n != self.node)
            .collect();
        let mut dead = vec![];
        for n in nodes {
            let alive: bool = redis::cmd("EXISTS")
                .arg(lease_key(n))
                .query_async(conn)
                .await?;
            if !alive {
                dead.push(n);
            }
        }
        if dead.is_empty() {
            return Ok(());
        }
        tracing::info!(room, nodes = ?dead, "removing expired nodes from presence");
        let mut inv = leave.key(presence_key(room));
        inv.arg(channel(room)).arg(dead.join(" "));
        for (user, holders) in &all {
            if holders.split_whitespace().any(|n| dead.contains(&n)) {
                inv.arg(user).arg(presence_payload(room, user, false));
            }
        }
        let _: i64 = inv.invoke_async(conn).await?;
        Ok(())
    }
}
