//! Native TLS (`wss://` and `https://` on the broker's own port) with rustls
//! and the ring provider. The certificate chain and key come from PEM files
//! and are reloaded on SIGHUP: new handshakes use the new certificate,
//! established connections are not touched. A failed reload keeps the old
//! certificate and says why in the log.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use parking_lot::RwLock;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The current TLS configuration.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    acceptor: RwLock<TlsAcceptor>,
}

fn build(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading a private key from {}", key.display()))?;
    // An explicit provider: other crates in a build may enable aws-lc.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

impl Tls {
    /// Load the certificate chain and key (PEM).
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Tls>> {
        Ok(Arc::new(Tls {
            acceptor: RwLock::new(build(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().clone()
    }

    /// Re-read the files; on error the current certificate stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let a = build(&self.cert, &self.key)?;
        *self.acceptor.write() = a;
        Ok(())
    }
}

/// Reload on every SIGHUP until `shutdown`.
pub async fn reload_on_sighup(tls: Arc<Tls>, shutdown: tokio_util::sync::CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; TLS reload disabled");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup.recv() => match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "TLS reload failed; keeping the old certificate"),
                },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, shutdown);
    }
}
