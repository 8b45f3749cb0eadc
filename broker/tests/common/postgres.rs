//! A real PostgreSQL on a free loopback port in a temp dir.

use super::*;

/// A real PostgreSQL server (Debian's postgresql package) in a temp dir on
/// a free loopback port, run as the `postgres` user when the tests run as
/// root (PostgreSQL refuses root). Trust auth on loopback only; stopped by
/// PID (SIGINT: fast shutdown) on drop.
pub struct Postgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: std::process::Child,
}

fn pg_bin(name: &str) -> std::path::PathBuf {
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql must be installed (make test-deps installs it)")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a postgresql version")
        .join("bin")
        .join(name)
}

/// Run `cmd` as the `postgres` user when we are root.
fn as_pg_user(bin: std::path::PathBuf) -> std::process::Command {
    // SAFETY-free check of the effective uid via /proc.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(bin);
        c
    } else {
        std::process::Command::new(bin)
    }
}

impl Postgres {
    pub async fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        // The server's user must own its data directory.
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let out = as_pg_user(pg_bin("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "shoal",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = as_pg_user(pg_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("postgres");
        let pg = Postgres { port, dir, child };
        for _ in 0..200 {
            if tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return pg;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("postgres did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("postgres://shoal@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
