//! Helpers for tests that start real servers, shared by the broker's and
//! loadgen's integration tests (feature `testing`, never in the binary).
//!
//! Rules: every server listens on loopback on a free port, lives in a temp
//! dir, and is stopped by PID (or by its shutdown token) when its guard
//! drops.

use std::{net::SocketAddr, process::Child, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::Config;

/// A free loopback port (bound, read, released: a concurrent test may
/// still take it, so starters retry).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child server process (redis-server, Prometheus, a broker), killed by
/// PID and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `url` until it answers 200, for at most `within`. True if it did.
pub async fn wait_ok(url: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if reqwest::get(url).await.is_ok_and(|r| r.status() == 200) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A broker in this process on 127.0.0.1:0 with its data in a temp dir.
pub struct InProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub url: String,
    /// Cancel to shut it down.
    pub stop: CancellationToken,
    /// Its data dir, unless `tune` moved it (removed on drop).
    pub dir: tempfile::TempDir,
    /// The server task; `None` once stopped.
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Start with the test defaults, adjusted by `tune`.
    pub async fn start(tune: impl FnOnce(&mut Config)) -> InProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_tests(dir.path().to_path_buf());
        tune(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::server::run(listener, cfg, stop.clone()));
        InProcess {
            addr,
            url: format!("http://{addr}"),
            stop,
            dir,
            task: Some(task),
        }
    }

    /// Wait until `/health` says 200 (a node on a Redis bus refuses
    /// WebSocket handshakes until its bus is up).
    pub async fn ready(self) -> Self {
        let health = format!("{}/health", self.url);
        assert!(
            wait_ok(&health, Duration::from_secs(10)).await,
            "broker at {} never became healthy",
            self.url
        );
        self
    }

    /// Graceful shutdown; panics if it fails or takes over 15 s.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("shutdown in time")
                .expect("server task")
                .expect("server run");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
