//! Running one node: start-up, the accept loop and graceful shutdown.
//!
//! [`run`] is what the binary calls and what tests call with a listener on
//! port 0. Start-up builds everything in dependency order (store, auth,
//! the cluster link, then the hub that is built knowing it, then the
//! group-commit writer and the background passes: WAL checkpoints,
//! retention, revocation pruning). Shutdown: stop accepting, ask idle
//! HTTP connections to finish, close every WebSocket with 1001 after
//! flushing what is queued, and return within `--shutdown-timeout`.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use http_body_util::{BodyExt, Either};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::Auth,
    config::{Config, NamespaceTable},
    hub::Hub,
    metrics::Metrics,
    persist::GroupCommit,
    state::AppState,
    store::{sqlite::SqliteStore, Retention, RetentionPolicy, Store},
};

/// Build the shared state: open the store, load keys and revocations.
pub(crate) async fn build_state(
    cfg: Config,
    listen_port: u16,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<AppState>> {
    cfg.validate()?;
    let node = cfg.server.node_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "shoal".into());
        format!("{}-{}", host.trim(), listen_port)
    });
    let metrics = Arc::new(Metrics::new(&node));
    let store: Arc<dyn Store> = match cfg.store.kind {
        crate::config::StoreKind::Sqlite => {
            let full_sync = cfg.store.store_sync == crate::config::StoreSync::Full;
            let sqlite =
                SqliteStore::open(&cfg.store.data, full_sync).context("opening embedded store")?;
            tokio::spawn(checkpointer(sqlite.clone(), shutdown.clone()));
            Arc::new(sqlite)
        }
        crate::config::StoreKind::Postgres => Arc::new(
            crate::store::postgres::PgStore::connect(
                cfg.store.postgres_url.as_deref().unwrap_or_default(),
                cfg.store.postgres_pool,
            )
            .await
            .context("connecting to PostgreSQL")?,
        ),
    };
    let auth = Arc::new(Auth::from_config(&cfg.auth, &cfg.store.data)?);
    auth.load_revoked(
        store
            .revoked(crate::clock::now_secs())
            .await
            .context("loading revoked tokens")?,
    );
    tokio::spawn(prune_revocations(
        auth.clone(),
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    // The cluster link first: the hub is built knowing whether it is part
    // of a cluster, and the bus's pump and watchdog then drive that hub.
    let mut cluster = None;
    if cfg.cluster.bus == crate::config::BusKind::Redis {
        let (inbound, rx) =
            crate::bus::InboundQueue::new(cfg.cluster.bus_inbound_queue, metrics.clone());
        let settings = crate::bus::redis::RedisSettings {
            opts: cfg.cluster.clone(),
            cid_window: cfg.rooms.idempotency_window,
            node: node.clone(),
            // With a shared store, messages of stored namespaces are
            // archived from the hot streams to it.
            archive: cfg.store.shared().then(|| {
                let ns = cfg.rooms.namespace_table();
                Arc::new(move |room: &str| {
                    shoal_proto::RoomName::parse(room).is_ok_and(|n| ns.get(n.namespace).persist)
                }) as crate::bus::redis::ArchivePredicate
            }),
        };
        let archive = settings.archive.is_some();
        let redis_bus = crate::bus::redis::RedisBus::start(
            settings,
            metrics.clone(),
            inbound,
            shutdown.clone(),
        )
        .context("starting the Redis bus")?;
        let bus: Arc<dyn crate::bus::Bus> = redis_bus.clone();
        if archive {
            tokio::spawn(
                crate::bus::archive::Archiver {
                    conn: redis_bus.command_connection(),
                    bus: bus.clone(),
                    store: store.clone(),
                    node: node.clone(),
                    interval: cfg.cluster.archive_interval,
                    metrics: metrics.clone(),
                }
                .run(shutdown.clone()),
            );
        }
        cluster = Some((
            crate::hub::ClusterLink {
                bus,
                node: node.as_str().into(),
                shared_store: cfg.store.shared(),
            },
            rx,
        ));
    }
    let (jobs_tx, jobs_rx) = mpsc::channel(cfg.store.store_queue);
    let (link, inbound) = cluster.unzip();
    let hub = Arc::new(Hub::new(
        crate::hub::HubSettings {
            shards: cfg.rooms.shards,
            namespaces: cfg.rooms.namespace_table(),
            cid_window: cfg.rooms.idempotency_window,
            max_body: cfg.conn.max_message_size,
        },
        metrics.clone(),
        store.clone(),
        jobs_tx,
        link,
    ));
    if let Some(rx) = inbound {
        // A revocation from another node: remember it and close this
        // node's connections that use the token.
        let (a, h) = (auth.clone(), hub.clone());
        let on_revoke: crate::bus::RevokeHook = Arc::new(move |user, jti, exp| {
            if exp == Some(0) {
                // A lifted server ban.
                a.unrevoke(jti);
                return;
            }
            a.revoke(jti, exp.unwrap_or_else(|| a.default_revocation_expiry()));
            if jti == crate::auth::ban_key(user) {
                h.close_user(user, shoal_proto::CloseCode::Disconnected);
            } else {
                h.close_token(user, jti, shoal_proto::CloseCode::TokenRevoked);
            }
        });
        hub.start_cluster(rx, on_revoke, cfg.cluster.bus_down_grace, shutdown.clone());
    }
    let directory = crate::directory::Directory::start(hub.user_registry(), shutdown.clone());
    let writer_stop = CancellationToken::new();
    tokio::spawn(
        GroupCommit {
            hub: hub.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            batch: cfg.store.store_batch,
            max_memberships: cfg.rooms.max_rooms_per_user,
            webhook: cfg.rooms.offline_webhook.clone().map(|url| {
                crate::webhook::Webhook::start(
                    url,
                    cfg.rooms.webhook_backoff,
                    metrics.webhook.clone(),
                )
            }),
        }
        .run(jobs_rx, writer_stop.clone()),
    );
    tokio::spawn(retention(
        store.clone(),
        cfg.rooms.namespace_table(),
        cfg.store.retention_interval,
        metrics.clone(),
        shutdown.clone(),
    ));
    let rate = cfg.conn.handshake_rate;
    let handshake_bucket = (rate > 0.0)
        .then(|| parking_lot::Mutex::new(crate::limiter::TokenBucket::new(rate, rate.max(1.0))));
    let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
        (Some(c), Some(k)) => {
            let t = crate::tls::Tls::load(c, k).context("loading TLS certificate")?;
            tokio::spawn(crate::tls::reload_on_sighup(t.clone(), shutdown.clone()));
            Some(t)
        }
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let sio = crate::sio::Endpoints::new(&cfg.conn);
    let state = Arc::new(AppState {
        sio,
        tls,
        handshake_bucket,
        conn_permits: Arc::new(Semaphore::new(cfg.conn.max_connections)),
        directory,
        login_by_ip: crate::limiter::KeyedLimiter::new(cfg.auth.login_rate_per_ip),
        login_by_user: crate::limiter::KeyedLimiter::new(cfg.auth.login_rate_per_user),
        upload_budget: Arc::new(Semaphore::new(cfg.http.max_upload_memory)),
        http_admission: crate::httpconn::HttpAdmission::new(
            cfg.http.max_http_connections,
            cfg.http.max_http_connections_per_ip,
            metrics.http_connections.clone(),
        ),
        cfg: Arc::new(cfg),
        node,
        hub,
        auth,
        store,
        metrics,
        shutdown,
        tracker: TaskTracker::new(),
        writer_stop,
        admin_http: reqwest::Client::builder()
            .timeout(crate::http::admin::FAN_OUT_TIMEOUT)
            .build()
            .context("admin http client")?,
    });
    state.sio.attach(Arc::downgrade(&state));
    if state.hub.cluster_health().is_some() {
        let c = &state.cfg;
        let url = c.cluster.advertise_url.clone().unwrap_or_else(|| {
            let ip = c.server.listen.ip();
            let ip = if ip.is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                ip
            };
            let scheme = if state.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", std::net::SocketAddr::new(ip, listen_port))
        });
        tokio::spawn(crate::http::admin::heartbeat(state.clone(), url));
    }
    Ok(state)
}

