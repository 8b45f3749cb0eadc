//! CI latency/loss gate: a real broker on 127.0.0.1:0 and real loadgen
//! scenarios against it. Bounds are generous (debug builds, shared CI
//! cores); the point is that loss, duplication, reordering, rate shortfall
//! and a latency blow-up all fail the build.

use shoal_loadgen::{connect, fanout, CommonOpts};

mod common;

use common::broker;

fn common(url: &str, dir: &std::path::Path, name: &str) -> CommonOpts {
    CommonOpts {
        source_ips: Some(2),
        out: Some(dir.join(format!("{name}.json"))),
        ..common::common(url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_gate_no_loss_full_rate_bounded_latency() {
    let mut b = broker(|_| {}).await;
    let (url, dir) = (b.url.clone(), b.dir.path().to_path_buf());
    let dir = dir.as_path();
    for enc in [shoal_proto::Encoding::MsgPack, shoal_proto::Encoding::Json] {
        let mut c = common(&url, dir, "fanout");
        c.encoding = enc;
        let opts = fanout::FanoutOpts {
            common: c,
            rooms: 4,
            members: 8,
            publishers: 4,
            rate: 400.0,
            payload: 64,
            duration: 3.0,
            warmup: 1.0,
            max_p99_ms: Some(250.0),
            max_loss: 0,
            connect_concurrency: 32,
            namespace: None,
            spin_us: 100,
            edit_share: 0.0,
            react_share: 0.0,
        };
        let r = fanout::run(&opts).await.expect("fanout run");
        assert!(r.passed(), "{enc:?}: {}", r.table());
        assert_eq!(r.lost, 0);
        assert_eq!(r.deliveries, r.expected_deliveries);
        assert_eq!(r.expected_deliveries, r.acked * 8);
        assert!(
            r.latency.count >= 3 * 400 * 8 * 99 / 100,
            "measured deliveries {}",
            r.latency.count
        );
        assert!(r.fanout_latency.count > 0 && r.fanout_latency.p50 >= r.latency.p50);
        assert!(
            r.broker_cpu_percent[0] > 0.0,
            "broker CPU read from /metrics"
        );
        let path = dir.join("fanout.json");
        shoal_loadgen::report::write_json(&path, &r).expect("json");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(v["lost"], 0);
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_fails_when_the_rate_cannot_be_met() {
    // A broker rate limit below the offered rate: publishes are refused,
    // so the run must fail rather than report a clean result.
    let b = broker(|cfg| {
        cfg.conn.rate_limit = 20.0;
        cfg.conn.rate_burst = 20.0;
        cfg.conn.rate_strikes = 1_000_000;
    })
    .await;
    let (url, dir) = (&b.url, b.dir.path());
    let opts = fanout::FanoutOpts {
        common: common(url, dir, "limited"),
        rooms: 1,
        members: 2,
        publishers: 1,
        rate: 200.0,
        payload: 16,
        duration: 1.0,
        warmup: 0.5,
        max_p99_ms: None,
        max_loss: 0,
        connect_concurrency: 4,
        namespace: None,
        spin_us: 100,
        edit_share: 0.0,
        react_share: 0.0,
    };
    let r = fanout::run(&opts).await.expect("run");
    assert!(!r.passed());
    assert!(
        r.errors.get(&429).copied().unwrap_or(0) > 0,
        "{:?}",
        r.errors
    );
    let mut b = b;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ramp_reports_memory_and_handshakes() {
    let mut b = broker(|_| {}).await;
    let opts = connect::ConnectOpts {
        common: common(&b.url, b.dir.path(), "connect"),
        connections: 400,
        connect_rate: 400.0,
        step: 200,
        hold: 0.2,
        processes: 1,
        offset: 0,
        max_failures: 0,
    };
    let r = connect::run(&opts).await.expect("connect run");
    assert_eq!(r.established, 400, "{:?}", r.failures_by_cause);
    assert!(r.failures.is_empty());
    assert_eq!(r.steps.len(), 2);
    assert!(r.steps[1].connections >= 400.0);
    assert!(r.steps[1].bytes_per_connection > 0.0);
    assert_eq!(r.handshake.count, 400);
    b.stop().await;
}
