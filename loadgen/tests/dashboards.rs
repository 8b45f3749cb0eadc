//! Every Grafana panel query is checked against a real Prometheus that
//! scrapes a real broker and a real loadgen run: each PromQL expression in
//! `grafana/dashboards/*.json` must parse and return data. Renaming a
//! metric without fixing the dashboards fails here.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use shoal_loadgen::{fanout, CommonOpts};

mod common;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

use shoal_broker::testing::{free_port, ChildGuard as ServerProc};

fn targets() -> Vec<(String, String, String)> {
    let mut out = vec![];
    let dir = repo().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("grafana/dashboards")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "broker, cluster and loadgen dashboards");
    for f in files {
        let d: Value = serde_json::from_slice(&std::fs::read(&f).expect("read")).expect("json");
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{}: no panels", f.display());
        for p in panels {
            let title = p["title"].as_str().expect("title").to_string();
            let ts = p["targets"].as_array().expect("targets");
            assert!(!ts.is_empty(), "{title}: no targets");
            for t in ts {
                let expr = t["expr"].as_str().expect("expr").to_string();
                out.push((f.display().to_string(), title.clone(), expr));
            }
        }
    }
    out
}

#[test]
fn prometheus_config_is_valid() {
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(repo().join("grafana/prometheus.yml"))
        .output()
        .expect("promtool (installed by `make test-deps`)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data() {
    // Two brokers: one single node (store panels), one on the Redis bus
    // (Redis panels); both under load.
    let redis_port = free_port();
    let redis_dir = tempfile::tempdir().expect("tempdir");
    let _redis = ServerProc(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(redis_dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by `make test-deps`)"),
    );
    let clustered = common::broker(|c| {
        c.cluster.bus = shoal_broker::config::BusKind::Redis;
        c.cluster.redis_url = Some(
            format!("redis://127.0.0.1:{redis_port}")
                .parse()
                .expect("redis url"),
        );
    })
    .await;
    let b = common::broker(|_| {}).await;
    let (broker, broker2, dir) = (b.addr, clustered.addr, &b.dir);
    let lg_port = free_port();
    let prom_port = free_port();
    let conf = dir.path().join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: shoal\n    static_configs:\n      - targets: ['{broker}', '{broker2}']\n\
             \x20 - job_name: loadgen\n    static_configs:\n      - targets: ['127.0.0.1:{lg_port}']\n"
        ),
    )
    .expect("write config");
    let _prom = ServerProc(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (installed by `make test-deps`)"),
    );

    let opts = fanout::FanoutOpts {
        common: CommonOpts {
            metrics_listen: Some(([127, 0, 0, 1], lg_port).into()),
            ..common::common(&b.url)
        },
        rooms: 4,
        members: 5,
        publishers: 4,
        rate: 200.0,
        payload: 32,
        duration: 14.0,
        warmup: 1.0,
        max_p99_ms: None,
        max_loss: 0,
        connect_concurrency: 16,
        namespace: None,
        spin_us: 100,
        edit_share: 0.0,
        react_share: 0.0,
    };
    let opts2 = fanout::FanoutOpts {
        common: common::common(&clustered.url),
        ..opts.clone()
    };
    let run = tokio::spawn(async move { fanout::run(&opts).await });
    let run2 = tokio::spawn(async move { fanout::run(&opts2).await });

    // Query while the run is under way, after several scrapes of both.
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{prom_port}/api/v1/query");
    let targets = targets();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut missing: Vec<String>;
    loop {
        missing = vec![];
        for (file, title, expr) in &targets {
            let v: Value = match http.get(&api).query(&[("query", expr)]).send().await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => {
                    missing.push(format!("{file} / {title}: prometheus unreachable: {e}"));
                    continue;
                }
            };
            if v["status"] != "success" {
                // A parse error cannot fix itself: fail at once.
                panic!("{file} / {title}: `{expr}` failed: {v}");
            }
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            let has_number = result.iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse::<f64>().ok())
                    .is_some_and(|x| x.is_finite())
            });
            if !has_number {
                missing.push(format!(
                    "{file} / {title}: `{expr}` returned no data: {result:?}"
                ));
            }
        }
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        missing.is_empty(),
        "panels without data:\n{}",
        missing.join("\n")
    );
    let report = run.await.expect("join").expect("fanout");
    assert_eq!(report.lost, 0);
    let report = run2.await.expect("join").expect("fanout over the bus");
    assert_eq!(report.lost, 0);
    for mut b in [b, clustered] {
        b.stop().await;
    }
}
