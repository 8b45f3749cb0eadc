//! A real redis-server (`Redis`) and a Redis Cluster (`RedisCluster`), on
//! free loopback ports in temp dirs, stopped by PID.

use super::*;

/// A real redis-server on a free loopback port in a temp dir, with an
/// append-only file fsynced on every write (so a stop and restart keeps
/// what it acknowledged). Stopped by PID on drop.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Redis {
    pub async fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            port: free_port(),
            dir,
            child: None,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A broker process on this Redis as its bus (rate limits off, tests
    /// pipeline hundreds of publishes), with `extra` flags.
    pub async fn node_proc(&self, data: &std::path::Path, extra: &[&str]) -> Proc {
        let url = self.url();
        let mut args = vec![
            "--bus",
            "redis",
            "--redis-url",
            &url,
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ];
        args.extend_from_slice(extra);
        let p = Proc::start(data, &args).await;
        // A node refuses WebSocket handshakes (503) until its bus is up.
        p.health_becomes(200).await;
        p
    }

    /// (Re)start on the same port and data dir.
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make test-deps installs it)");
        self.child = Some(child);
        wait_listening(self.port).await;
    }

    /// SIGTERM and wait: Redis flushes its append-only file and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Redis Cluster of `n` masters (and optionally replicas): redis-server
/// in cluster mode on free loopback ports (client and cluster-bus ports)
/// in one temp dir, joined with `redis-cli --cluster create`, with a
/// one-second node timeout (failovers in about two). Stopped by PID on
/// drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
    children: Vec<std::process::Child>,
}

impl RedisCluster {
    pub async fn start(n: usize) -> RedisCluster {
        Self::start_with(n, 0).await
    }

    /// `masters` masters with `replicas` replicas each.
    pub async fn start_with(masters: usize, replicas: usize) -> RedisCluster {
        // Free ports are found by binding and letting go, so another test
        // can take one before redis-server does: such a start is retried
        // on fresh ports.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(masters, replicas).await {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("cluster create: {last}");
    }

    async fn try_start(masters: usize, replicas: usize) -> Result<RedisCluster, String> {
        let n = masters * (1 + replicas);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = RedisCluster {
            ports: vec![],
            _dir: dir,
            children: vec![],
        };
        for i in 0..n {
            let (port, bus) = (free_port(), free_port());
            let d = c._dir.path().join(i.to_string());
            std::fs::create_dir(&d).expect("node dir");
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-config-file", "nodes.conf", "--save", ""])
                .args(["--cluster-node-timeout", "1000"])
                // Shards that answer keep serving while another is down.
                .args(["--cluster-require-full-coverage", "no"])
                .arg("--dir")
                .arg(&d)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server must be installed (make test-deps installs it)");
            c.children.push(child);
            c.ports.push(port);
        }
        for &p in &c.ports {
            wait_listening(p).await;
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        // Every node must see every slot covered before clients use it.
        for &p in &c.ports {
            let mut ok = false;
            for _ in 0..200 {
                if c.cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(ok, "node {p} never reached cluster_state:ok");
        }
        // Replicas in sync with their masters before anyone relies on them.
        for &p in &c.ports {
            let mut ok = false;
            for _ in 0..200 {
                let info = c.cli(p, &["INFO", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(ok, "replica {p} never synced");
        }
        Ok(c)
    }

    /// The port of the master that owns `key` (the others answer MOVED).
    pub fn owner(&self, key: &str) -> u16 {
        self.ports
            .iter()
            .copied()
            .find(|&p| {
                let role = self.cli(p, &["ROLE"]);
                role.starts_with("master") && !self.cli(p, &["GET", key]).starts_with("MOVED")
            })
            .expect("an owner")
    }

    /// `redis+cluster://` URL with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// SIGKILL the server on `port` (no shutdown, no failover handshake).
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.ports.iter().position(|p| *p == port) {
            let _ = self.children[i].kill();
            let _ = self.children[i].wait();
        }
    }

    /// Run `redis-cli -p port args...` and return its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on port {port}");
}
