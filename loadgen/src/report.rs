//! Result files: JSON for machines (and the CI gate) and an SVG latency
//! percentile plot for people, both under `results/`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

/// Default result path `results/<scenario>-<unix time>.json`.
pub fn default_path(scenario: &str) -> PathBuf {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("results").join(format!("{scenario}-{ts}.json"))
}

/// Where and with what a run was made, so a result can be compared with
/// another knowingly.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Env {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// CPUs available to this process.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// `git rev-parse HEAD` of the working directory, if any.
    pub git_revision: Option<String>,
    /// loadgen version.
    pub loadgen_version: String,
    /// When the result was written, seconds since the epoch.
    pub written_at: u64,
}

impl Env {
    /// Collect from this machine.
    pub fn collect() -> Env {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let git_revision = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        Env {
            cpu_model,
            // The machine's CPUs, not this thread's affinity (plan pins
            // itself to one core).
            cpus: std::fs::read_to_string("/proc/cpuinfo")
                .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            git_revision,
            loadgen_version: env!("CARGO_PKG_VERSION").into(),
            written_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    env: Env,
    #[serde(flatten)]
    report: &'a T,
}

/// Write a report as pretty JSON with an `env` block, creating parent
/// directories.
pub fn write_json<T: Serialize>(path: &Path, report: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(&Envelope {
        env: Env::collect(),
        report,
    })?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Plot latency percentile curves (x: percentile on a "nines" scale, y: ms).
pub fn plot_percentiles(
    path: &Path,
    title: &str,
    series: &[(&str, &[(f64, f64)])],
) -> anyhow::Result<()> {
    // x = -log10(1 - p/100): 0 = p0, 1 = p90, 2 = p99, 3 = p99.9 ...
    let nines = |p: f64| -((1.0 - (p / 100.0).min(0.99999)).log10());
    let series: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, pts)| {
            (
                n.to_string(),
                pts.iter().map(|&(p, v)| (nines(p), v)).collect(),
            )
        })
        .collect();
    let label = |x: &f64| match x.round() as i64 {
        0 => "p0".into(),
        1 => "p90".into(),
        2 => "p99".into(),
        3 => "p99.9".into(),
        4 => "p99.99".into(),
        _ => "p99.999".into(),
    };
    line_chart(
        path,
        title,
        5.0,
        ("percentile", "latency (ms)"),
        Some(&label),
        &series,
    )
}

/// Plot (x, y) series on linear axes.
pub fn plot_xy(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    line_chart(path, title, xmax, (x_desc, y_desc), None, series)
}

type XLabel<'a> = &'a dyn Fn(&f64) -> String;

/// One SVG line chart, x from 0 to `xmax`, y from 0 to the highest point.
fn line_chart(
    path: &Path,
    title: &str,
    xmax: f64,
    (x_desc, y_desc): (&str, &str),
    x_label: Option<XLabel<'_>>,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..xmax, 0.0f64..ymax)
        .map_err(|e| err(&e))?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_desc).y_desc(y_desc);
    if let Some(f) = x_label {
        mesh.x_label_formatter(f).x_labels(6);
    }
    mesh.draw().map_err(|e| err(&e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Options of `loadgen report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportOpts {
    /// Result files (fanout or capacity JSON) to chart together.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,

    /// Directory for the charts.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

fn label_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

fn pairs(v: &serde_json::Value) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Render `spectrum.svg` (latency percentiles of every run, overlaid),
/// `timeline.svg` (p50/p99 per second of every run) and, for capacity
/// results, `capacity.svg` (deliveries/s against p99 across the ramp).
/// Returns the files written.
pub fn render(opts: &ReportOpts) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut spectrum = Vec::new();
    let mut timeline = Vec::new();
    let mut ramps = Vec::new();
    for f in &opts.files {
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        )
        .with_context(|| format!("parsing {}", f.display()))?;
        let label = label_of(f);
        if let Some(steps) = v.get("steps").and_then(|s| s.as_array()) {
            ramps.push((
                label.clone(),
                steps
                    .iter()
                    .filter_map(|s| {
                        Some((s["deliveries_per_sec"].as_f64()?, s["p99_ms"].as_f64()?))
                    })
                    .collect(),
            ));
        }
        let run = v.get("best").filter(|b| b.is_object()).unwrap_or(&v);
        let curve = pairs(&run["latency_curve"]);
        if !curve.is_empty() {
            spectrum.push((label.clone(), curve));
        }
        if let Some(tl) = run.get("timeline").and_then(|t| t.as_array()) {
            let p99: Vec<(f64, f64)> = tl
                .iter()
                .filter_map(|p| Some((p["t"].as_f64()?, p["p99_ms"].as_f64()?)))
                .collect();
            let p50: Vec<(f64, f64)> = tl
                .iter()
                .filter_map(|p| Some((p["t"].as_f64()?, p["p50_ms"].as_f64()?)))
                .collect();
            if !p99.is_empty() {
                timeline.push((format!("{label} p99"), p99));
                timeline.push((format!("{label} p50"), p50));
            }
        }
    }
    let mut written = Vec::new();
    if !spectrum.is_empty() {
        let path = opts.out.join("spectrum.svg");
        let series: Vec<(&str, &[(f64, f64)])> = spectrum
            .iter()
            .map(|(l, p)| (l.as_str(), p.as_slice()))
            .collect();
        plot_percentiles(&path, "delivery latency by percentile", &series)?;
        written.push(path);
    }
    if !timeline.is_empty() {
        let path = opts.out.join("timeline.svg");
        plot_xy(
            &path,
            "delivery latency over time",
            "seconds",
            "latency (ms)",
            &timeline,
        )?;
        written.push(path);
    }
    if !ramps.is_empty() {
        let path = opts.out.join("capacity.svg");
        plot_xy(
            &path,
            "throughput against p99 across the ramp",
            "deliveries/s",
            "p99 (ms)",
            &ramps,
        )?;
        written.push(path);
    }
    anyhow::ensure!(!written.is_empty(), "no chartable data in the given files");
    Ok(written)
}
