//! Prometheus metrics. Everything the broker counts is registered here
//! once; hot-path counters are pre-created per label value at start and
//! updated with a single atomic operation (no lock per message).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::{text::encode, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        counter::Counter, family::Family, gauge::Gauge, histogram::exponential_buckets, MetricType,
    },
    registry::Registry,
};

/// A fixed-bucket histogram whose `observe` is three relaxed atomic adds.
/// prometheus-client's own `Histogram` takes a mutex per observation, and
/// these sit on per-message paths shared by every connection.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: std::sync::Arc<HistInner>,
}

#[derive(Debug)]
struct HistInner {
    bounds: Vec<f64>,
    /// One per bound, plus the +Inf bucket.
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths, so it can be an integer atomic.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Buckets with these upper bounds (plus +Inf).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            inner: std::sync::Arc::new(HistInner {
                bounds,
                counts,
                count: AtomicU64::new(0),
                sum_micros: AtomicU64::new(0),
            }),
        }
    }

    /// Record one value.
    pub fn observe(&self, v: f64) {
        let i = &self.inner;
        let idx = i.bounds.partition_point(|b| *b < v);
        i.counts[idx].fetch_add(1, Ordering::Relaxed);
        i.count.fetch_add(1, Ordering::Relaxed);
        i.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let i = &self.inner;
        let buckets: Vec<(f64, u64)> = i
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(i.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        // Count from the buckets, so the exposition is self-consistent even
        // while observations race with the scrape.
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(
            i.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
use shoal_proto::{CloseCode, ErrorCode};

type L1 = [(&'static str, &'static str); 1];
type L2 = [(&'static str, &'static str); 2];

/// An upper bound of the `q` quantile (0..1) of cumulative `buckets` (as
/// [`Metrics::buckets`] gives them), as Prometheus' `histogram_quantile`
/// would pick it; None with no observations or past the last finite bound.
pub fn quantile_of(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    buckets
        .iter()
        .find(|(_, n)| *n >= want)
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
}

/// Client frame types, for pre-created counters (index via [`client_kind_index`]).
pub const CLIENT_KINDS: [&str; 15] = [
    "join", "leave", "pub", "typing", "members", "history", "mark", "delete", "ping", "edit",
    "react", "thread", "create", "moderate", "invalid",
];
/// Server frame types.
pub const SERVER_KINDS: [&str; 15] = [
    "hello", "joined", "left", "ack", "msg", "typing", "presence", "members", "gap", "history",
    "thread", "mark", "deleted", "pong", "error",
];

/// Index of a client frame kind in [`CLIENT_KINDS`].
pub fn client_kind_index(kind: &str) -> usize {
    CLIENT_KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(CLIENT_KINDS.len() - 1)
}

/// All broker metrics.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    handshakes: Family<L1, Counter>,
    auth_failures: Family<L1, Counter>,
    frames_in: Vec<Counter>,
    frames_out: Vec<Counter>,
    /// Room messages queued to recipients (one per recipient connection).
    pub deliveries: Counter,
    errors: Family<L1, Counter>,
    closes: Family<L1, Counter>,
    rate_limited: Family<L1, Counter>,
    /// Ephemeral frames dropped because a consumer's queue was full.
    pub ephemeral_dropped: Counter,
    /// Rooms currently in the registry.
    pub rooms: Gauge,
    /// Connection memberships across all rooms.
    pub room_members: Gauge,
    /// Time from receiving a `pub` to having queued its `msg` to every
    /// local recipient and its `ack` to the sender (after commit, in a
    /// stored namespace).
    pub publish_seconds: Histogram,
    /// Time to queue one message to every recipient connection.
    pub fanout_seconds: Histogram,
    /// Frames waiting in a connection's outbound queue, sampled when a
    /// frame has to wait (the socket did not take it at once) and when a
    /// drain finds the socket full.
    pub outbound_queue_depth: Histogram,
    /// Frames per drained (vectored) socket write.
    pub write_batch_frames: Histogram,
    /// Frames written straight to the socket by the task that produced
    /// them (no queue, no wake-up).
    pub direct_writes: Counter,
    /// Publishes answered from the idempotency window (retried cid).
    pub idempotent_retries: Counter,
    /// Operations per group-commit transaction.
    pub store_batch_ops: Histogram,
    /// Time to commit one group-commit transaction.
    pub store_commit_seconds: Histogram,
    /// Failed group commits.
    pub store_errors: Counter,
    /// 1 while the last store write succeeded.
    pub store_up: Gauge,
    /// Messages replayed to rejoining clients.
    pub replayed: Counter,
    /// Messages removed by retention.
    pub retention_removed: Counter,
    /// Attachments removed by their room's retention age.
    pub files_expired: Counter,
    /// Offline webhook counters.
    pub webhook: std::sync::Arc<crate::webhook::WebhookMetrics>,
    /// Bytes written to WebSocket peers.
    pub bytes_out: Counter,
    /// Bus payloads dropped on a full inbound queue (recovered by resync).
    pub bus_inbound_dropped: Counter,
    /// Bus payloads that did not decode.
    pub bus_bad_payloads: Counter,
    /// Sequenced messages (live or from the hot history) whose record did
    /// not decode: announced to members as a `gap`. Nonzero is a bug or a
    /// foreign writer on the bus: alert on it.
    pub bus_undeliverable: Counter,
    /// Messages read from the hot history to fill a delivery gap.
    pub bus_gap_filled: Counter,
    /// 1 while the cluster bus is reachable and subscribed (always 1
    /// without a bus).
    pub bus_up: Gauge,
    /// 1 while a Redis Cluster is only partly reachable (some shards out
    /// of reach: their rooms get 503, the others carry on).
    pub bus_degraded: Gauge,
    /// Messages copied from the hot streams to the shared store.
    pub archived: Counter,
    /// Messages that left a hot stream before the archiver copied them.
    pub archive_missed: Counter,
    /// Redis command round trips (publish script, replay, head).
    pub redis_command_seconds: Histogram,
    /// Commands in flight on this node's Redis command connections when
    /// one more is sent: how many share each pipelined write.
    pub redis_pipeline_depth: Histogram,
    /// Redis commands that failed (connection error, timeout, error reply).
    pub redis_errors: Counter,
    /// Times the subscription connection was re-established.
    pub redis_reconnects: Counter,
    /// Rooms this node is subscribed to on the bus.
    pub redis_subscriptions: Gauge,
    http: Family<L2, Counter>,
    http_refused: Family<L1, Counter>,
    http_timeouts: Family<L1, Counter>,
    /// Open HTTP (not upgraded) connections.
    pub http_connections: Gauge,
    /// Revoked tokens remembered in memory (pruned at their expiry).
    pub revoked_tokens: Gauge,
    process_cpu: Counter<f64, AtomicU64>,
    process_rss: Gauge,
    process_fds: Gauge,
}

impl Metrics {
    /// Create and register every metric; `node` becomes a label on all of them.
    pub fn new(node: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "shoal",
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node.to_string()),
            )]
            .into_iter(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let handshakes = Family::<L1, Counter>::default();
        registry.register(
            "handshakes",
            "WebSocket handshakes by result",
            handshakes.clone(),
        );
        for r in [
            "ok",
            "unauthorized",
            "forbidden_origin",
            "over_capacity",
            "bus_down",
            "rate_limited",
            "tls_failed",
            "bad_request",
            "failed",
        ] {
            let _ = handshakes.get_or_create(&[("result", r)]);
        }
        let auth_failures = Family::<L1, Counter>::default();
        registry.register(
            "auth_failures",
            "Rejected tokens and logins by reason",
            auth_failures.clone(),
        );
        for e in crate::auth::AuthError::ALL {
            let _ = auth_failures.get_or_create(&[("reason", e.label())]);
        }
        let _ = auth_failures.get_or_create(&[("reason", "bad_password")]);
        let _ = auth_failures.get_or_create(&[("reason", "bad_api_key")]);
        let fin = Family::<L1, Counter>::default();
        registry.register("frames_in", "Client frames received by type", fin.clone());
        let frames_in = CLIENT_KINDS
            .iter()
            .map(|k| fin.get_or_create(&[("type", k)]).clone())
            .collect();
        let fout = Family::<L1, Counter>::default();
        registry.register("frames_out", "Server frames queued by type", fout.clone());
        let frames_out = SERVER_KINDS
            .iter()
            .map(|k| fout.get_or_create(&[("type", k)]).clone())
            .collect();
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Room messages queued to recipient connections",
            deliveries.clone(),
        );
        let errors = Family::<L1, Counter>::default();
        registry.register("errors", "Error frames sent by code", errors.clone());
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::TooLarge,
            ErrorCode::RateLimited,
            ErrorCode::Internal,
            ErrorCode::Unavailable,
        ] {
            let _ = errors.get_or_create(&[("code", c.name())]);
        }
        let closes = Family::<L1, Counter>::default();
        registry.register(
            "closes",
            "Connections closed by the server, by close reason",
            closes.clone(),
        );
        for c in CloseCode::ALL {
            let _ = closes.get_or_create(&[("reason", close_label(c))]);
        }
        let rate_limited = Family::<L1, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rate or count limit, by kind",
            rate_limited.clone(),
        );
        for k in ["frame", "typing", "rooms", "login", "handshake", "user"] {
            let _ = rate_limited.get_or_create(&[("kind", k)]);
        }
        let ephemeral_dropped = Counter::default();
        registry.register(
            "ephemeral_dropped",
            "Ephemeral frames dropped for slow consumers",
            ephemeral_dropped.clone(),
        );
        let rooms = Gauge::default();
        registry.register("rooms", "Rooms in the registry", rooms.clone());
        let room_members = Gauge::default();
        registry.register(
            "room_members",
            "Connection memberships across rooms",
            room_members.clone(),
        );
        let publish_seconds = Histogram::new(exponential_buckets(1e-6, 2.0, 24));
        registry.register(
            "publish_seconds",
            "Publish handling time until every local recipient has the message queued",
            publish_seconds.clone(),
        );
        let fanout_seconds = Histogram::new(exponential_buckets(1e-6, 2.0, 24));
        registry.register(
            "fanout_seconds",
            "Time to queue one message to every recipient connection",
            fanout_seconds.clone(),
        );
        let outbound_queue_depth = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "outbound_queue_depth",
            "Frames waiting in a connection's outbound queue when a frame has to wait",
            outbound_queue_depth.clone(),
        );
        let write_batch_frames = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "write_batch_frames",
            "Frames per drained (vectored) socket write",
            write_batch_frames.clone(),
        );
        let direct_writes = Counter::default();
        registry.register(
            "direct_writes",
            "Frames written straight to the socket by the task that produced them",
            direct_writes.clone(),
        );
        let idempotent_retries = Counter::default();
        registry.register(
            "idempotent_retries",
            "Publishes answered with the original seq of a retried client message id",
            idempotent_retries.clone(),
        );
        let store_batch_ops = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "store_batch_ops",
            "Operations per group-commit transaction",
            store_batch_ops.clone(),
        );
        let store_commit_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 20));
        registry.register(
            "store_commit_seconds",
            "Time to write and commit one group-commit transaction",
            store_commit_seconds.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Failed group-commit transactions",
            store_errors.clone(),
        );
        let store_up: Gauge = Gauge::default();
        store_up.set(1);
        registry.register(
            "store_up",
            "1 while the last store write succeeded, else 0",
            store_up.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "replayed",
            "Stored messages replayed to clients joining with since",
            replayed.clone(),
        );
        let files_expired = Counter::default();
        registry.register(
            "files_expired",
            "Attachments removed because their room's retention age passed",
            files_expired.clone(),
        );
        let retention_removed = Counter::default();
        registry.register(
            "retention_removed",
            "Messages removed by retention",
            retention_removed.clone(),
        );
        let webhook = std::sync::Arc::new(crate::webhook::WebhookMetrics::default());
        registry.register(
            "webhook_sent",
            "Offline notifications accepted by the webhook (2xx)",
            webhook.sent.clone(),
        );
        registry.register(
            "webhook_failed_attempts",
            "Offline webhook attempts that failed (non-2xx, timeout, connection error)",
            webhook.failed_attempts.clone(),
        );
        registry.register(
            "webhook_dropped",
            "Offline notifications given up after every retry or dropped on a full queue",
            webhook.dropped.clone(),
        );
        let bytes_out = Counter::default();
        registry.register(
            "ws_out_bytes",
            "Bytes written to WebSocket peers",
            bytes_out.clone(),
        );
        let bus_inbound_dropped = Counter::default();
        registry.register(
            "bus_inbound_dropped",
            "Bus payloads dropped on a full inbound queue (then read back from the hot history)",
            bus_inbound_dropped.clone(),
        );
        let bus_bad_payloads = Counter::default();
        registry.register(
            "bus_bad_payloads",
            "Bus payloads that could not be decoded",
            bus_bad_payloads.clone(),
        );
        let bus_undeliverable = Counter::default();
        registry.register(
            "bus_undeliverable",
            "Sequenced messages whose bus record did not decode, announced to members as a gap (a bug or a foreign writer: alert on any)",
            bus_undeliverable.clone(),
        );
        let bus_gap_filled = Counter::default();
        registry.register(
            "bus_gap_filled",
            "Messages read from the hot history to fill a delivery gap",
            bus_gap_filled.clone(),
        );
        let bus_degraded: Gauge = Gauge::default();
        registry.register(
            "bus_degraded",
            "1 while some Redis Cluster shards are out of reach (their rooms get 503)",
            bus_degraded.clone(),
        );
        let bus_up: Gauge = Gauge::default();
        bus_up.set(1);
        registry.register(
            "bus_up",
            "1 while the cluster bus is reachable and subscribed (always 1 on a single node)",
            bus_up.clone(),
        );
        let archived = Counter::default();
        registry.register(
            "archived",
            "Messages copied from the Redis hot streams to the shared store",
            archived.clone(),
        );
        let archive_missed = Counter::default();
        registry.register(
            "archive_missed",
            "Messages that left a hot stream before the archiver copied them",
            archive_missed.clone(),
        );
        let redis_command_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 20));
        registry.register(
            "redis_command_seconds",
            "Round trip of one Redis command",
            redis_command_seconds.clone(),
        );
        let redis_pipeline_depth = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "redis_pipeline_depth",
            "Commands in flight on the Redis command connections when one more is sent",
            redis_pipeline_depth.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis commands that failed",
            redis_errors.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_reconnects",
            "Times the Redis subscription connection was re-established",
            redis_reconnects.clone(),
        );
        let redis_subscriptions = Gauge::default();
        registry.register(
            "redis_subscriptions",
            "Rooms this node is subscribed to on the bus",
            redis_subscriptions.clone(),
        );
        let http = Family::<L2, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http.clone(),
        );
        let http_refused = Family::<L1, Counter>::default();
        registry.register(
            "http_refused",
            "HTTP connections refused with 503 by reason (total or per_address cap)",
            http_refused.clone(),
        );
        let http_timeouts = Family::<L1, Counter>::default();
        registry.register(
            "http_timeouts",
            "HTTP connections ended by a timeout: header (request head or keep-alive idle), body (stalled or under the minimum rate), write (response not read)",
            http_timeouts.clone(),
        );
        for kind in ["header", "body", "write"] {
            let _ = http_timeouts.get_or_create(&[("kind", kind)]);
        }
        let revoked_tokens = Gauge::default();
        registry.register(
            "revoked_tokens",
            "Revoked token ids remembered until their tokens expire",
            revoked_tokens.clone(),
        );
        let http_connections = Gauge::default();
        registry.register(
            "http_connections",
            "Open HTTP connections (not upgraded to WebSocket)",
            http_connections.clone(),
        );
        for route in ["health", "metrics"] {
            let _ = http.get_or_create(&[("route", route), ("status", "200")]);
        }
        let process_cpu = Counter::<f64, AtomicU64>::default();
        registry.register(
            "process_cpu_seconds",
            "CPU time used by the broker process",
            process_cpu.clone(),
        );
        let process_rss = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the broker process",
            process_rss.clone(),
        );
        let process_fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "Open file descriptors of the broker process",
            process_fds.clone(),
        );
        let process_start: Gauge = Gauge::default();
        registry.register(
            "process_start_time_seconds",
            "Start time of the broker, seconds since the epoch",
            process_start.clone(),
        );
        process_start.set(crate::clock::now_secs() as i64);
        Metrics {
            registry,
            connections,
            handshakes,
            auth_failures,
            frames_in,
            frames_out,
            deliveries,
            errors,
            closes,
            rate_limited,
            ephemeral_dropped,
            rooms,
            room_members,
            publish_seconds,
            fanout_seconds,
            outbound_queue_depth,
            write_batch_frames,
            idempotent_retries,
            store_batch_ops,
            store_commit_seconds,
            store_errors,
            store_up,
            replayed,
            retention_removed,
            files_expired,
            webhook,
            bytes_out,
            direct_writes,
            bus_inbound_dropped,
            bus_bad_payloads,
            bus_undeliverable,
            bus_gap_filled,
            bus_up,
            bus_degraded,
            archived,
            archive_missed,
            redis_command_seconds,
            redis_pipeline_depth,
            redis_errors,
            redis_reconnects,
            redis_subscriptions,
            http,
            http_refused,
            http_timeouts,
            http_connections,
            revoked_tokens,
            process_cpu,
            process_rss,
            process_fds,
        }
    }

    /// Count a handshake outcome.
    pub fn handshake(&self, result: &'static str) {
        self.handshakes.get_or_create(&[("result", result)]).inc();
    }
    /// Count an authentication failure.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }
    /// Count a received client frame (index from [`client_kind_index`]).
    pub fn frame_in(&self, idx: usize) {
        if let Some(c) = self.frames_in.get(idx) {
            c.inc();
        }
    }
    /// Count queued server frames of one kind.
    pub fn frames_out(&self, kind: &str, n: u64) {
        if let Some(i) = SERVER_KINDS.iter().position(|k| *k == kind) {
            self.frames_out[i].inc_by(n);
        }
    }
    /// Count an error frame.
    pub fn error(&self, code: ErrorCode) {
        self.errors.get_or_create(&[("code", code.name())]).inc();
    }
    /// Count a server-initiated close.
    pub fn close(&self, code: CloseCode) {
        self.closes
            .get_or_create(&[("reason", close_label(code))])
            .inc();
    }
    /// Count a rate-limit refusal.
    pub fn rate_limited(&self, kind: &'static str) {
        self.rate_limited.get_or_create(&[("kind", kind)]).inc();
    }
    /// Count an HTTP request.
    pub fn http(&self, route: &'static str, status: u16) {
        self.http
            .get_or_create(&[("route", route), ("status", status_label(status))])
            .inc();
    }

    /// Count an HTTP connection refused at a cap.
    pub fn http_refused(&self, reason: &'static str) {
        self.http_refused.get_or_create(&[("reason", reason)]).inc();
    }
    /// Count an HTTP connection ended by a timeout.
    pub fn http_timeout(&self, kind: &'static str) {
        self.http_timeouts(kind).inc();
    }
    /// The counter of HTTP connections ended by a `kind` timeout.
    pub fn http_timeouts(&self, kind: &'static str) -> Counter {
        self.http_timeouts.get_or_create(&[("kind", kind)]).clone()
    }

    /// Render the text exposition format.
    /// An upper bound of the `q` quantile (0..1) of histogram `name` since
    /// start, in seconds (None with no observations); see [`quantile_of`].
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        quantile_of(&self.buckets(name), q)
    }

    /// Histogram `name`'s cumulative buckets (upper bound in seconds,
    /// count), read from the exposition text: the client library does not
    /// hand them out otherwise. For the admin console, which reads several
    /// quantiles from one call; dashboards should use Prometheus.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let text = self.render();
        let prefix = format!("shoal_{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| {
                // Labels (the node's) before `le`.
                let (_, l) = l.split_once("le=\"")?;
                let (le, rest) = l.split_once('"')?;
                let n = rest.trim_start_matches('}').trim().split(' ').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, n.parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    pub fn render(&self) -> String {
        self.refresh_process();
        let mut out = String::with_capacity(16 * 1024);
        if encode(&mut out, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        out
    }

    fn refresh_process(&self) {
        // Linux /proc; on other systems these stay 0.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // Fields after the comm: utime is 14th overall (index 11 here), stime 12, rss 22.
                let tick = 100.0;
                let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                // A counter only moves forward: add what accrued since the
                // last scrape.
                let total = (ut + st) / tick;
                let seen = self.process_cpu.get();
                if total > seen {
                    self.process_cpu.inc_by(total - seen);
                }
                let rss: i64 = f.get(21).and_then(|v| v.parse().ok()).unwrap_or(0);
                self.process_rss.set(rss * 4096);
            }
        }
        if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
            self.process_fds.set(d.count() as i64);
        }
    }
}

