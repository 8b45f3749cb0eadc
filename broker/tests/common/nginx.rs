//! nginx in front of broker nodes, on a free loopback port.

use super::*;

/// nginx in front of broker nodes, rendered from `nginx/shoal.conf.template`
/// with TLS (a self-signed `localhost` certificate made here), on a free
/// loopback port in a temp dir; stopped by PID on drop.
pub struct Nginx {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    child: std::process::Child,
}

impl Nginx {
    pub async fn start(nodes: &[SocketAddr]) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).expect("cert");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("key");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).expect("root");
        let tls = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let port = free_port();
        let template = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nginx/shoal.conf.template"),
        )
        .expect("template");
        let upstreams: String = nodes
            .iter()
            .map(|n| format!("server {n} max_fails=1 fail_timeout=5s; "))
            .collect();
        let prefix = dir.path().display().to_string();
        let conf = template
            .replace("@PREFIX@", &prefix)
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@CERT@", &cert.display().to_string())
            .replace("@KEY@", &key.display().to_string())
            .replace("@UPSTREAMS@", &upstreams);
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write conf");
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx must be installed (make test-deps installs it)");
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Nginx {
            port,
            dir,
            tls,
            child,
        }
    }

    /// Connect over `wss://` with a sticky `sid`; returns the client and
    /// the node that greeted it.
    pub async fn connect(
        &self,
        token: &str,
        sid: &str,
        enc: Encoding,
    ) -> Result<(Client, String), String> {
        let mut req = format!("wss://localhost:{}/ws?sid={sid}", self.port)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?,
        );
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(enc.subprotocol()),
        );
        let tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| e.to_string())?;
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            req,
            tcp,
            None,
            Some(tokio_tungstenite::Connector::Rustls(self.tls.clone())),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut c = Client::from_ws(ws, enc);
        match c.try_recv(Duration::from_secs(5)).await {
            Ok(ServerFrame::Hello { node, .. }) => Ok((c, node)),
            other => Err(format!("expected hello, got {other:?}")),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master must take its workers down.
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
