//! `shoal`: parse config, set up logging, run the server until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cfg = shoal_broker::Config::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.server.threads > 0 {
        rt.worker_threads(cfg.server.threads);
    }
    rt.enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(cfg))
}

async fn serve(cfg: shoal_broker::Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cfg.server.log).context("--log filter")?,
        )
        .init();
    cfg.validate().context("invalid configuration")?;
    // Every connection is a file descriptor; the usual soft limit (1024)
    // would cap the broker long before --max-connections.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
    let addr = cfg.server.listen;
    let listener = listen(addr).with_context(|| format!("binding {addr}"))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shoal_broker::server::shutdown_signal().await;
        trigger.cancel();
    });
    shoal_broker::server::run(listener, cfg, shutdown).await
}

/// Accept backlog: tokio's default (1024) overflows during a reconnection
/// storm, and a dropped SYN costs the client a one-second retransmit. The
/// kernel caps it at net.core.somaxconn.
const BACKLOG: u32 = 8192;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
