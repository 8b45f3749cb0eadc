//! `plan`: capacity planning. For a workload (connections, room sizes,
//! message rates, stored share, the nodes to run on) it answers how many
//! nodes, what limits them, and what Redis and PostgreSQL must carry, from
//! costs measured on this machine (`calibrate`) through a model (`model`),
//! and with `--verify` it checks the model against a scaled-down run of
//! the workload here.
//!
//! Examples (`--example`, files in `loadgen/workloads/`): `chat-200k` (the
//! 200,000 users in rooms of about 20 sending a message a minute),
//! `live-wide` (rooms of 1,000), `support-stored` (small rooms, every
//! message stored).

pub mod calibrate;
pub mod model;
pub mod workload;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use self::{
    calibrate::{Calibration, Effort},
    model::{Limit, Plan},
    workload::Workload,
};

/// Options of `plan`.
#[derive(Debug, Clone, Args)]
pub struct PlanOpts {
    /// Workload file (TOML; see loadgen/workloads/ for the fields).
    #[arg(long, conflicts_with = "example")]
    pub workload: Option<PathBuf>,

    /// A shipped example workload: chat-200k, live-wide or support-stored.
    #[arg(long)]
    pub example: Option<String>,

    /// Calibration cache: read if present (unless --recalibrate), written
    /// after measuring. Default: results/calibration-<host>.json.
    #[arg(long)]
    pub calibration: Option<PathBuf>,

    /// Measure again even if the cache exists.
    #[arg(long)]
    pub recalibrate: bool,

    /// Short calibration and verification runs (seconds, not a minute;
    /// figures within tens of percent): what `make test` runs.
    #[arg(long)]
    pub quick: bool,

    /// Skip the two-node (Redis) calibration.
    #[arg(long)]
    pub no_cluster: bool,

    /// The `shoal` binary to calibrate (default: beside this loadgen).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,

    /// Also run the workload scaled down on this machine and compare the
    /// model's broker CPU and memory with what was measured.
    #[arg(long)]
    pub verify: bool,

    /// Connections of the scaled-down verification run (enough that what
    /// they add to each node's memory is measurable).
    #[arg(long, default_value_t = 12000)]
    pub verify_connections: usize,

    /// Broker nodes of the verification run (2 uses a redis-server).
    #[arg(long, default_value_t = 2)]
    pub verify_nodes: usize,

    /// Deliveries per second of each verification run (one per room
    /// class and stored/unstored part): above measurement noise, within
    /// what loadgen's core reads.
    #[arg(long, default_value_t = 10_000.0)]
    pub verify_deliveries: f64,

    /// Output directory for plan.md, plan.json and the charts (default
    /// results/plan-<workload>-<time>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One verification run against the model.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What ran.
    pub run: String,
    /// Broker CPU the model predicts, cores (all nodes).
    pub predicted_cores: f64,
    /// Broker CPU measured, cores.
    pub measured_cores: f64,
    /// Broker RSS per node the model predicts, bytes.
    pub predicted_rss_bytes: f64,
    /// Broker RSS per node measured (mean), bytes.
    pub measured_rss_bytes: f64,
}

/// Most connections in one verification run.
const VERIFY_MAX_MEMBERS: usize = 3000;

/// Most messages per second a verification run publishes.
const VERIFY_MAX_PUBLISH_RATE: f64 = 2000.0;

/// Memory per connection: the model's figure against the slope of a ramp.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryCheck {
    /// What ran.
    pub run: String,
    /// The model's bytes per connection.
    pub predicted_bytes_per_connection: f64,
    /// RSS slope between the ramp's two steps, all nodes, per connection.
    pub measured_bytes_per_connection: f64,
    /// The model's RSS per node at the top of the ramp.
    pub predicted_rss_per_node_bytes: f64,
    /// Measured RSS per node there (mean).
    pub measured_rss_per_node_bytes: f64,
}

