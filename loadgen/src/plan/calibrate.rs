//! Calibration: measure what this build costs on this machine, with brokers
//! `plan` starts itself (release `shoal` beside this binary, or
//! `--shoal-bin`), pinned to core 0 while loadgen runs on core 1, each in a
//! temp dir on a free loopback port, stopped by PID at the end.
//!
//! Measured, each from its own short run:
//! - memory per idle connection (RSS slope of a `connect` ramp) and the
//!   broker CPU per handshake over it;
//! - broker CPU per message for each room size (a `fanout` run in a
//!   `persist=off` namespace), and the memory per connection in rooms
//!   under traffic;
//! - the group-commit cost per stored message (the same run, stored);
//! - with redis-server installed, a two-node run on the Redis bus: the
//!   bus's CPU per message per node and redis-server's CPU per message.
//!
//! The result is cached as JSON with the machine's description, so a plan
//! is recomputed without measuring again.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use serde::{Deserialize, Serialize};

use super::model::{ClusterCost, Costs, RateFactor, SizeCost};
use crate::{connect, fanout, report::Env, sys};

/// How long and how hard calibration runs go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Effort {
    /// Connections of the connect ramp.
    pub idle_connections: usize,
    /// Members in all rooms of each fanout run.
    pub members: usize,
    /// Deliveries per second each fanout run aims at.
    pub deliveries_per_sec: f64,
    /// Seconds each fanout run measures (after its warm-up).
    pub seconds: f64,
}

impl Effort {
    /// The default: long enough for CPU figures within a few percent.
    pub fn full() -> Effort {
        Effort {
            idle_connections: 8000,
            members: 1000,
            deliveries_per_sec: 20_000.0,
            seconds: 6.0,
        }
    }

    /// A few seconds in all (`--quick`, what `make test` runs).
    pub fn quick() -> Effort {
        Effort {
            idle_connections: 300,
            members: 100,
            deliveries_per_sec: 1000.0,
            seconds: 1.0,
        }
    }
}

/// A cached calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// The machine and build it was measured on.
    pub env: Env,
    /// How it was measured.
    pub effort: Effort,
    /// The costs.
    pub costs: Costs,
    /// What each figure came from.
    pub sources: Vec<String>,
}

impl Calibration {
    /// Read a cached calibration.
    pub fn read(path: &Path) -> anyhow::Result<Calibration> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).with_context(|| format!("calibration {}", path.display()))
    }
}

/// How long a started broker is left before its base RSS is read.
const SETTLE: Duration = Duration::from_millis(1500);

/// Most messages per second a calibration run publishes: small rooms
/// reach the deliveries target at a lower rate, not by saturating the
/// broker with publishes.
const MAX_PUBLISH_RATE: f64 = 2000.0;

/// The JWT secret of the brokers `plan` starts.
pub const SECRET: &str = "loadgen-plan-calibration-secret-0123456789";

