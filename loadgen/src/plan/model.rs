//! The capacity model: from a workload and the measured costs of this
//! build on this machine, the nodes a deployment needs and what limits it.
//! Pure arithmetic, no IO, unit-tested.
//!
//! Rules:
//! - Broker CPU is the sum of per-event costs measured with the broker
//!   and loadgen on separate cores: each published message costs what a
//!   message to a room of its size cost in calibration (publish, fan-out
//!   and every delivery together); a stored message adds the group-commit
//!   cost; in a cluster each node holding members of the room adds the
//!   bus's per-node cost; each handshake costs its measured CPU.
//! - Memory per node is the broker's base RSS plus its connections times
//!   the measured memory per connection in rooms under traffic.
//! - A node may use `target_cpu` of its cores and 80% of its memory (the
//!   rest is the OS's and the page cache's), and hold at most
//!   `max_connections_per_node` connections (file descriptors).
//! - The nodes needed are the fewest that meet all three; the limiting
//!   resource is the one with the least headroom on that many nodes.

use serde::{Deserialize, Serialize};

use super::workload::Workload;

/// What one message to a room of `size` members cost in calibration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SizeCost {
    /// Members per room.
    pub size: usize,
    /// Broker CPU per published message (all its deliveries included), µs.
    pub cpu_us_per_msg: f64,
    /// The same per delivery, µs.
    pub cpu_us_per_delivery: f64,
    /// Delivery p99 in the calibration run, ms.
    pub p99_ms: f64,
    /// Deliveries per second in the calibration run.
    pub deliveries_per_sec: f64,
}

/// Measured costs of this build on this machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Costs {
    /// Broker RSS with no connections, bytes.
    pub base_rss_bytes: f64,
    /// RSS slope of idle connections, bytes per connection.
    pub idle_conn_bytes: f64,
    /// Memory per connection joined to a room under traffic, bytes.
    pub member_conn_bytes: f64,
    /// Broker CPU per handshake (TCP accept, upgrade, token, hello), µs.
    pub handshake_cpu_us: f64,
    /// Per-message costs by room size (sorted by size).
    pub sizes: Vec<SizeCost>,
    /// Extra broker CPU per stored message (group commit), µs.
    pub commit_cpu_us_per_msg: f64,
    /// Cluster costs, if a two-node calibration ran.
    pub cluster: Option<ClusterCost>,
    /// How per-delivery cost grows at lower rates, if measured.
    #[serde(default)]
    pub rate: Option<RateFactor>,
    /// Broker CPU per delivery to JSON clients over MessagePack clients
    /// (rooms of 10), if measured; the sizes are measured in MessagePack.
    #[serde(default)]
    pub json_factor: Option<f64>,
}

/// Per-delivery cost against the deliveries per second a node handles:
/// at lower rates each wake-up and write carries fewer frames.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RateFactor {
    /// The low rate measured, deliveries/s.
    pub low_deliveries_per_sec: f64,
    /// Cost there over the cost at the high rate.
    pub low_factor: f64,
    /// The high rate (where `sizes` were measured), deliveries/s.
    pub high_deliveries_per_sec: f64,
}

impl RateFactor {
    /// The factor at `d` deliveries/s per node: 1 at or above the high
    /// rate, `low_factor` at or below the low one, linear in log(d) between.
    pub fn at(&self, d: f64) -> f64 {
        let (lo, hi) = (
            self.low_deliveries_per_sec.max(1.0).ln(),
            self.high_deliveries_per_sec.max(2.0).ln(),
        );
        if hi <= lo {
            return 1.0;
        }
        let t = ((d.max(1.0).ln() - lo) / (hi - lo)).clamp(0.0, 1.0);
        self.low_factor + (1.0 - self.low_factor) * t
    }
}

/// What the Redis bus adds, from a two-node run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterCost {
    /// Room size of the run.
    pub size: usize,
    /// Extra broker CPU per message per node holding members, µs.
    pub bus_cpu_us_per_msg_per_node: f64,
    /// redis-server CPU per message (its fan-out to nodes included), µs.
    pub redis_cpu_us_per_msg: f64,
    /// Extra broker CPU per stored message in a cluster (all nodes), µs:
    /// the hot stream in Redis and each node's archive, instead of one
    /// node's group commit.
    #[serde(default)]
    pub store_cpu_us_per_msg: f64,
    /// Memory per connection on a cluster node, bytes (0: not measured).
    #[serde(default)]
    pub conn_bytes: f64,
}