/// Background WAL checkpoints, off the group-commit path.
async fn checkpointer(store: SqliteStore, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = store.checkpoint().await {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    let _ = store.checkpoint().await;
}

/// Background retention: every interval, drop what each room's namespace
/// no longer keeps.
async fn retention(
    store: Arc<dyn Store>,
    namespaces: NamespaceTable,
    every: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let namespaces = Arc::new(namespaces);
    if !namespaces.any_retention() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::clock::now_ms();
        let ns = namespaces.clone();
        let policy: RetentionPolicy = Arc::new(move |room: &str| {
            let name = shoal_proto::RoomName::parse(room).ok()?;
            let o = ns.get(name.namespace);
            if !o.persist || (o.retain_messages.is_none() && o.retain_age_secs.is_none()) {
                return None;
            }
            Some(Retention {
                max_messages: o.retain_messages,
                min_ts: o
                    .retain_age_secs
                    .map(|s| now.saturating_sub(s.saturating_mul(1000))),
            })
        });
        let removed = store.apply_retention(policy.clone()).await;
        count_removed(removed, &metrics.retention_removed, "messages");
        // Attachments leave with their room's retention age.
        let expired = store.expire_files(policy).await;
        count_removed(expired, &metrics.files_expired, "attachments");
    }
}

/// Count and log what a retention step removed.
fn count_removed(
    r: Result<u64, crate::store::StoreError>,
    counter: &prometheus_client::metrics::counter::Counter,
    what: &'static str,
) {
    match r {
        Ok(0) => {}
        Ok(n) => {
            counter.inc_by(n);
            tracing::info!(removed = n, what, "retention pass");
        }
        Err(e) => tracing::warn!(error = %e, what, "retention pass failed"),
    }
}