/// Child processes `plan` started: brokers and a redis-server.
pub struct Fleet {
    children: Vec<Child>,
    /// The brokers' base URLs.
    pub urls: Vec<String>,
    /// redis-server's PID, if one runs.
    pub redis_pid: Option<u32>,
    _dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Core 0 for the servers when the machine has two or more.
fn pinned(program: &Path) -> Command {
    let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    if two && which("taskset") {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Whether a two-node calibration can run here.
pub fn redis_available() -> bool {
    which("redis-server")
}

impl Fleet {
    /// Start `nodes` brokers (on a Redis bus if more than one).
    pub async fn start(shoal: &Path, nodes: usize) -> anyhow::Result<Fleet> {
        let dir = tempfile::tempdir()?;
        let mut fleet = Fleet {
            children: vec![],
            urls: vec![],
            redis_pid: None,
            _dir: tempfile::tempdir()?,
        };
        let mut bus = vec![];
        if nodes > 1 {
            let port = free_port()?;
            let child = pinned(Path::new("redis-server"))
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .context("starting redis-server")?;
            fleet.redis_pid = Some(child.id());
            fleet.children.push(child);
            wait_port(port).await?;
            bus = vec![
                "--bus".to_string(),
                "redis".into(),
                "--redis-url".into(),
                format!("redis://127.0.0.1:{port}"),
            ];
        }
        for i in 0..nodes {
            let port = free_port()?;
            let data = dir.path().join(format!("node{i}"));
            let child = pinned(shoal)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data")
                .arg(&data)
                // Presence off: a room's joins would otherwise cost a frame
                // to every member already in it (n² for a room filling up
                // at once), a join-time cost the model leaves out.
                .args([
                    "--log",
                    "warn",
                    "--namespace",
                    "live:persist=off,presence=off",
                ])
                .args(["--namespace", "stored:presence=off"])
                .args(["--rate-limit", "1000000", "--rate-burst", "1000000"])
                .args(["--handshake-rate", "0", "--node-id", &format!("plan{i}")])
                .args(&bus)
                .env("SHOAL_JWT_SECRET", SECRET)
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", shoal.display()))?;
            fleet.children.push(child);
            let url = format!("http://127.0.0.1:{port}");
            wait_port(port).await?;
            fleet.urls.push(url);
        }
        fleet._dir = dir;
        // A clustered node reports healthy once it reached the bus.
        let http = reqwest::Client::new();
        for u in &fleet.urls {
            for _ in 0..100 {
                if http
                    .get(format!("{u}/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Start-up allocations (the store's, the runtime's) are returned
        // to the OS only once the broker's threads allocate and free again:
        // a burst of short-lived connections, then a pause, and the base
        // RSS read after that is the one load adds to.
        let scratch = tempfile::tempdir()?;
        ramp(&fleet.urls, scratch.path(), "warmup", 200, 1, 0.2).await?;
        tokio::time::sleep(SETTLE).await;
        Ok(fleet)
    }

    /// The brokers' total CPU seconds and their RSS.
    pub async fn sample(&self) -> (f64, Vec<f64>) {
        let s = sys::scrape(&reqwest::Client::new(), &self.urls, &[]).await;
        (
            s.iter().map(|b| b.cpu_seconds).sum(),
            s.iter().map(|b| b.rss_bytes).collect(),
        )
    }
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("nothing listens on port {port}")
}

/// Bytes per connection: the least-squares slope of broker RSS against
/// open connections over a ramp's steps (the base, and the megabytes the
/// allocator hands back now and then, fall out of it).
pub fn rss_slope(steps: &[connect::ConnectStep]) -> Option<f64> {
    let n = steps.len() as f64;
    if steps.len() < 2 {
        return None;
    }
    let sx: f64 = steps.iter().map(|s| s.connections).sum();
    let sy: f64 = steps.iter().map(|s| s.broker_rss_bytes).sum();
    let sxx: f64 = steps.iter().map(|s| s.connections * s.connections).sum();
    let sxy: f64 = steps
        .iter()
        .map(|s| s.connections * s.broker_rss_bytes)
        .sum();
    let d = n * sxx - sx * sx;
    (d > 0.0).then(|| ((n * sxy - sx * sy) / d).max(0.0))
}

/// Steps of a memory ramp.
pub const RAMP_STEPS: usize = 4;

/// Parse a subcommand's options from arguments, as the CLI would.
fn opts<T: clap::Args>(args: &[String]) -> anyhow::Result<T> {
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        a: A,
    }
    let mut v = vec!["loadgen".to_string()];
    v.extend_from_slice(args);
    Ok(Wrap::<T>::try_parse_from(v)?.a)
}

fn common(urls: &[String], dir: &Path, name: &str) -> Vec<String> {
    let mut a = vec![];
    for u in urls {
        a.push("--url".to_string());
        a.push(u.clone());
    }
    a.extend([
        "--jwt-secret".to_string(),
        SECRET.into(),
        "--quiet".into(),
        "--out".into(),
        dir.join(format!("{name}.json")).display().to_string(),
    ]);
    a
}

/// A connect ramp to `connections` at 2,000/s in `steps` steps, held
/// `hold` seconds: its report.
pub async fn ramp(
    urls: &[String],
    dir: &Path,
    name: &str,
    connections: usize,
    steps: usize,
    hold: f64,
) -> anyhow::Result<connect::ConnectReport> {
    let mut a = common(urls, dir, name);
    a.extend([
        "--connections".to_string(),
        connections.to_string(),
        "--connect-rate".into(),
        "2000".into(),
        "--step".into(),
        (connections / steps.max(1)).max(1).to_string(),
        "--hold".into(),
        format!("{hold}"),
    ]);
    let o: connect::ConnectOpts = opts(&a)?;
    connect::run(&o).await
}

/// One fanout run of calibration or verification.
pub struct Run<'a> {
    /// Its name (result file, room prefix).
    pub name: String,
    /// Members per room.
    pub size: usize,
    /// Members in all rooms (one publisher per room).
    pub members: usize,
    /// Deliveries per second in all.
    pub deliveries: f64,
    /// Seconds measured.
    pub seconds: f64,
    /// Namespace: `live` (unstored) or `stored`, both without presence.
    pub namespace: Option<&'a str>,
    /// JSON frames instead of MessagePack.
    pub json: bool,
}

impl Run<'static> {
    /// A calibration run: `effort`'s deliveries/s and seconds, in
    /// MessagePack.
    pub fn calibration(
        name: impl Into<String>,
        size: usize,
        members: usize,
        effort: &Effort,
        namespace: &'static str,
    ) -> Run<'static> {
        Run {
            name: name.into(),
            size,
            members,
            deliveries: effort.deliveries_per_sec,
            seconds: effort.seconds,
            namespace: Some(namespace),
            json: false,
        }
    }

    /// The same run with JSON frames.
    pub fn json(self) -> Run<'static> {
        Run { json: true, ..self }
    }
}

/// Run `run` against the brokers at `urls`, results in `dir`.
pub async fn fanout_run(
    urls: &[String],
    dir: &Path,
    run: Run<'_>,
) -> anyhow::Result<fanout::FanoutReport> {
    let Run {
        name,
        size,
        members,
        deliveries,
        seconds,
        namespace,
        json,
    } = run;
    let name = name.as_str();
    let rooms = (members / size).max(1);
    let rate = (deliveries / size as f64).clamp(1.0, MAX_PUBLISH_RATE);
    let mut a = common(urls, dir, name);
    a.extend([
        "--rooms".to_string(),
        rooms.to_string(),
        "--members".into(),
        size.to_string(),
        "--publishers".into(),
        rooms.to_string(),
        "--rate".into(),
        format!("{rate}"),
        "--duration".into(),
        format!("{seconds}"),
        "--warmup".into(),
        format!("{}", (seconds / 4.0).clamp(0.5, 2.0)),
        "--prefix".into(),
        format!("{name}-{}", std::process::id()),
    ]);
    if json {
        a.extend(["--encoding".to_string(), "json".into()]);
    }
    if let Some(ns) = namespace {
        a.extend(["--namespace".to_string(), ns.to_string()]);
    }
    let o: fanout::FanoutOpts = opts(&a)?;
    let r = fanout::run(&o).await?;
    anyhow::ensure!(
        r.lost == 0,
        "calibration run {name} lost {} deliveries: the figures would be wrong",
        r.lost
    );
    Ok(r)
}

/// Broker CPU per message for each room size (persist=off), and the most
/// memory a connection in a room under traffic added.
async fn measure_sizes(
    one: &Fleet,
    dir: &Path,
    sizes: &[usize],
    effort: &Effort,
    sources: &mut Vec<String>,
) -> anyhow::Result<(Vec<SizeCost>, f64)> {
    let mut costs = vec![];
    let mut member_bytes: f64 = 0.0;
    for &size in sizes {
        let members = effort.members.max(size);
        let name = format!("size-{size}");
        let (_, before) = one.sample().await;
        let r = fanout_run(
            &one.urls,
            dir,
            Run::calibration(name.clone(), size, members, effort, "live"),
        )
        .await?;
        let per_delivery = r.broker_cpu_us_per_delivery;
        let conns = ((members / size).max(1) * size) as f64;
        let rss = r.broker_rss_bytes.first().copied().unwrap_or(0.0);
        let rss0 = before.first().copied().unwrap_or(rss);
        member_bytes = member_bytes.max((rss - rss0) / conns);
        sources.push(format!(
            "rooms of {size}: fanout, {} rooms, {:.0} msg/s = {:.0} deliveries/s for {} s, persist=off: {per_delivery:.2} µs broker CPU per delivery, p99 {:.2} ms",
            (members / size).max(1),
            r.achieved_rate,
            r.deliveries_per_sec,
            effort.seconds,
            r.latency.p99
        ));
        costs.push(SizeCost {
            size,
            cpu_us_per_msg: per_delivery * size as f64,
            cpu_us_per_delivery: per_delivery,
            p99_ms: r.latency.p99,
            deliveries_per_sec: r.deliveries_per_sec,
        });
    }
    Ok((costs, member_bytes))
}

/// Measure room sizes a cached calibration lacks, and add them to it.
pub async fn extend(shoal: &Path, cal: &mut Calibration, sizes: &[usize]) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let one = Fleet::start(shoal, 1).await?;
    let (more, member_bytes) =
        measure_sizes(&one, scratch.path(), sizes, &cal.effort, &mut cal.sources).await?;
    cal.costs.sizes.extend(more);
    cal.costs.sizes.sort_by_key(|c| c.size);
    cal.costs.member_conn_bytes = cal.costs.member_conn_bytes.max(member_bytes);
    Ok(())
}

/// Measure everything (see the module docs).
pub async fn calibrate(
    shoal: &Path,
    sizes: &[usize],
    stored_size: usize,
    effort: &Effort,
    cluster: bool,
) -> anyhow::Result<Calibration> {
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path();
    let mut sources = vec![];
    let one = Fleet::start(shoal, 1).await?;
    // Idle connections: RSS slope and handshake CPU.
    let (cpu0, rss0) = one.sample().await;
    let base_rss = rss0.first().copied().unwrap_or(0.0);
    let cr = ramp(
        &one.urls,
        dir,
        "connect",
        effort.idle_connections,
        RAMP_STEPS,
        1.0,
    )
    .await?;
    let (cpu1, _) = one.sample().await;
    anyhow::ensure!(cr.established > 0, "no connection established");
    let idle_bytes = rss_slope(&cr.steps).unwrap_or(0.0);
    let handshake_us = (cpu1 - cpu0) / cr.established as f64 * 1e6;
    sources.push(format!(
        "idle memory and handshakes: connect ramp to {} connections at 2,000/s: RSS slope over its {} steps {:.0} B/connection, {:.0} µs broker CPU per handshake (hold included)",
        cr.established, cr.steps.len(), idle_bytes, handshake_us
    ));
    // Per room size, unstored.
    let (mut costs, member_bytes) = measure_sizes(&one, dir, sizes, effort, &mut sources).await?;
    costs.sort_by_key(|c| c.size);
    // The rate dependence: rooms of 10 at a tenth of the deliveries (fewer
    // frames per wake-up and write cost more each).
    let reference = costs.iter().find(|c| c.size == 10).cloned();
    let low_rate = match &reference {
        Some(high) => {
            let low = effort.deliveries_per_sec / 10.0;
            let r = fanout_run(
                &one.urls,
                dir,
                Run {
                    deliveries: low,
                    ..Run::calibration("size-10-low", 10, effort.members.max(10), effort, "live")
                },
            )
            .await?;
            let factor = r.broker_cpu_us_per_delivery / high.cpu_us_per_delivery.max(1e-9);
            sources.push(format!(
                "rate dependence: rooms of 10 at {:.0} deliveries/s: {:.2} µs per delivery, {factor:.2}× the figure at {:.0}/s (interpolated in log(deliveries/s per node) between the two, clamped outside)",
                r.deliveries_per_sec, r.broker_cpu_us_per_delivery, high.deliveries_per_sec
            ));
            Some(RateFactor {
                low_deliveries_per_sec: r.deliveries_per_sec,
                low_factor: factor.max(1.0),
                high_deliveries_per_sec: high.deliveries_per_sec,
            })
        }
        None => None,
    };
    // JSON clients: rooms of 10 again with JSON frames.
    let json_factor = match &reference {
        Some(high) => {
            let r = fanout_run(
                &one.urls,
                dir,
                Run::calibration("size-10-json", 10, effort.members.max(10), effort, "live").json(),
            )
            .await?;
            let f = r.broker_cpu_us_per_delivery / high.cpu_us_per_delivery.max(1e-9);
            sources.push(format!(
                "JSON: rooms of 10 with JSON frames: {:.2} µs per delivery, {f:.2}× MessagePack",
                r.broker_cpu_us_per_delivery
            ));
            Some(f)
        }
        None => None,
    };
    // Group commit: the same load, stored.
    let live = costs
        .iter()
        .find(|c| c.size == stored_size)
        .map_or(0.0, |c| c.cpu_us_per_msg);
    let members = effort.members.max(stored_size);
    let r = fanout_run(
        &one.urls,
        dir,
        Run::calibration("stored", stored_size, members, effort, "stored"),
    )
    .await?;
    let stored = r.broker_cpu_us_per_delivery * stored_size as f64;
    let commit = (stored - live).max(0.0);
    sources.push(format!(
        "group commit: the rooms-of-{stored_size} run again in a stored namespace: {stored:.1} µs per message against {live:.1} unstored, {commit:.1} µs per stored message"
    ));
    drop(one);
    // Two nodes on Redis.
    let cluster = if cluster && redis_available() {
        let two = Fleet::start(shoal, 2).await?;
        let size = stored_size;
        let redis0 = two
            .redis_pid
            .map_or(0.0, |p| sys::cpu_seconds_of(&p.to_string()));
        let r = fanout_run(
            &two.urls,
            dir,
            Run::calibration("cluster", size, members, effort, "live"),
        )
        .await?;
        let redis1 = two
            .redis_pid
            .map_or(0.0, |p| sys::cpu_seconds_of(&p.to_string()));
        let both = r.broker_cpu_us_per_delivery * size as f64;
        let receivers = (size as f64).min(2.0);
        let per_node = ((both - live) / receivers).max(0.0);
        let redis_us = (redis1 - redis0) / r.sent.max(1) as f64 * 1e6;
        sources.push(format!(
            "cluster: two nodes on one redis-server, rooms of {size} spread over both: {both:.1} µs broker CPU per message (both nodes) against {live:.1} on one node: {per_node:.1} µs per message per node; redis-server {redis_us:.1} µs per message (connects and joins included)"
        ));
        // Memory per connection on a cluster node (each user also holds
        // a bus subscription): the slope of a ramp over both nodes.
        let cr = ramp(
            &two.urls,
            dir,
            "cluster-connect",
            effort.idle_connections,
            RAMP_STEPS,
            1.0,
        )
        .await?;
        let conn_bytes = rss_slope(&cr.steps).unwrap_or(0.0);
        sources.push(format!(
            "cluster memory: connect ramp to {} connections over both nodes: RSS slope {conn_bytes:.0} B per connection",
            cr.established
        ));
        // Stored in a cluster: the hot history is Redis's stream and each
        // node archives, a different path from one node's group commit.
        let r = fanout_run(
            &two.urls,
            dir,
            Run::calibration("cluster-stored", size, members, effort, "stored"),
        )
        .await?;
        let stored_both = r.broker_cpu_us_per_delivery * size as f64;
        let store_us = (stored_both - both).max(0.0);
        sources.push(format!(
            "cluster, stored: the same two-node run in a stored namespace: {stored_both:.1} µs per message (both nodes), {store_us:.1} µs per stored message over the unstored run"
        ));
        Some(ClusterCost {
            size,
            bus_cpu_us_per_msg_per_node: per_node,
            redis_cpu_us_per_msg: redis_us,
            store_cpu_us_per_msg: store_us,
            conn_bytes,
        })
    } else {
        sources.push("cluster: not measured (no redis-server, or --no-cluster)".into());
        None
    };
    Ok(Calibration {
        env: Env::collect(),
        effort: effort.clone(),
        costs: Costs {
            base_rss_bytes: base_rss,
            idle_conn_bytes: idle_bytes,
            member_conn_bytes: member_bytes.max(0.0),
            handshake_cpu_us: handshake_us.max(0.0),
            sizes: costs,
            commit_cpu_us_per_msg: commit,
            cluster,
            rate: low_rate,
            json_factor,
        },
        sources,
    })
}

/// The default `shoal` binary: beside this one.
pub fn default_shoal() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("shoal")))
        .unwrap_or_else(|| PathBuf::from("shoal"))
}