impl Costs {
    /// Broker CPU per message to a room of `size`: the calibrated figure
    /// for a calibrated size, else a line (publish cost + per-delivery
    /// cost) through the calibrated points.
    pub fn cpu_us_per_msg(&self, size: usize) -> f64 {
        if let Some(c) = self.sizes.iter().find(|c| c.size == size) {
            return c.cpu_us_per_msg;
        }
        let (a, b) = self.line();
        (a + b * size as f64).max(0.0)
    }

    /// Memory per connection on a node of a deployment of `nodes`: a
    /// cluster node's figure when measured (its users' bus subscriptions
    /// included), else one node's (in rooms under traffic, or idle).
    pub fn conn_bytes(&self, nodes: usize) -> f64 {
        match &self.cluster {
            Some(cl) if nodes > 1 && cl.conn_bytes > 0.0 => cl.conn_bytes,
            _ => self.member_conn_bytes.max(self.idle_conn_bytes),
        }
    }

    /// Least-squares fit of cpu_us_per_msg = a + b × size.
    pub fn line(&self) -> (f64, f64) {
        let n = self.sizes.len() as f64;
        if self.sizes.is_empty() {
            return (0.0, 0.0);
        }
        if self.sizes.len() == 1 {
            let c = &self.sizes[0];
            return (0.0, c.cpu_us_per_msg / c.size.max(1) as f64);
        }
        let sx: f64 = self.sizes.iter().map(|c| c.size as f64).sum();
        let sy: f64 = self.sizes.iter().map(|c| c.cpu_us_per_msg).sum();
        let sxx: f64 = self.sizes.iter().map(|c| (c.size as f64).powi(2)).sum();
        let sxy: f64 = self
            .sizes
            .iter()
            .map(|c| c.size as f64 * c.cpu_us_per_msg)
            .sum();
        let d = n * sxx - sx * sx;
        if d.abs() < f64::EPSILON {
            return (0.0, sy / sx.max(1.0));
        }
        let b = (n * sxy - sx * sy) / d;
        let a = (sy - b * sx) / n;
        (a, b)
    }
}

/// The node a deployment runs on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// CPU cores per node.
    pub cores: f64,
    /// Memory per node, GiB.
    pub memory_gib: f64,
    /// Share of the cores a node may use at the workload's peak.
    #[serde(default = "default_target_cpu")]
    pub target_cpu: f64,
    /// Most connections one node may hold (its file-descriptor limit and
    /// `--max-connections`).
    #[serde(default = "default_max_conns")]
    pub max_connections_per_node: f64,
}

fn default_target_cpu() -> f64 {
    0.6
}

fn default_max_conns() -> f64 {
    100_000.0
}

/// Share of a node's memory the broker may use.
pub const MEMORY_SHARE: f64 = 0.8;

/// Most nodes a plan considers.
pub const MAX_NODES: usize = 10_000;

/// The load a workload puts on a deployment of `nodes` nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Load {
    /// Nodes.
    pub nodes: usize,
    /// Messages published per second, all rooms.
    pub publishes_per_sec: f64,
    /// Deliveries per second, all connections.
    pub deliveries_per_sec: f64,
    /// Broker CPU, cores, all nodes.
    pub broker_cores: f64,
    /// Broker CPU per node, cores.
    pub cores_per_node: f64,
    /// Of which: messages (publish and deliveries), cores.
    pub message_cores: f64,
    /// Of which: group commit, cores.
    pub commit_cores: f64,
    /// Of which: the bus, cores.
    pub bus_cores: f64,
    /// Of which: handshakes, cores.
    pub handshake_cores: f64,
    /// Connections per node.
    pub connections_per_node: f64,
    /// Broker RSS per node, bytes.
    pub rss_per_node_bytes: f64,
    /// redis-server CPU, cores (0 for one node).
    pub redis_cores: f64,
    /// Redis commands per second (one script per publish, typing
    /// relays), 0 for one node.
    pub redis_commands_per_sec: f64,
    /// Messages Redis pushes to nodes per second.
    pub redis_pushes_per_sec: f64,
    /// Rows written to the shared store (PostgreSQL) per second, 0 for
    /// one node (it uses its embedded SQLite).
    pub store_rows_per_sec: f64,
}