/// Stable close-reason label.
pub fn close_label(c: CloseCode) -> &'static str {
    match c {
        CloseCode::Normal => "normal",
        CloseCode::GoingAway => "shutdown",
        CloseCode::Protocol => "protocol_error",
        CloseCode::InvalidPayload => "invalid_payload",
        CloseCode::Policy => "policy",
        CloseCode::TooBig => "too_big",
        CloseCode::Internal => "internal",
        CloseCode::TokenExpired => "token_expired",
        CloseCode::TokenRevoked => "token_revoked",
        CloseCode::SlowConsumer => "slow_consumer",
        CloseCode::IdleTimeout => "idle_timeout",
        CloseCode::TryAgainLater => "try_again_later",
        CloseCode::ClusterLost => "cluster_lost",
        CloseCode::Disconnected => "disconnected",
    }
}

fn status_label(s: u16) -> &'static str {
    match s {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

/// Monotonic id source (connection ids).
pub static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Next unique id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let m = Metrics::new("t");
        assert_eq!(m.quantile("publish_seconds", 0.99), None, "no observations");
        for _ in 0..98 {
            m.publish_seconds.observe(0.000_010);
        }
        m.publish_seconds.observe(0.002);
        m.publish_seconds.observe(0.002);
        let p50 = m.quantile("publish_seconds", 0.5).expect("p50");
        let p99 = m.quantile("publish_seconds", 0.99).expect("p99");
        assert!((0.000_010..0.000_020).contains(&p50), "{p50}");
        assert!((0.002..0.004_1).contains(&p99), "{p99}");
    }

    #[test]
    fn atomic_histogram_exposition() {
        let m = Metrics::new("n1");
        for v in [0.5, 1.5, 3.0, 1e9] {
            m.write_batch_frames.observe(v);
        }
        let text = m.render();
        assert!(text.contains("# TYPE shoal_write_batch_frames histogram"));
        for (le, n) in [
            ("1.0", 1),
            ("2.0", 2),
            ("4.0", 3),
            ("512.0", 3),
            ("+Inf", 4),
        ] {
            let line = format!("shoal_write_batch_frames_bucket{{node=\"n1\",le=\"{le}\"}} {n}");
            assert!(text.contains(&line), "missing `{line}` in\n{text}");
        }
        assert!(text.contains("shoal_write_batch_frames_count{node=\"n1\"} 4"));
        assert!(text.contains("shoal_write_batch_frames_sum{node=\"n1\"} 1000000005"));
    }
}
