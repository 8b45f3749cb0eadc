//! A real broker on 127.0.0.1:0 in a temp dir for loadgen's tests, and the
//! options that point a scenario at it.
#![allow(dead_code)]

use std::net::SocketAddr;

use shoal_loadgen::CommonOpts;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "gate-secret-gate-secret-gate-secret-0123";

pub struct TestBroker {
    pub addr: SocketAddr,
    pub url: String,
    pub stop: CancellationToken,
    pub dir: tempfile::TempDir,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Start a broker with the test secret and no frame rate limit; `tune`
/// adjusts the config before start.
pub async fn broker(tune: impl FnOnce(&mut shoal_broker::Config)) -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = shoal_broker::Config::for_tests(dir.path().join("broker"));
    cfg.jwt_secret = Some(SECRET.into());
    cfg.rate_limit = 100_000.0;
    cfg.rate_burst = 100_000.0;
    tune(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let task = tokio::spawn(shoal_broker::server::run(listener, cfg, stop.clone()));
    // Ready when /health says so (a node on a Redis bus refuses WebSocket
    // handshakes until its bus is up).
    let health = format!("http://{addr}/health");
    for _ in 0..200 {
        if reqwest::get(&health).await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    TestBroker {
        addr,
        url: format!("http://{addr}"),
        stop,
        dir,
        task,
    }
}

/// Scenario options aimed at `url`, quiet, writing no result file.
pub fn common(url: &str) -> CommonOpts {
    CommonOpts {
        urls: vec![url.to_string()],
        jwt_secret: Some(SECRET.into()),
        secret_file: "unused".into(),
        encoding: shoal_proto::Encoding::MsgPack,
        protocol: shoal_loadgen::wire::Protocol::Shoal,
        pusher_key: String::new(),
        pusher_secret: String::new(),
        pids: vec![],
        source_ips: 1,
        prefix: None,
        out: None,
        quiet: true,
        metrics_listen: None,
    }
}
