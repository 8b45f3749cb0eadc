//! A broker in this process (`Broker`, on 127.0.0.1:0 in a temp dir) or as
//! a separate OS process (`Proc`, for kill -9 tests).

use super::*;

pub struct Broker {
    pub srv: shoal_broker::testing::InProcess,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Broker {
    pub async fn start() -> Broker {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Broker {
        let srv = shoal_broker::testing::InProcess::start(|cfg| {
            cfg.auth.jwt_secret = Some(SECRET.into());
            cfg.server.log = std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "warn".into());
            f(cfg);
        })
        .await;
        Broker {
            addr: srv.addr,
            srv,
            http: reqwest::Client::new(),
        }
    }

    pub async fn stop(mut self) {
        self.srv.stop().await;
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
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            if let Some(p) = Self::try_start_at(addr, data, extra).await {
                return p;
            }
        }
        panic!("broker process did not start");
    }

    /// A broker on `addr` (a restart on the address clients know).
    pub async fn start_at(addr: SocketAddr, data: &std::path::Path, extra: &[&str]) -> Proc {
        for _ in 0..5 {
            if let Some(p) = Self::try_start_at(addr, data, extra).await {
                return p;
            }
        }
        panic!("broker process did not start on {addr}");
    }

    async fn try_start_at(
        addr: SocketAddr,
        data: &std::path::Path,
        extra: &[&str],
    ) -> Option<Proc> {
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
                return None; // port taken meanwhile
            }
            if p.http
                .get(format!("http://{addr}/health"))
                .send()
                .await
                .is_ok()
            {
                return Some(p);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
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
