//! `loadgen`: command-line front end for the Shoal load generator.
// The report table and result paths are this binary's output.
#![allow(clippy::print_stdout)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_loadgen::{capacity, connect, fanout, floor, gate, plan, report};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal load generator: open-loop publishers, coordinated-omission-free
/// latency percentiles, loss/duplication/reordering counts, JSON results
/// and SVG plots under results/.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about, long_about = None)]
struct Opt {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// R rooms × M members with P publishers at a fixed total rate; prints
    /// live progress and a percentile table.
    Fanout(fanout::FanoutOpts),
    /// Step the publish rate up until p99 passes the SLO or loss appears;
    /// reports the highest sustained deliveries/s.
    Capacity(capacity::CapacityOpts),
    /// Ramp to N connections; reports handshake latency, failures by cause
    /// and broker memory per connection.
    Connect(connect::ConnectOpts),
    /// Goose load test of the REST API (register, login, users, rooms,
    /// history); reports goose's per-request figures. Built with the `rest`
    /// cargo feature.
    #[cfg(feature = "rest")]
    Rest(shoal_loadgen::rest::RestOpts),
    /// Compare a result with a baseline and absolute bounds; exits 1 on
    /// regression with a table of what moved.
    Gate(gate::GateOpts),
    /// The kernel's floor for a fan-out's writes, with no broker: a pinned
    /// thread writes pre-encoded frames to N loopback sockets at a rate;
    /// reports its CPU per frame.
    Floor(floor::FloorOpts),
    /// Render SVG charts from result files: percentile spectrum (overlaid),
    /// latency over time, throughput against p99 across a capacity ramp.
    Report(report::ReportOpts),
    /// Capacity planning: how many nodes a workload needs and what limits
    /// them, from costs measured here (brokers it starts, pinned apart
    /// from loadgen; cached). --verify checks the model against a
    /// scaled-down run. Examples: `loadgen plan --example chat-200k`
    /// (200,000 users in rooms of ~20, a message a minute, 30% stored),
    /// `--example live-wide` (rooms of 1,000), `--example support-stored`
    /// (small rooms, all stored), or `--workload my.toml`.
    Plan(plan::PlanOpts),
}

fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    match &opt.cmd {
        Cmd::Gate(o) => {
            let v = gate::run(o)?;
            print!("{}", v.table);
            if v.failures.is_empty() {
                println!("gate: PASS");
                return Ok(());
            }
            println!("gate: FAIL\n  {}", v.failures.join("\n  "));
            std::process::exit(1);
        }
        Cmd::Report(o) => {
            for p in report::render(o)? {
                println!("{}", p.display());
            }
            return Ok(());
        }
        Cmd::Floor(o) => {
            let r = floor::run(o)?;
            if let Some(path) = &o.out {
                report::write_json(path, &r)?;
            }
            println!(
                "floor: {} frames of {} B to {} sockets, {} per write: writer {:.2} s CPU, {:.2} us per frame",
                r.frames, r.frame_size, r.sockets, r.batch, r.writer_cpu_seconds, r.cpu_us_per_frame
            );
            return Ok(());
        }
        _ => {}
    }
    if matches!(opt.cmd, Cmd::Plan(_))
        && std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
    {
        // Before the runtime starts: its threads inherit this affinity,
        // and the brokers plan starts run on core 0.
        if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.into_iter().nth(1)) {
            core_affinity::set_for_current(core);
        }
    }
    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOADGEN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let passed = rt.block_on(async {
        match opt.cmd {
            Cmd::Fanout(o) => {
                let r = fanout::run(&o).await?;
                let path = o.common.out.clone().unwrap_or_else(|| report::default_path("fanout"));
                report::write_json(&path, &r)?;
                let svg = path.with_extension("svg");
                report::plot_percentiles(
                    &svg,
                    &format!("fanout {}x{} @ {:.0} msg/s ({})", o.rooms, o.members, o.rate, o.common.encoding.name()),
                    &[("delivery", &r.latency_curve), ("fan-out completion", &r.fanout_curve)],
                )?;
                print!("{}", r.table());
                println!("results: {} {}", path.display(), svg.display());
                Ok::<bool, anyhow::Error>(r.passed())
            }
            Cmd::Capacity(o) => {
                let r = capacity::run(&o).await?;
                let path = o.fanout.common.out.clone().unwrap_or_else(|| report::default_path("capacity"));
                report::write_json(&path, &r)?;
                println!(
                    "capacity at p99 <= {} ms: {:.0} msg/s published, {:.0} deliveries/s",
                    r.slo_p99_ms, r.capacity_publish_rate, r.capacity_deliveries_per_sec
                );
                println!("results: {}", path.display());
                Ok(r.best.is_some())
            }
            Cmd::Connect(o) => {
                let r = connect::run(&o).await?;
                let path = o.common.out.clone().unwrap_or_else(|| report::default_path("connect"));
                report::write_json(&path, &r)?;
                if !o.common.quiet {
                    println!(
                        "established {}/{} at {:.0}/s; handshake p50 {:.3} ms p99 {:.3} ms; failures {:?}",
                        r.established, r.attempted, r.achieved_connect_rate, r.handshake.p50, r.handshake.p99, r.failures_by_cause
                    );
                    if let Some(s) = r.steps.last() {
                        println!("broker memory: {:.0} bytes per connection", s.bytes_per_connection);
                    }
                    println!("results: {}", path.display());
                }
                Ok(r.failures.is_empty())
            }
            #[cfg(feature = "rest")]
            Cmd::Rest(o) => {
                let r = shoal_loadgen::rest::run(&o).await?;
                let path = o.common.out.clone().unwrap_or_else(|| report::default_path("rest"));
                report::write_json(&path, &r)?;
                print!("{}", r.table());
                println!("results: {}", path.display());
                Ok(r.failures.is_empty())
            }
            Cmd::Plan(o) => {
                let (r, dir) = plan::run(&o).await?;
                let p = &r.plan;
                println!(
                    "{}: {} node(s) of {} cores / {} GiB, limited by {:?}; per node {:.0} connections, {:.2} cores, {:.0} MiB; headroom {:.2}x",
                    r.workload.name,
                    p.nodes,
                    r.workload.node.cores,
                    r.workload.node.memory_gib,
                    p.limited_by,
                    p.load.connections_per_node,
                    p.load.cores_per_node,
                    p.load.rss_per_node_bytes / (1u64 << 20) as f64,
                    p.headroom
                );
                for w in &p.warnings {
                    println!("warning: {w}");
                }
                if let Some(v) = &r.verification {
                    println!(
                        "verify ({} connections, {} node(s)): CPU {:+.1}%, memory {:+.1}%: {}",
                        v.connections,
                        v.nodes,
                        v.cpu_error * 100.0,
                        v.memory_error * 100.0,
                        if v.agrees { "within 20%" } else { "NOT within 20%" }
                    );
                }
                println!("report: {}", dir.join("plan.md").display());
                // --quick runs are too short for the 20% bound: they check
                // that planning works end to end, not the model.
                Ok(o.quick || r.verification.as_ref().is_none_or(|v| v.agrees))
            }
            Cmd::Gate(_) | Cmd::Report(_) | Cmd::Floor(_) => Ok(true),
        }
    })?;
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}