/// The verification's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Nodes and connections it ran with.
    pub nodes: usize,
    /// Connections.
    pub connections: usize,
    /// Deliveries per second of each run.
    pub deliveries_per_sec: f64,
    /// Each run.
    pub checks: Vec<Check>,
    /// Total predicted / measured broker CPU − 1.
    pub cpu_error: f64,
    /// Predicted / measured memory per connection − 1 (the memory check).
    pub memory_error: f64,
    /// The memory check.
    pub memory: MemoryCheck,
    /// Both within ±20%.
    pub agrees: bool,
}

/// What `plan` writes.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// The workload.
    pub workload: Workload,
    /// The plan.
    pub plan: Plan,
    /// The calibration it used.
    pub calibration: Calibration,
    /// Where the calibration came from (measured now, or the cache file).
    pub calibration_source: String,
    /// The verification, if run.
    pub verification: Option<Verification>,
}

/// Room sizes calibrated whatever the workload (so one calibration serves
/// the examples, and the line through them spans small to wide rooms).
pub const STANDARD_SIZES: [usize; 4] = [2, 10, 100, 1000];

/// Room sizes to calibrate: the workload's and the standard ones.
fn sizes_for(w: &Workload, quick: bool) -> Vec<usize> {
    let mut s: Vec<usize> = w.rooms.iter().map(|r| r.size).collect();
    // Quick runs measure only what the workload needs, and 10 for the line.
    if quick {
        s.push(10);
    } else {
        s.extend(STANDARD_SIZES);
    }
    s.sort_unstable();
    s.dedup();
    s
}

/// Run `plan`.
pub async fn run(o: &PlanOpts) -> anyhow::Result<(PlanReport, PathBuf)> {
    let w = match (&o.workload, &o.example) {
        (Some(p), _) => Workload::read(p)?,
        (None, Some(e)) => Workload::example(e)?,
        (None, None) => anyhow::bail!("give --workload FILE or --example NAME"),
    };
    let shoal = o.shoal_bin.clone().unwrap_or_else(calibrate::default_shoal);
    let cache = o.calibration.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "host".into());
        PathBuf::from(format!("results/calibration-{}.json", host.trim()))
    });
    let effort = if o.quick {
        Effort::quick()
    } else {
        Effort::full()
    };
    let wanted = sizes_for(&w, o.quick);
    let cached = if o.recalibrate {
        None
    } else {
        // A cache of the other effort (quick or full) is not this one's.
        Calibration::read(&cache)
            .ok()
            .filter(|c| c.effort.seconds == effort.seconds)
    };
    let (cal, source) = match cached {
        Some(mut c) => {
            let missing: Vec<usize> = wanted
                .iter()
                .copied()
                .filter(|s| !c.costs.sizes.iter().any(|k| k.size == *s))
                .collect();
            if missing.is_empty() {
                (c, format!("cache {}", cache.display()))
            } else {
                anyhow::ensure!(
                    shoal.is_file(),
                    "no shoal binary at {} to measure rooms of {missing:?} (cargo build --release, or --shoal-bin)",
                    shoal.display()
                );
                tracing::info!(sizes = ?missing, "calibrating the sizes the cache lacks");
                calibrate::extend(&shoal, &mut c, &missing).await?;
                save(&cache, &c)?;
                (
                    c,
                    format!(
                        "cache {} (rooms of {missing:?} measured now and added)",
                        cache.display()
                    ),
                )
            }
        }
        None => {
            anyhow::ensure!(
                shoal.is_file(),
                "no shoal binary at {} (cargo build --release, or --shoal-bin)",
                shoal.display()
            );
            tracing::info!(sizes = ?wanted, "calibrating {}", shoal.display());
            let c = calibrate::calibrate(&shoal, &wanted, w.rooms[0].size, &effort, !o.no_cluster)
                .await?;
            save(&cache, &c)?;
            (c, format!("measured now, cached in {}", cache.display()))
        }
    };
    let plan = model::plan(&w, &cal.costs, &w.node);
    let verification = if o.verify {
        Some(verify(o, &w, &cal, &shoal, &effort).await?)
    } else {
        None
    };
    let report = PlanReport {
        workload: w,
        plan,
        calibration: cal,
        calibration_source: source,
        verification,
    };
    let dir = o.out.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from(format!("results/plan-{}-{stamp}", report.workload.name))
    });
    write(&report, &dir)?;
    Ok((report, dir))
}