/// Every minute: forget revocations of expired tokens, in memory and in
/// the store, so neither grows without bound.
async fn prune_revocations(
    auth: Arc<Auth>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(REVOCATION_PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::clock::now_secs();
        metrics.revoked_tokens.set(auth.prune_revoked(now) as i64);
        if let Err(e) = store.revoked(now).await {
            tracing::warn!(error = %e, "pruning stored revocations failed");
        }
    }
}

/// How often expired revocations are forgotten.
const REVOCATION_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Run the broker on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let port = listener.local_addr()?.port();
    let state = build_state(cfg, port, shutdown).await?;
    serve(listener, state).await
}

/// Accept connections with prepared state until shutdown.
pub(crate) async fn serve(listener: TcpListener, state: Arc<AppState>) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, node = %state.node, "shoal listening");
    loop {
        let (stream, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let permit = match state.http_admission.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                state.metrics.http_refused(why.label());
                tracing::debug!(%peer, reason = why.label(), "HTTP connection refused");
                // Answer in plain HTTP (on a TLS port this is noise the
                // client drops, then sees the close), briefly, then close.
                state.tracker.spawn(async move {
                    let mut stream = stream;
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        use tokio::io::AsyncWriteExt;
                        let _ = stream
                            .write_all(&crate::httpconn::refusal_response(why))
                            .await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                });
                continue;
            }
        };
        let stream = crate::httpconn::WriteDeadline::new(
            stream,
            state.cfg.http.http_write_timeout,
            state.metrics.http_timeouts("write"),
        );
        state.tracker.spawn(async move {
            // Held while the connection speaks HTTP; an upgrade to a
            // WebSocket ends serve_http and frees it.
            let _permit = permit;
            match st.tls.as_ref().map(|t| t.acceptor()) {
                None => serve_http(st, TokioIo::new(stream), peer).await,
                Some(acceptor) => {
                    // A plain-HTTP request on the TLS port fails here and
                    // the socket is closed; nothing reaches the router.
                    match tokio::time::timeout(
                        st.cfg.conn.handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => serve_http(st, TokioIo::new(tls), peer).await,
                        Ok(Err(e)) => {
                            st.metrics.handshake("tls_failed");
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => st.metrics.handshake("tls_failed"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: closing connections with 1001");
    state.tracker.close();
    let drained = async {
        // Socket.IO sockets are told why (1001) before their engine.io
        // sessions (and the long-polls holding HTTP connections) close.
        state.sio.shutdown().await;
        state.tracker.wait().await
    };
    if tokio::time::timeout(state.cfg.server.shutdown_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown timeout: {} tasks still running",
            state.tracker.len()
        );
    }
    // Commit what connections queued before they closed, then stop the writer.
    if tokio::time::timeout(state.cfg.server.shutdown_timeout, state.hub.flush())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout: store writes still pending");
    }
    state.writer_stop.cancel();
    tracing::info!("shutdown complete");
    Ok(())
}

/// Serve HTTP/1.1 (with upgrades) on one accepted connection, plain or TLS.
async fn serve_http<I>(st: Arc<AppState>, io: TokioIo<I>, peer: std::net::SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_state = st.clone();
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(crate::http::Peer(peer));
        let st = svc_state.clone();
        async move {
            if let Some(sio) = st.sio.route(req.uri().path()) {
                let resp = hyper::service::Service::call(sio, req).await?;
                st.metrics.http("socketio", resp.status().as_u16());
                return Ok(resp.map(|b| Either::Right(BodyExt::boxed_unsync(b))));
            }
            let resp = crate::http::handle(st, req).await?;
            Ok::<_, std::convert::Infallible>(resp.map(Either::Left))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(st.cfg.conn.handshake_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = st.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        if e.is_timeout() {
            st.metrics.http_timeout("header");
        }
        tracing::debug!(%peer, error = %e, "http connection ended with error");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
