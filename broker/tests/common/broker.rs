//! A broker in this process (`Broker`, on 127.0.0.1:0 in a temp dir) or as
//! a separate OS process (`Proc`, for kill -9 tests).

use super::*;

pub struct Broker {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Broker {
    pub async fn start() -> Broker {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_tests(dir.path().to_path_buf());
        cfg.jwt_secret = Some(SECRET.into());
        cfg.log = std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "warn".into());
        f(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(shoal_broker::server::run(listener, cfg, shutdown.clone()));
        Broker {
            addr,
            shutdown,
            task: Some(task),
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("shutdown in time")
                .expect("join")
                .expect("run");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A broker as a separate OS process (for kill -9 tests), on a free
/// loopback port, killed by PID when dropped.
pub struct Proc {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Proc {
    pub async fn start(data: &std::path::Path, extra: &[&str]) -> Proc {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--data")
                .arg(data)
                .arg("--log")
                .arg("warn")
                .args(extra)
                .env("SHOAL_JWT_SECRET", SECRET)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn shoal");
            let mut p = Proc {
                child,
                addr,
                http: reqwest::Client::new(),
            };
            for _ in 0..100 {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if p.http
                    .get(format!("http://{addr}/health"))
                    .send()
                    .await
                    .is_ok()
                {
                    return p;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("broker process did not start");
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Endpoint for Broker {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

impl Endpoint for Proc {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
}
