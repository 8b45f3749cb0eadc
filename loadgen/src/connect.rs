//! `connect`: ramp to N connections at a set rate and hold them. Reports
//! handshake latency percentiles (TCP connect + upgrade + `hello`),
//! failures by cause, and broker memory per connection at each step.
//!
//! Client sockets are spread over `--source-ips` local addresses so one
//! run can pass the ~28k ephemeral ports per (source, destination) pair;
//! `--processes K` splits the run over K child processes so it can pass the
//! per-process open-file limit, and merges their results.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use clap::Args;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    client,
    stats::{self, Percentiles},
    sys,
    wire::Incoming,
    CommonOpts,
};

/// Options of the connect scenario.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ConnectOpts {
    /// Shared options.
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonOpts,

    /// Connections to open in total.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,

    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,

    /// Report memory and latency every this many connections.
    #[arg(long, default_value_t = 1000)]
    pub step: usize,

    /// Seconds to hold all connections open at the end.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,

    /// Split the run over this many loadgen processes (each opens
    /// connections/processes; use when past ~19,000 per process).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,

    /// Index offset for user names and source addresses (set for child processes).
    #[arg(long, default_value_t = 0, hide = true)]
    pub offset: usize,

    /// Gate: fail if more than this many connections fail.
    #[arg(long, default_value_t = 0)]
    pub max_failures: u64,
}

/// A step of the ramp.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectStep {
    /// Connections open at this step (as the broker reports them).
    pub connections: f64,
    /// Broker RSS in bytes.
    pub broker_rss_bytes: f64,
    /// (RSS - RSS before the run) / connections added.
    pub bytes_per_connection: f64,
    /// Handshake latency of this step's connections.
    pub handshake: Percentiles,
}

/// Result of a connect run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Scenario name.
    pub scenario: String,
    /// Connections attempted.
    pub attempted: u64,
    /// Connections established.
    pub established: u64,
    /// Failures by cause.
    pub failures_by_cause: BTreeMap<String, u64>,
    /// Handshake latency over the whole run.
    pub handshake: Percentiles,
    /// Recorded handshake latencies (µs value, count), for merging.
    pub handshake_raw: Vec<(u64, u64)>,
    /// Steps.
    pub steps: Vec<ConnectStep>,
    /// Achieved connection rate (per second).
    pub achieved_connect_rate: f64,
    /// Load generator CPU use, percent of one core.
    pub loadgen_cpu_percent: f64,
    /// Gate failures; empty when the run passed.
    pub failures: Vec<String>,
}

/// Run the scenario (in this process, or split over children).
pub async fn run(opts: &ConnectOpts) -> anyhow::Result<ConnectReport> {
    if opts.processes > 1 {
        return run_children(opts).await;
    }
    let c = &opts.common;
    let source_ips = c.source_ips_for(opts.connections);
    let wire = Arc::new(c.wire()?);
    let prefix = c.prefix();
    let http = reqwest::Client::new();
    let baseline = sys::scrape(&http, &c.urls, &c.pids).await;
    let base_rss: f64 = baseline.iter().map(|b| b.rss_bytes).sum();
    let base_conns: f64 = baseline.iter().map(|b| b.connections).sum();
    let established = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let step_hist = Arc::new(Mutex::new(stats::histogram()));
    let mut total_hist = stats::histogram();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let cpu0 = sys::own_cpu_seconds();
    let mut steps = Vec::new();
    let mut handles = Vec::new();
    let interval = Duration::from_secs_f64(1.0 / opts.connect_rate.max(0.001));
    for i in 0..opts.connections {
        let gi = i + opts.offset;
        tokio::time::sleep_until(start + interval * i as u32).await;
        let url = c.urls[gi % c.urls.len()].clone();
        let user = format!("{prefix}-c{gi}");
        let src = client::source_ip(gi, source_ips);
        let (wire, est, fails, hist, mut stop) = (
            wire.clone(),
            established.clone(),
            failures.clone(),
            step_hist.clone(),
            stop_rx.clone(),
        );
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let res =
                tokio::time::timeout(Duration::from_secs(15), wire.connect(&url, &user, src)).await;
            match res {
                Ok(Ok((mut ws, _))) => {
                    stats::record_ns(&mut hist.lock(), t.elapsed().as_nanos() as u64);
                    est.fetch_add(1, Ordering::Relaxed);
                    // Hold: read (answering pings) until told to stop.
                    loop {
                        let f = tokio::select! {
                            _ = stop.wait_for(|v| *v) => break,
                            f = ws.read_frame() => match f {
                                Ok(f) => f,
                                Err(_) => break,
                            },
                        };
                        if let Incoming::Reply(b) = wire.decode(&f.payload) {
                            let pong =
                                fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(b));
                            if ws.write_frame(pong).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Ok(Err(e)) => *fails.lock().entry(e.label()).or_insert(0) += 1,
                Err(_) => *fails.lock().entry("timeout".into()).or_insert(0) += 1,
            }
        }));
        if (i + 1) % opts.step == 0 || i + 1 == opts.connections {
            // Let this step's handshakes finish before sampling.
            let want = (i + 1) as u64;
            let settle = Instant::now() + Duration::from_secs(10);
            while established.load(Ordering::Relaxed) + failures.lock().values().sum::<u64>() < want
                && Instant::now() < settle
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let h = std::mem::replace(&mut *step_hist.lock(), stats::histogram());
            let _ = total_hist.add(&h);
            let now = sys::scrape(&http, &c.urls, &c.pids).await;
            let rss: f64 = now.iter().map(|b| b.rss_bytes).sum();
            // A server read through /proc (--pid) does not say how many
            // connections it holds: count ours.
            let conns: f64 = if c.pids.is_empty() {
                now.iter().map(|b| b.connections).sum()
            } else {
                established.load(Ordering::Relaxed) as f64
            };
            let step = ConnectStep {
                connections: conns,
                broker_rss_bytes: rss,
                bytes_per_connection: if conns > base_conns {
                    (rss - base_rss) / (conns - base_conns)
                } else {
                    0.0
                },
                handshake: Percentiles::of(&h),
            };
            if !c.quiet {
                tracing::info!(
                    "{:>7} open  rss {:>8.1} MiB  {:>7.0} B/conn  handshake p50 {:.3} ms p99 {:.3} ms  failures {}",
                    step.connections,
                    rss / 1048576.0,
                    step.bytes_per_connection,
                    step.handshake.p50,
                    step.handshake.p99,
                    failures.lock().values().sum::<u64>()
                );
            }
            steps.push(step);
        }
    }
    let ramp = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(opts.hold)).await;
    let cpu1 = sys::own_cpu_seconds();
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.await;
    }
    let est = established.load(Ordering::Relaxed);
    let failures_by_cause = failures.lock().clone();
    let failed: u64 = failures_by_cause.values().sum();
    let mut gate = Vec::new();
    if failed > opts.max_failures {
        gate.push(format!(
            "{failed} connections failed (max {})",
            opts.max_failures
        ));
    }
    Ok(ConnectReport {
        scenario: "connect".into(),
        attempted: opts.connections as u64,
        established: est,
        failures_by_cause,
        handshake: Percentiles::of(&total_hist),
        handshake_raw: total_hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
        steps,
        achieved_connect_rate: opts.connections as f64 / ramp.max(1e-9),
        loadgen_cpu_percent: 100.0 * (cpu1 - cpu0) / start.elapsed().as_secs_f64(),
        failures: gate,
    })
}