/// Write the calibration cache (not with write_json: it carries its own
/// `env`).
fn save(path: &std::path::Path, c: &Calibration) -> anyhow::Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(c)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Run the workload scaled down here and compare with the model.
async fn verify(
    o: &PlanOpts,
    w: &Workload,
    cal: &Calibration,
    shoal: &std::path::Path,
    effort: &Effort,
) -> anyhow::Result<Verification> {
    let nodes = if o.verify_nodes > 1 && calibrate::redis_available() {
        o.verify_nodes
    } else {
        1
    };
    let connections = if o.quick {
        o.verify_connections.min(200)
    } else {
        o.verify_connections
    };
    // The scaled workload without typing (fanout sends messages only),
    // handshakes (they happen before the measured window) and JSON
    // clients (the runs speak MessagePack). Each room
    // class (and its stored part) runs on its own at a fixed load, well
    // above noise and within what loadgen's one core reads.
    let mut small = w.scaled(connections as f64);
    small.typing_per_message = 0.0;
    small.reconnects_per_connection_per_hour = 0.0;
    small.json_share = 0.0;
    let deliveries = if o.quick { 1000.0 } else { o.verify_deliveries };
    let scratch = tempfile::tempdir()?;
    let mut checks = vec![];
    let seconds = effort.seconds.max(if o.quick { 1.0 } else { 8.0 });
    for r in &small.rooms {
        for (stored, share) in [
            (false, 1.0 - small.stored_share),
            (true, small.stored_share),
        ] {
            if share <= 0.0 {
                continue;
            }
            // This class's connections and messages, as a workload of its own.
            let mut part = small.clone();
            part.connections = (connections as f64 * r.share * share).max(r.size as f64);
            part.rooms = vec![workload::RoomClass {
                size: r.size,
                share: 1.0,
            }];
            part.stored_share = if stored { 1.0 } else { 0.0 };
            // At most VERIFY_MAX_MEMBERS in a run: past a few thousand
            // members in a handful of rooms, loadgen's own publishers lag.
            let members =
                ((part.connections as usize).min(VERIFY_MAX_MEMBERS) / r.size).max(1) * r.size;
            // Small rooms reach the deliveries at a publish rate the
            // stored cluster path on one shared core can take.
            let msgs = (deliveries / r.size as f64).min(VERIFY_MAX_PUBLISH_RATE);
            let name = format!(
                "verify-{}-{}",
                r.size,
                if stored { "stored" } else { "live" }
            );
            // A fresh fleet per run: its settled base RSS is what the
            // run's connections add to.
            let fleet = calibrate::Fleet::start(shoal, nodes).await?;
            let rep = calibrate::fanout_run(
                &fleet.urls,
                scratch.path(),
                calibrate::Run {
                    name: name.clone(),
                    size: r.size,
                    members,
                    deliveries: msgs * r.size as f64,
                    seconds,
                    namespace: Some(if stored { "stored" } else { "live" }),
                    json: false,
                },
            )
            .await
            .with_context(|| name.clone())?;
            let measured: f64 = rep.broker_cpu_percent.iter().sum::<f64>() / 100.0;
            let rss =
                rep.broker_rss_bytes.iter().sum::<f64>() / rep.broker_rss_bytes.len().max(1) as f64;
            // The model for exactly what ran (room rounding, achieved rate).
            let mut ran = part.clone();
            ran.connections = members as f64;
            ran.messages_per_connection_per_minute = rep.achieved_rate * 60.0 / members as f64;
            let predicted_ran = model::load(&ran, &cal.costs, nodes);
            checks.push(Check {
                run: format!(
                    "{name}: {members} connections in rooms of {}, {:.0} msg/s, {} node(s)",
                    r.size, rep.achieved_rate, nodes
                ),
                predicted_cores: predicted_ran.broker_cores,
                measured_cores: measured,
                predicted_rss_bytes: predicted_ran.rss_per_node_bytes,
                measured_rss_bytes: rss,
            });
        }
    }
    let (p, m): (f64, f64) = checks.iter().fold((0.0, 0.0), |(p, m), c| {
        (p + c.predicted_cores, m + c.measured_cores)
    });
    let cpu_error = p / m.max(1e-9) - 1.0;
    // Memory: RSS read across separate runs moves by megabytes with what
    // the allocator returns between them, so the connections' share is
    // measured as a slope within one ramp: fresh brokers, all the
    // verification's connections in two steps, held.
    let fleet = calibrate::Fleet::start(shoal, nodes).await?;
    let cr = calibrate::ramp(
        &fleet.urls,
        scratch.path(),
        "memory",
        connections,
        calibrate::RAMP_STEPS,
        1.0,
    )
    .await?;
    drop(fleet);
    let per_conn = cal.costs.conn_bytes(nodes);
    let slope =
        calibrate::rss_slope(&cr.steps).context("the memory ramp reported fewer than two steps")?;
    let top = cr.steps.last().cloned().context("no ramp step")?;
    let memory_error = per_conn / slope.max(1.0) - 1.0;
    let memory = MemoryCheck {
        run: format!(
            "{} connections on {nodes} fresh node(s), ramped in {} steps and held",
            cr.established,
            cr.steps.len()
        ),
        predicted_bytes_per_connection: per_conn,
        measured_bytes_per_connection: slope,
        predicted_rss_per_node_bytes: cal.costs.base_rss_bytes
            + top.connections / nodes as f64 * per_conn,
        measured_rss_per_node_bytes: top.broker_rss_bytes / nodes as f64,
    };
    Ok(Verification {
        nodes,
        connections,
        deliveries_per_sec: deliveries,
        memory,
        checks,
        cpu_error,
        memory_error,
        agrees: cpu_error.abs() <= 0.2 && memory_error.abs() <= 0.2,
    })
}

