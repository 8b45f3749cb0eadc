//! Connections to one Redis or to a Redis Cluster, behind one type.
//!
//! `--redis-url redis://host:port` is a single Redis (or a proxy in front
//! of one); `redis+cluster://host1:port1,host2:port2` (or
//! `rediss+cluster://` for TLS) is a Redis Cluster given by seed nodes,
//! whose slot map redis-rs discovers and follows (MOVED/ASK, failover).
//! Every key and sharded channel of a room shares the room's hash tag, so
//! a room lives on one shard and rooms spread over the shards.
//!
//! [`Conn`] is a command connection: a `ConnectionManager` (multiplexed,
//! reconnects itself) for a single Redis, a cluster connection (one
//! multiplexed connection per shard, routed by slot) for a cluster. Both
//! pipeline concurrent commands. [`SubConn`] is the RESP3 connection that
//! holds the node's SSUBSCRIBEs; on a cluster each SSUBSCRIBE goes to the
//! shard that owns the channel.

use std::time::Duration;

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr},
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
};

use crate::config::RedisTarget;

/// The primaries that own slots, as `CLUSTER SLOTS` (asked of any node
/// that answers) lists them, reachable or not.
async fn primaries(c: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let v = c
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let mut out: Vec<(String, u16)> = vec![];
    if let Value::Array(ranges) = v {
        for r in ranges {
            let Value::Array(parts) = r else { continue };
            let Some(Value::Array(master)) = parts.get(2) else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                continue;
            };
            let addr = (host, *port as u16);
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    Ok(out)
}

/// PING every slot-owning primary by address (redis-rs's own "all
/// primaries" routing skips the ones it cannot connect to).
async fn cluster_reach(c: &mut ClusterConnection) -> Reach {
    let Ok(masters) = primaries(c).await else {
        return Reach::None;
    };
    let pings = masters.into_iter().map(|(host, port)| {
        let mut c = c.clone();
        async move {
            let at = SingleNodeRoutingInfo::ByAddress { host, port };
            c.route_command(redis::cmd("PING"), RoutingInfo::SingleNode(at))
                .await
                .is_ok()
        }
    });
    let up = futures_util::future::join_all(pings).await;
    match (up.iter().filter(|u| **u).count(), up.len()) {
        (0, _) => Reach::None,
        (n, all) if n == all => Reach::All,
        _ => Reach::Some,
    }
}

/// How much of the bus's Redis answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Every shard (the one Redis, or every primary of a cluster).
    All,
    /// Some primaries of a cluster but not all: rooms on the others get
    /// `error 503` until they are back (or failed over).
    Some,
    /// Nothing.
    None,
}

impl Conn {
    /// `WAIT n timeout` on the primary that owns `key` (on one Redis, the
    /// Redis): how many replicas acknowledged every write this connection
    /// made there so far.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        n: u64,
        timeout: Duration,
    ) -> RedisResult<u64> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(n).arg(timeout.as_millis() as u64);
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => {
                let at = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let v = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(at)),
                    )
                    .await?;
                Ok(redis::from_redis_value(v)?)
            }
        }
    }

    /// Which part of the Redis (Cluster) answers a PING.
    pub async fn reach(&mut self) -> Reach {
        match self {
            Conn::Single(c) => match redis::cmd("PING").query_async::<String>(c).await {
                Ok(_) => Reach::All,
                Err(_) => Reach::None,
            },
            Conn::Cluster(c) => cluster_reach(c).await,
        }
    }
}

/// A command connection (see the module docs). Cheap to clone; clones
/// share the underlying connections.
#[derive(Clone)]
pub enum Conn {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Open `n` command connections lazily: a Redis that is down at start
/// makes the node unhealthy instead of failing it. A cluster gets one
/// connection (it already holds one per shard and routes by slot).
pub fn commands(target: &RedisTarget, n: usize, timeout: Duration) -> RedisResult<Vec<Conn>> {
    match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())?;
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            (0..n.max(1))
                .map(|_| {
                    ConnectionManager::new_lazy_with_config(client.clone(), cfg.clone())
                        .map(Conn::Single)
                })
                .collect()
        }
        RedisTarget::Cluster(nodes) => {
            let client = ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2)
                .max_retry_wait(500)
                .build()?;
            let cfg = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout);
            Ok(vec![Conn::Cluster(
                client.get_pending_async_connection_with_config(cfg),
            )])
        }
    }
}

/// The subscription connection (see the module docs).
#[derive(Clone)]
pub enum SubConn {
    /// One Redis.
    Single(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl SubConn {
    /// Connect with RESP3, handing every push (messages, subscription
    /// confirmations, `Disconnection` of any shard) to `sender`.
    pub async fn connect(
        target: &RedisTarget,
        timeout: Duration,
        sender: impl redis::aio::AsyncPushSender,
    ) -> RedisResult<SubConn> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(with_resp3(url))?;
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_push_sender(sender);
                let c = client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?;
                Ok(SubConn::Single(c))
            }
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .push_sender(sender)
                    .build()?;
                Ok(SubConn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// SSUBSCRIBE one channel (on a cluster, at the shard owning it).
    pub async fn ssubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            SubConn::Single(c) => redis::cmd("SSUBSCRIBE").arg(channel).exec_async(c).await,
            SubConn::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    /// SUNSUBSCRIBE one channel.
    pub async fn sunsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            SubConn::Single(c) => redis::cmd("SUNSUBSCRIBE").arg(channel).exec_async(c).await,
            SubConn::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// PING (on a cluster, every primary, succeeding if any answers),
    /// after the subscriptions: their replies came first, so the ones that
    /// could be made are in place.
    pub async fn ping(&mut self) -> RedisResult<()> {
        match self {
            SubConn::Single(c) => redis::cmd("PING").exec_async(c).await,
            SubConn::Cluster(c) => match cluster_reach(c).await {
                Reach::None => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no cluster primary answers",
                ))),
                _ => Ok(()),
            },
        }
    }

    /// True for a cluster: one shard's failure is not the connection's.
    pub fn is_cluster(&self) -> bool {
        matches!(self, SubConn::Cluster(_))
    }
}

fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp3_is_asked_for_in_the_query() {
        assert_eq!(with_resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(
            with_resp3("redis://h:1/?db=2"),
            "redis://h:1/?db=2&protocol=resp3"
        );
    }
}