async fn run_children(opts: &ConnectOpts) -> anyhow::Result<ConnectReport> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("finding own executable")?;
    let k = opts.processes;
    let dir = std::env::temp_dir().join(format!("shoal-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let prefix = opts.common.prefix();
    // Decided on the total: the children share the ports of each address.
    let source_ips = opts.common.source_ips_for(opts.connections);
    let mut children = Vec::new();
    for p in 0..k {
        let n = opts.connections / k + usize::from(p < opts.connections % k);
        let out = dir.join(format!("child-{p}.json"));
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("connect")
            .args(["--connections", &n.to_string()])
            .args([
                "--connect-rate",
                &(opts.connect_rate / k as f64).to_string(),
            ])
            .args(["--step", &opts.step.to_string()])
            .args(["--hold", &opts.hold.to_string()])
            .args([
                "--offset",
                &(opts.offset + p * (opts.connections / k + 1)).to_string(),
            ])
            .args(["--source-ips", &source_ips.to_string()])
            .args(["--encoding", opts.common.encoding.name()])
            .args(["--secret-file", &opts.common.secret_file.to_string_lossy()])
            .args(["--prefix", &prefix])
            .args(["--max-failures", &u64::MAX.to_string()])
            .arg("--out")
            .arg(&out)
            .arg("--quiet");
        for u in &opts.common.urls {
            cmd.args(["--url", u]);
        }
        if let Some(s) = &opts.common.jwt_secret {
            cmd.env("SHOAL_JWT_SECRET", s);
        }
        children.push((cmd.spawn().context("spawning child loadgen")?, out));
    }
    let mut merged = ConnectReport {
        scenario: "connect".into(),
        attempted: 0,
        established: 0,
        failures_by_cause: BTreeMap::new(),
        handshake: Percentiles::default(),
        handshake_raw: Vec::new(),
        steps: Vec::new(),
        achieved_connect_rate: 0.0,
        loadgen_cpu_percent: 0.0,
        failures: Vec::new(),
    };
    let mut hist = stats::histogram();
    for (mut child, out) in children {
        let status = child.wait().await?;
        anyhow::ensure!(status.success(), "child loadgen failed: {status}");
        let r: ConnectReport = serde_json::from_slice(&std::fs::read(&out)?)?;
        merged.attempted += r.attempted;
        merged.established += r.established;
        for (k, v) in r.failures_by_cause {
            *merged.failures_by_cause.entry(k).or_insert(0) += v;
        }
        for (v, n) in r.handshake_raw {
            let _ = hist.record_n(v, n);
        }
        merged.achieved_connect_rate += r.achieved_connect_rate;
        merged.loadgen_cpu_percent += r.loadgen_cpu_percent;
        merged.steps.extend(r.steps);
    }
    let _ = std::fs::remove_dir_all(&dir);
    merged.handshake = Percentiles::of(&hist);
    let failed: u64 = merged.failures_by_cause.values().sum();
    if failed > opts.max_failures {
        merged.failures.push(format!(
            "{failed} connections failed (max {})",
            opts.max_failures
        ));
    }
    Ok(merged)
}
