//! `capacity`: step the publish rate up until p99 passes the SLO or any
//! loss appears; the highest passing step's deliveries/s is the node's
//! capacity figure.

use clap::Args;
use serde::Serialize;

use crate::fanout::{self, FanoutOpts, FanoutReport};

/// Options of the capacity search.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CapacityOpts {
    /// Shared options.
    #[command(flatten)]
    #[serde(flatten)]
    pub fanout: FanoutOpts,

    /// p99 delivery latency SLO in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub slo_p99_ms: f64,

    /// Factor by which each step multiplies the publish rate (starting at --rate).
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,

    /// Most steps to try.
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
}

/// One step of the search.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Offered publish rate.
    pub rate: f64,
    /// Deliveries per second achieved.
    pub deliveries_per_sec: f64,
    /// p99 delivery latency (ms).
    pub p99_ms: f64,
    /// Lost deliveries.
    pub lost: u64,
    /// Whether the step met the SLO with no loss and full offered rate.
    pub passed: bool,
    /// Why it failed.
    pub failures: Vec<String>,
}

/// Result of the capacity search.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityReport {
    /// Scenario name.
    pub scenario: &'static str,
    /// SLO used.
    pub slo_p99_ms: f64,
    /// Every step run.
    pub steps: Vec<Step>,
    /// Highest passing publish rate.
    pub capacity_publish_rate: f64,
    /// Deliveries/s at that rate: the node's capacity figure.
    pub capacity_deliveries_per_sec: f64,
    /// Full report of the highest passing step.
    pub best: Option<FanoutReport>,
}

/// Run the search.
pub async fn run(opts: &CapacityOpts) -> anyhow::Result<CapacityReport> {
    anyhow::ensure!(opts.step_factor > 1.0, "--step-factor must be > 1");
    let mut rate = opts.fanout.rate;
    let mut steps = Vec::new();
    let mut best: Option<FanoutReport> = None;
    for _ in 0..opts.max_steps {
        let mut f = opts.fanout.clone();
        f.rate = rate;
        f.max_p99_ms = Some(opts.slo_p99_ms);
        f.common.prefix = None;
        let r = fanout::run(&f).await?;
        tracing::info!(
            "step {:.0} msg/s: {:.0} deliveries/s, p99 {:.3} ms, lost {}, {}",
            rate,
            r.deliveries_per_sec,
            r.latency.p99,
            r.lost,
            if r.passed() { "ok" } else { "FAIL" }
        );
        let passed = r.passed();
        steps.push(Step {
            rate,
            deliveries_per_sec: r.deliveries_per_sec,
            p99_ms: r.latency.p99,
            lost: r.lost,
            passed,
            failures: r.failures.clone(),
        });
        if !passed {
            break;
        }
        best = Some(r);
        rate *= opts.step_factor;
    }
    Ok(CapacityReport {
        scenario: "capacity",
        slo_p99_ms: opts.slo_p99_ms,
        capacity_publish_rate: best.as_ref().map_or(0.0, |b| b.target_rate),
        capacity_deliveries_per_sec: best.as_ref().map_or(0.0, |b| b.deliveries_per_sec),
        steps,
        best,
    })
}