/// Compute the load of `w` on `nodes` nodes.
pub fn load(w: &Workload, c: &Costs, nodes: usize) -> Load {
    let nodes = nodes.max(1);
    let n = nodes as f64;
    let publishes = w.connections * w.messages_per_connection_per_minute / 60.0;
    let typing = publishes * w.typing_per_message;
    let mut deliveries = 0.0;
    let mut message_us = 0.0;
    let mut bus_us = 0.0;
    let mut pushes = 0.0;
    let total_share: f64 = w.rooms.iter().map(|r| r.share).sum::<f64>().max(1e-9);
    for r in &w.rooms {
        let p = (publishes + typing) * r.share / total_share;
        let size = r.size.max(1);
        deliveries += p * size as f64;
        message_us += p * c.cpu_us_per_msg(size);
        if nodes > 1 {
            let receivers = (size as f64).min(n);
            pushes += p * receivers;
            if let Some(cl) = &c.cluster {
                bus_us += p * receivers * cl.bus_cpu_us_per_msg_per_node;
            }
        }
    }
    // Fewer deliveries per node cost more each.
    if let Some(rf) = &c.rate {
        message_us *= rf.at(deliveries / n);
    }
    // JSON clients' share of the deliveries costs what JSON costs.
    message_us *= 1.0 + w.json_share * (c.json_factor.unwrap_or(1.0) - 1.0);
    let stored = publishes * w.stored_share;
    let commit_us = stored
        * match (&c.cluster, nodes > 1) {
            (Some(cl), true) => cl.store_cpu_us_per_msg,
            _ => c.commit_cpu_us_per_msg,
        };
    let handshakes = w.connections * w.reconnects_per_connection_per_hour / 3600.0;
    let handshake_us = handshakes * c.handshake_cpu_us;
    let broker_cores = (message_us + commit_us + bus_us + handshake_us) / 1e6;
    let conns = w.connections / n;
    let per_conn = c.conn_bytes(nodes);
    let (redis_cores, redis_commands) = match (&c.cluster, nodes > 1) {
        (Some(cl), true) => (
            (publishes + typing) * cl.redis_cpu_us_per_msg / 1e6,
            publishes + typing,
        ),
        _ => (0.0, 0.0),
    };
    Load {
        nodes,
        publishes_per_sec: publishes,
        deliveries_per_sec: deliveries,
        broker_cores,
        cores_per_node: broker_cores / n,
        message_cores: message_us / 1e6,
        commit_cores: commit_us / 1e6,
        bus_cores: bus_us / 1e6,
        handshake_cores: handshake_us / 1e6,
        connections_per_node: conns,
        rss_per_node_bytes: c.base_rss_bytes + conns * per_conn,
        redis_cores,
        redis_commands_per_sec: redis_commands,
        redis_pushes_per_sec: pushes,
        store_rows_per_sec: if nodes > 1 { stored } else { 0.0 },
    }
}

/// What bounds the nodes of a deployment.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Broker CPU.
    Cpu,
    /// Broker memory.
    Memory,
    /// Connections (file descriptors) per node.
    Connections,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// Nodes needed.
    pub nodes: usize,
    /// The resource with the least headroom on that many nodes.
    pub limited_by: Limit,
    /// Nodes each resource alone would need.
    pub nodes_for_cpu: usize,
    /// Nodes memory alone would need.
    pub nodes_for_memory: usize,
    /// Nodes connections alone would need.
    pub nodes_for_connections: usize,
    /// The load at that many nodes.
    pub load: Load,
    /// Share of each node's cores used.
    pub cpu_utilisation: f64,
    /// Share of each node's memory used.
    pub memory_utilisation: f64,
    /// Headroom: how much more of this workload the nodes carry before
    /// the first limit (1.0 = none).
    pub headroom: f64,
    /// Warnings (a Redis past one core, a room size far from calibration).
    pub warnings: Vec<String>,
}

