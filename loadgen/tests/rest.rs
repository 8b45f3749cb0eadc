//! The goose `rest` scenario against a real broker (built with
//! `--features rest`; `make test` runs it).
#![cfg(feature = "rest")]

use std::time::Duration;

use shoal_loadgen::{rest, CommonOpts};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_scenario_measures_every_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = shoal_broker::Config::for_tests(dir.path().to_path_buf());
    cfg.jwt_secret = Some("rest-secret-rest-secret-rest-secret-0123".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(shoal_broker::server::run(listener, cfg, stop.clone()));
    let opts = rest::RestOpts {
        common: CommonOpts {
            urls: vec![url],
            jwt_secret: None,
            secret_file: "unused".into(),
            encoding: shoal_proto::Encoding::Json,
            source_ips: 1,
            prefix: None,
            out: None,
            quiet: true,
            metrics_listen: None,
        },
        users: 4,
        hatch_rate: 4,
        duration: 3,
    };
    let r = rest::run(&opts).await.expect("rest run");
    assert!(r.failures.is_empty(), "{}", r.table());
    for name in ["users", "rooms", "history"] {
        let (_, s) = r
            .requests
            .iter()
            .find(|(k, _)| k.ends_with(name))
            .unwrap_or_else(|| panic!("no {name} requests: {:?}", r.requests.keys()));
        assert!(
            s.ok > 0 && s.latency.count as usize == s.ok + s.failed,
            "{name}: {s:?}"
        );
        assert_eq!(s.status_codes.get(&200).copied(), Some(s.ok));
    }
    assert!(r.requests_per_sec > 0.0);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
}
