//! `loadgen gate`: compare a result with a baseline (and with absolute
//! bounds) and fail on regression, with a readable table of what moved.
//!
//! Works on `fanout` results and on `capacity` results (their best step).
//! A latency percentile regresses when `current > baseline × (1 + tol) +
//! slack`; the absolute slack keeps sub-millisecond noise from failing a
//! run. Throughput regresses when it falls more than `throughput_tolerance`
//! below the baseline.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

/// Options of `loadgen gate`.
#[derive(Debug, Clone, Args)]
pub struct GateOpts {
    /// Result to compare against (JSON written by fanout or capacity).
    #[arg(long)]
    pub baseline: Option<PathBuf>,

    /// Result of the run being checked.
    #[arg(long)]
    pub current: PathBuf,

    /// Allowed relative increase of each latency percentile (0.25 = +25%).
    #[arg(long, default_value_t = 0.25)]
    pub tolerance: f64,

    /// Absolute slack added to every latency bound, in milliseconds.
    #[arg(long, default_value_t = 0.5)]
    pub slack_ms: f64,

    /// Allowed relative drop of deliveries per second (0.1 = -10%).
    #[arg(long, default_value_t = 0.1)]
    pub throughput_tolerance: f64,

    /// Absolute bound: fail if p99 delivery latency exceeds this (ms).
    #[arg(long)]
    pub max_p99_ms: Option<f64>,

    /// Absolute bound: fail if more deliveries than this were lost.
    #[arg(long, default_value_t = 0)]
    pub max_loss: u64,
}

/// Outcome: a table for people and the list of regressions.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Comparison table.
    pub table: String,
    /// One line per regression; empty when the gate passes.
    pub failures: Vec<String>,
}

fn load(path: &PathBuf) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    // A capacity result is judged by its best step.
    Ok(match v.get("best") {
        Some(b) if b.is_object() => b.clone(),
        Some(_) => anyhow::bail!("{}: capacity run with no passing step", path.display()),
        None => v,
    })
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_f64()
}

const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99.9", "p999"),
];

/// Compare `current` with an optional `baseline`.
pub fn judge(opts: &GateOpts, baseline: Option<&Value>, current: &Value) -> Verdict {
    let mut failures = Vec::new();
    let mut table = format!(
        "{:<24} {:>12} {:>12} {:>12}\n",
        "metric", "baseline", "current", "limit"
    );
    for (label, key) in PERCENTILES {
        let cur = num(current, &["latency", key]).unwrap_or(f64::NAN);
        let base = baseline.and_then(|b| num(b, &["latency", key]));
        let limit = base.map(|b| b * (1.0 + opts.tolerance) + opts.slack_ms);
        let bad = limit.is_some_and(|l| cur > l);
        table += &format!(
            "{:<24} {:>12} {:>12.3} {:>12} {}\n",
            format!("delivery {label} (ms)"),
            base.map_or("-".into(), |b| format!("{b:.3}")),
            cur,
            limit.map_or("-".into(), |l| format!("{l:.3}")),
            if bad { "REGRESSION" } else { "" }
        );
        if bad {
            failures.push(format!(
                "delivery {label} {cur:.3} ms > {:.3} ms (baseline {:.3} ms)",
                limit.unwrap_or_default(),
                base.unwrap_or_default()
            ));
        }
    }
    let cur_tp = num(current, &["deliveries_per_sec"]).unwrap_or(0.0);
    let base_tp = baseline.and_then(|b| num(b, &["deliveries_per_sec"]));
    let min_tp = base_tp.map(|b| b * (1.0 - opts.throughput_tolerance));
    let tp_bad = min_tp.is_some_and(|m| cur_tp < m);
    table += &format!(
        "{:<24} {:>12} {:>12.0} {:>12} {}\n",
        "deliveries/s",
        base_tp.map_or("-".into(), |b| format!("{b:.0}")),
        cur_tp,
        min_tp.map_or("-".into(), |m| format!(">= {m:.0}")),
        if tp_bad { "REGRESSION" } else { "" }
    );
    if tp_bad {
        failures.push(format!(
            "throughput {cur_tp:.0}/s < {:.0}/s",
            min_tp.unwrap_or_default()
        ));
    }
    if let Some(max) = opts.max_p99_ms {
        let p99 = num(current, &["latency", "p99"]).unwrap_or(f64::INFINITY);
        if p99 > max {
            failures.push(format!("p99 {p99:.3} ms over the absolute bound {max} ms"));
        }
    }
    let lost = num(current, &["lost"]).unwrap_or(0.0) as u64;
    if lost > opts.max_loss {
        failures.push(format!("{lost} deliveries lost (max {})", opts.max_loss));
    }
    let dup = num(current, &["duplicated"]).unwrap_or(0.0) as u64;
    let reo = num(current, &["reordered"]).unwrap_or(0.0) as u64;
    if dup > 0 || reo > 0 {
        failures.push(format!("{dup} duplicated, {reo} reordered deliveries"));
    }
    if current.get("rate_ok").and_then(Value::as_bool) == Some(false) {
        failures.push("the run did not reach 99% of its target rate".into());
    }
    Verdict { table, failures }
}

/// Load both files and judge.
pub fn run(opts: &GateOpts) -> anyhow::Result<Verdict> {
    let current = load(&opts.current)?;
    let baseline = opts.baseline.as_ref().map(load).transpose()?;
    Ok(judge(opts, baseline.as_ref(), &current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts() -> GateOpts {
        GateOpts {
            baseline: None,
            current: PathBuf::new(),
            tolerance: 0.25,
            slack_ms: 0.5,
            throughput_tolerance: 0.1,
            max_p99_ms: Some(50.0),
            max_loss: 0,
        }
    }

    fn result(p99: f64, tp: f64, lost: u64) -> Value {
        json!({"latency": {"p50": 1.0, "p90": 2.0, "p99": p99, "p999": 8.0},
               "deliveries_per_sec": tp, "lost": lost, "duplicated": 0,
               "reordered": 0, "rate_ok": true})
    }

    #[test]
    fn passes_within_tolerance_and_fails_on_regression() {
        let base = result(4.0, 10_000.0, 0);
        let ok = judge(&opts(), Some(&base), &result(5.4, 9_500.0, 0));
        assert!(ok.failures.is_empty(), "{:?}", ok.failures);
        let slow = judge(&opts(), Some(&base), &result(5.6, 10_000.0, 0));
        assert_eq!(slow.failures.len(), 1, "{:?}", slow.failures);
        assert!(slow.table.contains("REGRESSION"));
        let thin = judge(&opts(), Some(&base), &result(4.0, 8_000.0, 3));
        assert_eq!(thin.failures.len(), 2, "{:?}", thin.failures);
        let abs = judge(&opts(), None, &result(60.0, 1.0, 0));
        assert_eq!(abs.failures.len(), 1, "{:?}", abs.failures);
    }
}
