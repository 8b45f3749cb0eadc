//! The goose `rest` scenario against a real broker (built with
//! `--features rest`; `make test` runs it).
#![cfg(feature = "rest")]

use shoal_loadgen::rest;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_scenario_measures_every_endpoint() {
    let mut b = common::broker(|_| {}).await;
    let opts = rest::RestOpts {
        common: common::common(&b.url),
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
    b.stop().await;
}
