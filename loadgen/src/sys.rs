//! CPU and memory readings: our own from /proc, the broker's from its
//! `/metrics`, so a report shows whether the load generator was the
//! bottleneck.

/// CPU seconds (user + system) used by this process so far.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU seconds used by process `pid` ("self" for this one,
/// "thread-self" for the calling thread), 0 if unknown.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / 100.0
}

/// One sample value from a Prometheus text exposition (first line whose
/// metric name matches exactly, any labels).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Broker figures scraped from `/metrics`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BrokerSample {
    /// CPU seconds used.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub rss_bytes: f64,
    /// Open WebSocket connections.
    pub connections: f64,
}

/// Resident memory of process `pid` in bytes, 0 if unknown.
fn rss_bytes_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

/// Sample every server: from /proc when `pids` are given (servers without
/// Shoal's /metrics; connections then read as 0), else from each URL's
/// `/metrics`. Missing values read as 0.
pub async fn scrape(http: &reqwest::Client, urls: &[String], pids: &[u32]) -> Vec<BrokerSample> {
    if !pids.is_empty() {
        return pids
            .iter()
            .map(|&p| BrokerSample {
                cpu_seconds: cpu_seconds_of(&p.to_string()),
                rss_bytes: rss_bytes_of(p),
                connections: 0.0,
            })
            .collect();
    }
    let mut out = Vec::with_capacity(urls.len());
    for u in urls {
        let url = metrics_url(u);
        let text = match http.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(%url, error = %e, "cannot read the broker's metrics: its CPU and memory will read 0");
                String::new()
            }
        };
        if !text.is_empty() && metric_value(&text, "shoal_process_cpu_seconds_total").is_none() {
            tracing::warn!(%url, "no shoal_process_cpu_seconds_total there: broker CPU will read 0 (not Shoal? pass --pid)");
        }
        out.push(BrokerSample {
            cpu_seconds: metric_value(&text, "shoal_process_cpu_seconds_total").unwrap_or(0.0),
            rss_bytes: metric_value(&text, "shoal_process_resident_memory_bytes").unwrap_or(0.0),
            connections: metric_value(&text, "shoal_connections").unwrap_or(0.0),
        });
    }
    out
}

/// The `/metrics` URL of a server given as a base URL in any of the forms
/// `--url` takes (`http://h:p`, `ws://h:p/ws`, `wss://h:p/`).
pub fn metrics_url(url: &str) -> String {
    let scheme = match url.split_once("://").map(|(s, _)| s) {
        Some("wss" | "https") => "https",
        _ => "http",
    };
    format!("{scheme}://{}/metrics", crate::client::host_port(url))
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_are_found_whatever_form_the_url_takes() {
        for u in ["http://h:1", "http://h:1/", "ws://h:1/ws", "ws://h:1"] {
            assert_eq!(super::metrics_url(u), "http://h:1/metrics", "{u}");
        }
        assert_eq!(super::metrics_url("wss://h:1/ws"), "https://h:1/metrics");
    }

    #[test]
    fn parses_metric_lines() {
        let t = "# HELP x\nshoal_connections{node=\"a\"} 12\nshoal_connections_extra 5\nshoal_process_cpu_seconds_total{node=\"a\"} 1.5\n";
        assert_eq!(super::metric_value(t, "shoal_connections"), Some(12.0));
        assert_eq!(
            super::metric_value(t, "shoal_process_cpu_seconds_total"),
            Some(1.5)
        );
        assert_eq!(super::metric_value(t, "nope"), None);
    }

    #[test]
    fn reads_a_process_from_proc() {
        let me = std::process::id();
        assert!(super::rss_bytes_of(me) > 1e6);
        assert!(super::cpu_seconds_of(&me.to_string()) >= 0.0);
        assert_eq!(super::rss_bytes_of(u32::MAX), 0.0);
    }
}