fn limit_name(l: Limit) -> &'static str {
    match l {
        Limit::Cpu => "broker CPU",
        Limit::Memory => "broker memory",
        Limit::Connections => "connections per node (file descriptors)",
    }
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

/// Write plan.md, plan.json and the charts into `dir`.
fn write(r: &PlanReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::report::write_json(&dir.join("plan.json"), r)?;
    let (w, p, c) = (&r.workload, &r.plan, &r.calibration.costs);
    let l = &p.load;
    // CPU and memory per node against the number of nodes.
    let top = (p.nodes * 2).max(4);
    let cpu: Vec<(f64, f64)> = (1..=top)
        .map(|n| (n as f64, model::load(w, c, n).cores_per_node))
        .collect();
    let cap: Vec<(f64, f64)> = (1..=top)
        .map(|n| (n as f64, w.node.cores * w.node.target_cpu))
        .collect();
    crate::report::plot_xy(
        &dir.join("cpu.svg"),
        &format!("{}: broker CPU per node", w.name),
        "nodes",
        "cores",
        &[("CPU per node".into(), cpu), ("target".into(), cap)],
    )?;
    let mem: Vec<(f64, f64)> = (1..=top)
        .map(|n| (n as f64, mib(model::load(w, c, n).rss_per_node_bytes)))
        .collect();
    let mcap: Vec<(f64, f64)> = (1..=top)
        .map(|n| (n as f64, w.node.memory_gib * 1024.0 * model::MEMORY_SHARE))
        .collect();
    crate::report::plot_xy(
        &dir.join("memory.svg"),
        &format!("{}: broker memory per node", w.name),
        "nodes",
        "MiB",
        &[("RSS per node".into(), mem), ("80% of memory".into(), mcap)],
    )?;
    let mut md = String::new();
    md += &format!("# Capacity plan: {}\n\n", w.name);
    md += &format!(
        "**{} node(s) of {} cores and {} GiB**, limited by **{}** (CPU alone needs {}, memory {}, connections {}). Headroom: {:.2}× this workload before the first limit.\n\n",
        p.nodes,
        w.node.cores,
        w.node.memory_gib,
        limit_name(p.limited_by),
        p.nodes_for_cpu,
        p.nodes_for_memory,
        p.nodes_for_connections,
        p.headroom
    );
    md += "| per node at the peak | value |\n|---|---|\n";
    md += &format!(
        "| connections | {:.0} |\n| broker CPU | {:.2} cores ({:.0}% of {}; target {:.0}%) |\n| broker memory | {:.0} MiB ({:.0}% of {} GiB) |\n",
        l.connections_per_node,
        l.cores_per_node,
        p.cpu_utilisation * 100.0,
        w.node.cores,
        w.node.target_cpu * 100.0,
        mib(l.rss_per_node_bytes),
        p.memory_utilisation * 100.0,
        w.node.memory_gib
    );
    md += "\n| whole deployment | value |\n|---|---|\n";
    md += &format!(
        "| messages published | {:.0}/s |\n| deliveries | {:.0}/s |\n| broker CPU | {:.2} cores: messages {:.2}, group commit {:.2}, bus {:.2}, handshakes {:.3} |\n",
        l.publishes_per_sec, l.deliveries_per_sec, l.broker_cores, l.message_cores, l.commit_cores, l.bus_cores, l.handshake_cores
    );
    if l.nodes > 1 {
        md += &format!(
            "| Redis | {:.0} commands/s (one script per publish or typing relay), {:.0} messages pushed to nodes/s, {:.2} cores of redis-server |\n| PostgreSQL (shared store) | {:.0} message rows/s (group-committed) |\n",
            l.redis_commands_per_sec, l.redis_pushes_per_sec, l.redis_cores, l.store_rows_per_sec
        );
    } else {
        md += "| Redis, PostgreSQL | none: one node runs on its embedded store and in-process bus |\n";
    }
    for warn in &p.warnings {
        md += &format!("\n> **Warning:** {warn}\n");
    }
    md += "\n![CPU per node](cpu.svg) ![memory per node](memory.svg)\n";
    md += "\n## Workload (input)\n\n";
    md += &format!(
        "- {:.0} concurrent connections ({:.0}% JSON), {} message(s) per connection per minute, {} B bodies, {:.0}% stored, {} typing events per message, {} reconnects per connection per hour{}\n",
        w.connections,
        w.json_share * 100.0,
        w.messages_per_connection_per_minute,
        w.payload_bytes,
        w.stored_share * 100.0,
        w.typing_per_message,
        w.reconnects_per_connection_per_hour,
        w.p99_ms.map_or(String::new(), |p| format!(", delivery p99 target {p} ms"))
    );
    for rc in &w.rooms {
        md += &format!(
            "- {:.0}% of connections in rooms of {}\n",
            rc.share * 100.0,
            rc.size
        );
    }
    md += &format!(
        "- nodes: {} cores, {} GiB, up to {:.0}% CPU and 80% memory, at most {:.0} connections each\n",
        w.node.cores,
        w.node.memory_gib,
        w.node.target_cpu * 100.0,
        w.node.max_connections_per_node
    );
    md += "\n## Measured inputs and assumptions\n\n";
    let e = &r.calibration.env;
    md += &format!(
        "Calibration: {} — on {} ({} CPUs, kernel {}, revision {}), broker pinned to core 0 and loadgen to core 1.\n\n",
        r.calibration_source,
        e.cpu_model,
        e.cpus,
        e.kernel,
        e.git_revision.as_deref().unwrap_or("unknown")
    );
    md += "| input | value |\n|---|---|\n";
    md += &format!(
        "| broker base RSS | {:.1} MiB |\n| memory per idle connection | {:.0} B |\n| memory per connection in rooms under traffic | {:.0} B |\n| broker CPU per handshake | {:.0} µs |\n| group commit per stored message | {:.1} µs |\n",
        mib(c.base_rss_bytes),
        c.idle_conn_bytes,
        c.member_conn_bytes,
        c.handshake_cpu_us,
        c.commit_cpu_us_per_msg
    );
    for s in &c.sizes {
        md += &format!(
            "| broker CPU per message, rooms of {} | {:.1} µs ({:.2} µs per delivery; p99 {:.2} ms at {:.0} deliveries/s) |\n",
            s.size, s.cpu_us_per_msg, s.cpu_us_per_delivery, s.p99_ms, s.deliveries_per_sec
        );
    }
    let (a, b) = c.line();
    md += &format!("| line through them (other sizes) | {a:.1} µs + {b:.2} µs × members |\n");
    if let Some(f) = c.json_factor {
        md += &format!("| JSON clients, per delivery | {f:.2}× MessagePack |\n");
    }
    if let Some(cl) = &c.cluster {
        md += &format!(
            "| bus, per message per node with members | {:.1} µs |\n| redis-server per message | {:.1} µs |\n| stored in a cluster, per message | {:.1} µs |\n| memory per connection on a cluster node | {:.0} B |\n",
            cl.bus_cpu_us_per_msg_per_node, cl.redis_cpu_us_per_msg, cl.store_cpu_us_per_msg, cl.conn_bytes
        );
    }
    md += "\nSources:\n\n";
    for s in &r.calibration.sources {
        md += &format!("- {s}\n");
    }
    md += "\nAssumptions: each message fans out to every member of its room (members spread over the nodes); presence (a frame to every member when someone joins or leaves) is a join-time cost left out, and calibration runs without it; typing events cost what a message to the same room costs, unstored; CPU per event does not depend on the rate (calibrated at tens of thousands of deliveries/s, where batching is modest); latency is not modelled, the calibration's p99 at its load is shown instead; a node's file-descriptor and `--max-connections` limit is `max_connections_per_node`.\n";
    if let Some(v) = &r.verification {
        md += &format!(
            "\n## Verification on this machine\n\nThe workload scaled to {} connections on {} node(s), each room class (and its stored part) run on its own at {:.0} deliveries/s on fresh brokers (typing and reconnects left out): predicted against measured broker CPU **{:+.1}%**, memory per connection **{:+.1}%** — {}.\n\n| run | CPU predicted | CPU measured | RSS/node predicted | RSS/node measured (end) |\n|---|---|---|---|---|\n",
            v.connections,
            v.nodes,
            v.deliveries_per_sec,
            v.cpu_error * 100.0,
            v.memory_error * 100.0,
            if v.agrees { "within 20%" } else { "**not within 20%**" }
        );
        for ch in &v.checks {
            md += &format!(
                "| {} | {:.3} cores | {:.3} cores | {:.1} MiB | {:.1} MiB |\n",
                ch.run,
                ch.predicted_cores,
                ch.measured_cores,
                mib(ch.predicted_rss_bytes),
                mib(ch.measured_rss_bytes),
            );
        }
        let m = &v.memory;
        md += &format!(
            "\nMemory: {}: the model's {:.0} B per connection against a measured slope of {:.0} B; RSS per node at the top {:.1} MiB predicted, {:.1} MiB measured. (RSS read across separate runs moves by megabytes with what the allocator hands back between them, which is why the connections' share is measured as a slope within one ramp.)\n",
            m.run,
            m.predicted_bytes_per_connection,
            m.measured_bytes_per_connection,
            mib(m.predicted_rss_per_node_bytes),
            mib(m.measured_rss_per_node_bytes)
        );
    }
    std::fs::write(dir.join("plan.md"), md)?;
    Ok(())
}