/// The fewest nodes that carry `w`.
pub fn plan(w: &Workload, c: &Costs, node: &NodeSpec) -> Plan {
    let cpu_cap = node.cores * node.target_cpu;
    let mem_cap = node.memory_gib * (1u64 << 30) as f64 * MEMORY_SHARE;
    let fits_cpu = |n: usize| load(w, c, n).cores_per_node <= cpu_cap;
    let fits_mem = |n: usize| load(w, c, n).rss_per_node_bytes <= mem_cap;
    let fits_conns = |n: usize| w.connections / n as f64 <= node.max_connections_per_node;
    let first = |ok: &dyn Fn(usize) -> bool| (1..=MAX_NODES).find(|&n| ok(n)).unwrap_or(MAX_NODES);
    let (nc, nm, nf) = (first(&fits_cpu), first(&fits_mem), first(&fits_conns));
    let nodes = nc.max(nm).max(nf);
    let l = load(w, c, nodes);
    let cpu_u = l.cores_per_node / node.cores;
    let mem_u = l.rss_per_node_bytes / (node.memory_gib * (1u64 << 30) as f64);
    // How much more of the workload each resource takes at `nodes`; the
    // limit is the resource with the least.
    let room = [
        (Limit::Cpu, cpu_cap / l.cores_per_node.max(1e-12)),
        (
            Limit::Memory,
            (mem_cap - c.base_rss_bytes).max(0.0)
                / (l.rss_per_node_bytes - c.base_rss_bytes).max(1e-9),
        ),
        (
            Limit::Connections,
            node.max_connections_per_node / l.connections_per_node.max(1e-9),
        ),
    ];
    let (limited_by, headroom) =
        room.into_iter()
            .fold((Limit::Cpu, f64::INFINITY), |best, (k, h)| {
                if h < best.1 {
                    (k, h)
                } else {
                    best
                }
            });
    let mut warnings = vec![];
    if l.redis_cores > 0.7 {
        warnings.push(format!(
            "Redis needs {:.1} cores at this load: one redis-server is single-threaded; shard rooms over a Redis Cluster of at least {} masters",
            l.redis_cores,
            (l.redis_cores / 0.7).ceil()
        ));
    }
    if w.json_share > 0.0 && c.json_factor.is_none() {
        warnings.push(
            "JSON clients' cost not calibrated (an older calibration): counted as MessagePack; --recalibrate"
                .into(),
        );
    }
    if nodes > 1 && c.cluster.is_none() {
        warnings.push(
            "no two-node calibration: the bus's cost per node and Redis's CPU are not counted"
                .into(),
        );
    }
    if let Some(target) = w.p99_ms {
        for r in &w.rooms {
            if let Some(cal) = c.sizes.iter().find(|s| s.size == r.size) {
                if cal.p99_ms > target {
                    warnings.push(format!(
                        "rooms of {}: p99 was {:.1} ms at {:.0} deliveries/s in calibration, over the {target} ms target (latency is not modelled; check with `loadgen capacity --slo-p99-ms {target}`)",
                        r.size, cal.p99_ms, cal.deliveries_per_sec
                    ));
                }
            }
        }
    }
    let (lo, hi) = (
        c.sizes.first().map_or(0, |s| s.size),
        c.sizes.last().map_or(0, |s| s.size),
    );
    for r in &w.rooms {
        if !c.sizes.iter().any(|s| s.size == r.size) && (r.size < lo || r.size > hi) {
            warnings.push(format!(
                "rooms of {} are outside the calibrated sizes {lo}..{hi}: extrapolated",
                r.size
            ));
        }
    }
    Plan {
        nodes,
        limited_by,
        nodes_for_cpu: nc,
        nodes_for_memory: nm,
        nodes_for_connections: nf,
        load: l,
        cpu_utilisation: cpu_u,
        memory_utilisation: mem_u,
        headroom,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::workload::{RoomClass, Workload};

    fn costs() -> Costs {
        Costs {
            base_rss_bytes: 20e6,
            idle_conn_bytes: 3000.0,
            member_conn_bytes: 5000.0,
            handshake_cpu_us: 100.0,
            sizes: vec![
                SizeCost {
                    size: 10,
                    cpu_us_per_msg: 110.0,
                    cpu_us_per_delivery: 11.0,
                    p99_ms: 1.0,
                    deliveries_per_sec: 1.0,
                },
                SizeCost {
                    size: 100,
                    cpu_us_per_msg: 920.0,
                    cpu_us_per_delivery: 9.2,
                    p99_ms: 1.0,
                    deliveries_per_sec: 1.0,
                },
            ],
            commit_cpu_us_per_msg: 20.0,
            cluster: Some(ClusterCost {
                size: 10,
                bus_cpu_us_per_msg_per_node: 10.0,
                redis_cpu_us_per_msg: 15.0,
                store_cpu_us_per_msg: 30.0,
                conn_bytes: 0.0,
            }),
            rate: None,
            json_factor: Some(1.2),
        }
    }

    fn work(connections: f64, size: usize, mpm: f64) -> Workload {
        Workload {
            name: "t".into(),
            connections,
            messages_per_connection_per_minute: mpm,
            payload_bytes: 100,
            stored_share: 0.0,
            typing_per_message: 0.0,
            reconnects_per_connection_per_hour: 0.0,
            json_share: 0.0,
            p99_ms: None,
            rooms: vec![RoomClass { size, share: 1.0 }],
            node: NodeSpec {
                cores: 4.0,
                memory_gib: 8.0,
                target_cpu: 0.5,
                max_connections_per_node: 100_000.0,
            },
        }
    }

    #[test]
    fn the_line_through_calibrated_sizes() {
        let c = costs();
        let (a, b) = c.line();
        assert!((a - 20.0).abs() < 1e-6 && (b - 9.0).abs() < 1e-6, "{a} {b}");
        assert_eq!(c.cpu_us_per_msg(10), 110.0);
        assert!((c.cpu_us_per_msg(50) - 470.0).abs() < 1e-6);
    }

    #[test]
    fn cpu_bound_workload() {
        // 60,000 conns × 60/min = 60,000 msg/s to rooms of 10: 6.6 cores
        // of messages; 2 usable cores per node → 4 nodes (bus adds more).
        let w = work(60_000.0, 10, 60.0);
        let p = plan(&w, &costs(), &w.node);
        assert_eq!(p.limited_by, Limit::Cpu);
        let l1 = load(&w, &costs(), 1);
        assert!((l1.broker_cores - 6.6).abs() < 1e-9);
        assert!(p.nodes >= 4, "{p:?}");
        assert!(p.load.cores_per_node <= 2.0 + 1e-9);
        assert!(p.load.redis_cores > 0.0 && p.load.redis_pushes_per_sec > 0.0);
        assert!(p.headroom >= 1.0);
    }

    #[test]
    fn connection_and_memory_bound_workloads() {
        // Mostly idle: a million connections, one message an hour.
        let w = work(1_000_000.0, 10, 1.0 / 60.0);
        let p = plan(&w, &costs(), &w.node);
        assert_eq!((p.limited_by, p.nodes), (Limit::Connections, 10));
        // Small nodes: memory binds first.
        let mut w = work(1_000_000.0, 10, 1.0 / 60.0);
        w.node.memory_gib = 0.5;
        let p = plan(&w, &costs(), &w.node);
        assert_eq!(p.limited_by, Limit::Memory);
        assert!(p.load.rss_per_node_bytes <= 0.5 * (1u64 << 30) as f64 * MEMORY_SHARE);
    }

    #[test]
    fn the_limit_is_the_resource_with_least_headroom() {
        // One node carries it all, connections at exactly the cap.
        let w = work(100_000.0, 10, 0.01);
        let p = plan(&w, &costs(), &w.node);
        assert_eq!((p.nodes, p.limited_by), (1, Limit::Connections));
        assert!((p.headroom - 1.0).abs() < 1e-9);
    }

    #[test]
    fn storage_and_handshakes_are_counted() {
        let mut w = work(10_000.0, 10, 6.0);
        let base = load(&w, &costs(), 1).broker_cores;
        w.stored_share = 1.0;
        w.reconnects_per_connection_per_hour = 3.6;
        let l = load(&w, &costs(), 1);
        // 1,000 msg/s × 20 µs and 10 handshakes/s × 100 µs.
        assert!((l.commit_cores - 0.02).abs() < 1e-9);
        assert!((l.handshake_cores - 0.001).abs() < 1e-9);
        assert!((l.broker_cores - base - 0.021).abs() < 1e-9);
        assert_eq!(l.store_rows_per_sec, 0.0, "one node: embedded store");
        let two = load(&w, &costs(), 2);
        assert_eq!(two.store_rows_per_sec, 1000.0);
        assert!(
            (two.commit_cores - 0.03).abs() < 1e-9,
            "the cluster's store cost"
        );
    }

    #[test]
    fn json_clients_cost_their_factor() {
        let mut w = work(6000.0, 10, 60.0);
        let msgpack = load(&w, &costs(), 1).message_cores;
        w.json_share = 0.5;
        let mixed = load(&w, &costs(), 1).message_cores;
        assert!((mixed / msgpack - 1.1).abs() < 1e-9);
    }

    #[test]
    fn lower_rates_cost_more_per_delivery() {
        let rf = RateFactor {
            low_deliveries_per_sec: 1000.0,
            low_factor: 1.5,
            high_deliveries_per_sec: 100_000.0,
        };
        assert_eq!(rf.at(100.0), 1.5);
        assert_eq!(rf.at(1e6), 1.0);
        assert!((rf.at(10_000.0) - 1.25).abs() < 1e-9);
        let mut c = costs();
        c.rate = Some(rf);
        let w = work(6000.0, 10, 1.0);
        // 100 msg/s, 1,000 deliveries/s on one node: the low-rate factor.
        assert!((load(&w, &c, 1).message_cores - 1.5 * 100.0 * 110.0 / 1e6).abs() < 1e-9);
    }
}
