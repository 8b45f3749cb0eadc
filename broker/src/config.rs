//! The broker's one typed configuration, from command-line flags and
//! `SHOAL_*` environment variables. Every limit lives here with its default
//! and overflow policy, so `shoal --help` is the reference.
//!
//! Rules:
//! - one group per subsystem ([`ServerOpts`], [`AuthOpts`], [`ConnOpts`],
//!   [`HttpOpts`], [`RoomOpts`], [`StoreOpts`], [`ClusterOpts`]), shown as
//!   one section of `--help`; a subsystem takes its own group, not copies
//!   of its fields;
//! - durations are [`Duration`]s written with a unit (`10s`, `500ms`,
//!   `2m`); a bare number is read in the unit the flag always had (seconds,
//!   or milliseconds for the `-ms` flags), so old command lines still work;
//! - each group checks its own invariants ([`ConfigError`]); nothing here
//!   depends on the subsystems it configures.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Parser};

/// Shortest accepted `--api-key`.
pub const MIN_API_KEY_LEN: usize = 16;

/// A configuration that cannot run, with the flag to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A flag's value is outside what it accepts.
    #[error("--{flag}: {why}")]
    Invalid {
        /// The flag, without dashes.
        flag: &'static str,
        /// What it must be.
        why: String,
    },
    /// A flag that another one needs is missing.
    #[error("--{flag} needs --{needs}")]
    Needs {
        /// The flag that was given.
        flag: &'static str,
        /// The one it needs, with an example value.
        needs: &'static str,
    },
}

fn invalid(flag: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        why: why.into(),
    }
}

/// A duration flag: `10s`, `500ms`, `1m30s`, or a bare number of `unit`.
fn duration_in(s: &str, unit: Duration) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => unit
            .checked_mul(u32::try_from(n).map_err(|_| format!("`{s}` is too long"))?)
            .ok_or_else(|| format!("`{s}` is too long")),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}`: {e} (write e.g. 10s, 500ms, 2m)")),
    }
}

/// A duration whose bare numbers are seconds.
fn secs(s: &str) -> Result<Duration, String> {
    duration_in(s, Duration::from_secs(1))
}

/// A duration whose bare numbers are milliseconds (the `-ms` flags).
fn millis(s: &str) -> Result<Duration, String> {
    duration_in(s, Duration::from_millis(1))
}

/// Shoal: a real-time messaging broker (rooms, direct messages, presence)
/// over WebSocket.
#[derive(Debug, Clone, Parser)]
#[command(name = "shoal", version, about, long_about = None)]
pub struct Config {
    /// Listening, TLS, threads, logs, shutdown.
    #[command(flatten)]
    pub server: ServerOpts,
    /// Tokens, logins and the server API.
    #[command(flatten)]
    pub auth: AuthOpts,
    /// WebSocket connections: limits, queues, timers.
    #[command(flatten)]
    pub conn: ConnOpts,
    /// HTTP requests and uploads.
    #[command(flatten)]
    pub http: HttpOpts,
    /// Rooms, namespaces and direct messages.
    #[command(flatten)]
    pub rooms: RoomOpts,
    /// Where data is kept.
    #[command(flatten)]
    pub store: StoreOpts,
    /// Several nodes sharing rooms through Redis.
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

/// Listening, TLS, threads, logs and shutdown.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerOpts {
    /// Address to listen on for HTTP, REST and WebSocket (`/ws`).
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Node id reported in `hello`, `/health` and metrics. Default: hostname-port.
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,

    /// PEM certificate chain: serve TLS (`https://`, `wss://`) on `--listen`
    /// instead of plain HTTP. Needs `--tls-key`. Reloaded on SIGHUP.
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Runtime worker threads; 0: one per CPU core. Set it to the CPU
    /// limit of a container, or to split one machine between several
    /// nodes (more threads than cores only adds context switches).
    #[arg(long, env = "SHOAL_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// How long graceful shutdown waits for connections to drain after
    /// sending close 1001, before exiting anyway.
    #[arg(long, env = "SHOAL_SHUTDOWN_TIMEOUT", value_parser = secs, value_name = "DURATION", default_value = "10s")]
    pub shutdown_timeout: Duration,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "SHOAL_LOG", default_value = "info")]
    pub log: String,
}

impl ServerOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Needs {
                flag: "tls-cert",
                needs: "tls-key (they go together)",
            });
        }
        Ok(())
    }
}

/// Tokens, logins, origins and the server API.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthOpts {
    /// HS256 secret for signing and verifying tokens. If unset, a random
    /// secret is generated into `<data>/jwt_secret` on first start and reused.
    #[arg(long, env = "SHOAL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with an RSA public key: RS256 tokens from an external issuer
    /// are accepted and verified with it.
    #[arg(long, env = "SHOAL_JWT_RSA_PUBLIC_KEY")]
    pub jwt_rsa_public_key: Option<PathBuf>,

    /// PEM file with an Ed25519 public key: EdDSA tokens from an external
    /// issuer are accepted and verified with it.
    #[arg(long, env = "SHOAL_JWT_ED25519_PUBLIC_KEY")]
    pub jwt_ed25519_public_key: Option<PathBuf>,

    /// Lifetime of tokens issued by `POST /api/login`.
    #[arg(long, env = "SHOAL_TOKEN_TTL", value_parser = secs, value_name = "DURATION", default_value = "1day")]
    pub token_ttl: Duration,

    /// Key for the server API (`POST /api/rooms/{room}/messages`), sent as
    /// `Authorization: Bearer <key>` (only there: never in a URL). At
    /// least 16 bytes; an empty key is refused at start. Server API
    /// disabled when unset.
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Logins and registrations per minute from one client address (burst
    /// as many); more get 429 with Retry-After before any password is
    /// hashed. 0: no limit. Behind a proxy every request comes from its
    /// address: raise it there.
    #[arg(long, env = "SHOAL_LOGIN_RATE_PER_IP", default_value_t = 300)]
    pub login_rate_per_ip: u32,

    /// Login attempts per minute for one user name (burst as many); more
    /// get 429 with Retry-After. 0: no limit.
    #[arg(long, env = "SHOAL_LOGIN_RATE_PER_USER", default_value_t = 10)]
    pub login_rate_per_user: u32,

    /// Allowed `Origin` values for browser WebSocket handshakes
    /// (comma-separated). Empty allows any origin; requests without an
    /// Origin header (non-browser clients) are always allowed.
    #[arg(long, env = "SHOAL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Operators (comma-separated user names): they use the admin console
    /// (`/admin`, `/api/admin/...`) and moderate any room. Tokens from an
    /// external issuer may carry `"admin": true` instead.
    #[arg(long, env = "SHOAL_ADMINS", value_delimiter = ',')]
    pub admins: Vec<String>,
}

impl AuthOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(k) = &self.api_key {
            if k.trim().len() < MIN_API_KEY_LEN {
                return Err(invalid(
                    "api-key",
                    format!(
                        "at least {MIN_API_KEY_LEN} bytes (unset it to disable the server API)"
                    ),
                ));
            }
        }
        if self.token_ttl.as_secs() == 0 {
            return Err(invalid("token-ttl", "at least one second"));
        }
        if self.jwt_secret.as_ref().is_some_and(|k| k.len() < 32) {
            return Err(invalid("jwt-secret", "at least 32 bytes"));
        }
        Ok(())
    }
}

/// WebSocket connections: admission, message and queue bounds, rates,
/// timers.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "WebSocket connections")]
pub struct ConnOpts {
    /// WebSocket handshakes admitted per second (token bucket, burst of one
    /// second's worth); over it the upgrade completes and is closed at once
    /// with 4005 (try again later), which tells clients to back off with
    /// jitter. Protects a node from reconnection storms. 0 = unlimited.
    #[arg(long, env = "SHOAL_HANDSHAKE_RATE", default_value_t = 5000.0)]
    pub handshake_rate: f64,

    /// Maximum concurrent WebSocket connections; more get HTTP 503 before upgrade.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Largest accepted WebSocket message in bytes (after reassembly of
    /// fragments). Larger closes the connection with 1009.
    #[arg(long, env = "SHOAL_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_message_size: usize,

    /// Outbound queue bound per connection, in frames. When full, ephemeral
    /// frames (typing, presence) are dropped; any other frame closes the
    /// connection with 4003 (slow consumer).
    #[arg(long, env = "SHOAL_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Most frames one writer coalesces into a single vectored write.
    #[arg(long, env = "SHOAL_WRITE_BATCH", default_value_t = 64)]
    pub write_batch: usize,

    /// How long a single socket write may take before the peer is treated
    /// as a slow consumer and dropped.
    #[arg(long, env = "SHOAL_WRITE_TIMEOUT", value_parser = secs, value_name = "DURATION", default_value = "10s")]
    pub write_timeout: Duration,

    /// Maximum rooms one connection may be in; more gets `error 429`.
    #[arg(long, env = "SHOAL_MAX_ROOMS_PER_CONNECTION", default_value_t = 256)]
    pub max_rooms_per_connection: usize,

    /// Sustained client frame rate per connection (token bucket refill, frames/s).
    #[arg(long, env = "SHOAL_RATE_LIMIT", default_value_t = 100.0)]
    pub rate_limit: f64,

    /// Token bucket size per connection (burst, frames).
    #[arg(long, env = "SHOAL_RATE_BURST", default_value_t = 200.0)]
    pub rate_burst: f64,

    /// Rate-limited frames tolerated within 10 s before the connection is
    /// closed with 1008 (policy).
    #[arg(long, env = "SHOAL_RATE_STRIKES", default_value_t = 200)]
    pub rate_strikes: u32,

    /// Shortest time between two `typing` frames from one connection to
    /// one room; faster ones get `error 429` and are not forwarded.
    #[arg(
        long = "typing-interval-ms",
        env = "SHOAL_TYPING_INTERVAL_MS",
        value_parser = millis,
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub typing_interval: Duration,

    /// Time between server pings on an idle connection.
    #[arg(long, env = "SHOAL_PING_INTERVAL", value_parser = secs, value_name = "DURATION", default_value = "25s")]
    pub ping_interval: Duration,

    /// Time without any frame from the client (pongs count) before the
    /// connection is closed with 4004.
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT", value_parser = secs, value_name = "DURATION", default_value = "60s")]
    pub idle_timeout: Duration,

    /// Time a client has to send its HTTP request headers and complete
    /// the WebSocket upgrade.
    #[arg(long, env = "SHOAL_HANDSHAKE_TIMEOUT", value_parser = secs, value_name = "DURATION", default_value = "10s")]
    pub handshake_timeout: Duration,
}

impl ConnOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_message_size < 128 {
            return Err(invalid("max-message-size", "at least 128 bytes"));
        }
        if self.outbound_queue == 0 || self.write_batch == 0 {
            return Err(invalid("outbound-queue", "positive, as --write-batch"));
        }
        if self.rate_limit <= 0.0 || self.rate_burst < 1.0 {
            return Err(invalid("rate-limit", "> 0, with --rate-burst >= 1"));
        }
        if self.write_timeout.is_zero() {
            return Err(invalid("write-timeout", "positive"));
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return Err(invalid(
                "idle-timeout",
                "longer than --ping-interval (which is positive)",
            ));
        }
        Ok(())
    }
}

/// HTTP requests and uploads: admission, body and write timeouts, file
/// bounds.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP requests and uploads")]
pub struct HttpOpts {
    /// Longest wait for the next part of an HTTP request body; also the
    /// grace before `--http-body-min-rate` applies. Over it: 408 and the
    /// connection closes.
    #[arg(long, env = "SHOAL_HTTP_BODY_TIMEOUT", value_parser = secs, value_name = "DURATION", default_value = "10s")]
    pub http_body_timeout: Duration,

    /// Slowest accepted average rate of an HTTP request body, in bytes per
    /// second, once the body timeout's grace has passed (0: no minimum).
    /// Slower: 408 and the connection closes.
    #[arg(long, env = "SHOAL_HTTP_BODY_MIN_RATE", default_value_t = 16 * 1024)]
    pub http_body_min_rate: u64,

    /// How long an HTTP response write may make no progress (a client that
    /// does not read) before the connection is dropped.
    #[arg(long, env = "SHOAL_HTTP_WRITE_TIMEOUT", value_parser = secs, value_name = "DURATION", default_value = "30s")]
    pub http_write_timeout: Duration,

    /// Maximum open HTTP connections (requests, keep-alive, handshakes in
    /// progress; not upgraded WebSockets, which `--max-connections`
    /// counts). More get 503 and are closed.
    #[arg(long, env = "SHOAL_MAX_HTTP_CONNECTIONS", default_value_t = 4096)]
    pub max_http_connections: usize,

    /// Maximum open HTTP connections from one client address (0: no
    /// limit). Behind a proxy every connection comes from the proxy's
    /// address: raise it or set 0 there.
    #[arg(
        long,
        env = "SHOAL_MAX_HTTP_CONNECTIONS_PER_IP",
        default_value_t = 1024
    )]
    pub max_http_connections_per_ip: usize,

    /// Largest attachment accepted by `POST /api/files`, in bytes; larger
    /// gets 413.
    #[arg(long, env = "SHOAL_MAX_FILE_SIZE", default_value_t = 5 * 1024 * 1024)]
    pub max_file_size: usize,

    /// Bytes of attachments one user may keep stored (all rooms); an
    /// upload past it gets 413. Files leave with their room's retention
    /// (`retain_age`). 0: no quota.
    #[arg(long, env = "SHOAL_USER_FILE_QUOTA", default_value_t = 100 * 1024 * 1024)]
    pub user_file_quota: u64,

    /// Bytes of uploads the node reads at once, all connections together
    /// (each upload holds its Content-Length while it is read). More get
    /// 503 with Retry-After. At least `--max-file-size`.
    #[arg(long, env = "SHOAL_MAX_UPLOAD_MEMORY", default_value_t = 64 * 1024 * 1024)]
    pub max_upload_memory: usize,
}

impl HttpOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.http_body_timeout.is_zero() {
            return Err(invalid("http-body-timeout", "positive"));
        }
        if self.http_write_timeout.is_zero() {
            return Err(invalid("http-write-timeout", "positive"));
        }
        if self.max_http_connections == 0 {
            return Err(invalid("max-http-connections", "positive"));
        }
        if self.max_upload_memory < self.max_file_size || self.max_upload_memory > u32::MAX as usize
        {
            return Err(invalid(
                "max-upload-memory",
                "at least --max-file-size and under 4 GiB",
            ));
        }
        Ok(())
    }

    /// How HTTP request bodies of at most `max` bytes are read.
    pub fn body_limits(&self, max: usize) -> crate::httpconn::BodyLimits {
        crate::httpconn::BodyLimits {
            max,
            timeout: self.http_body_timeout,
            min_rate: self.http_body_min_rate,
        }
    }
}

/// Rooms, namespaces, direct messages and the registry.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Rooms")]
pub struct RoomOpts {
    /// Per-namespace options, `NS:key=value,...` (repeatable; `;`-separated in
    /// the env var). NS `*` sets the defaults for rooms without a namespace
    /// and for unlisted namespaces. Keys: `publish=members|api` (who may
    /// publish; `api` = only `POST /api/publish`), `presence=on|off`,
    /// `max_members=N` (default 10000), `persist=on|off` (store history;
    /// default on), `retain_messages=N` (keep the newest N per room),
    /// `retain_age=SECS` (drop older messages); no retention by default.
    #[arg(long = "namespace", env = "SHOAL_NAMESPACES", value_delimiter = ';')]
    pub namespaces: Vec<NamespaceSpec>,

    /// How long a client message id (`pub {cid}`) is remembered per room:
    /// a retried `pub` with the same cid within the window is acked with
    /// the original seq and not delivered again. At most 4096 ids per room.
    #[arg(long, env = "SHOAL_IDEMPOTENCY_WINDOW", value_parser = secs, value_name = "DURATION", default_value = "10m")]
    pub idempotency_window: Duration,

    /// Stored rooms one user may be a member of (memberships last until
    /// `leave`); joining one more gets `error 409`.
    #[arg(long, env = "SHOAL_MAX_ROOMS_PER_USER", default_value_t = 1000)]
    pub max_rooms_per_user: u64,

    /// URL that gets `POST {user, room, seq, from, preview}` (JSON) when a
    /// direct message commits and its recipient has no live connection, for
    /// push notifications. Plain `http://` (put a TLS proxy in front for
    /// an external service). Retried 4 times with doubling backoff; at most
    /// 1024 wait, more are dropped and counted.
    #[arg(long, env = "SHOAL_OFFLINE_WEBHOOK")]
    pub offline_webhook: Option<String>,

    /// First retry delay of the offline webhook.
    #[arg(
        long = "webhook-backoff-ms",
        env = "SHOAL_WEBHOOK_BACKOFF_MS",
        value_parser = millis,
        value_name = "DURATION",
        default_value = "500ms"
    )]
    pub webhook_backoff: Duration,

    /// Number of room registry shards (rounded up to a power of two).
    #[arg(long, env = "SHOAL_SHARDS", default_value_t = 64)]
    pub shards: usize,
}

impl RoomOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if self
            .offline_webhook
            .as_ref()
            .is_some_and(|u| !u.starts_with("http://"))
        {
            return Err(invalid("offline-webhook", "an http:// URL"));
        }
        Ok(())
    }

    /// Namespace options resolved against the `*` defaults.
    pub fn namespace_table(&self) -> NamespaceTable {
        let mut default = NamespaceOpts::default();
        if let Some(s) = self.namespaces.iter().find(|s| s.name == "*") {
            default = s.apply(default);
        }
        let by_name = self
            .namespaces
            .iter()
            .filter(|s| s.name != "*")
            .map(|s| (s.name.clone(), s.apply(default.clone())))
            .collect();
        NamespaceTable { default, by_name }
    }
}

/// Where users, memberships, receipts, files and history are kept.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub struct StoreOpts {
    /// Data directory for the embedded database and the generated JWT secret.
    #[arg(long, env = "SHOAL_DATA", default_value = "./data")]
    pub data: PathBuf,

    /// Where users, memberships, receipts, files and (in a cluster) the
    /// archived history live: `sqlite` (embedded, in `--data`) or
    /// `postgres` (shared by the nodes of a cluster, `--postgres-url`).
    #[arg(long = "store", env = "SHOAL_STORE", value_enum, default_value_t = StoreKind::Sqlite)]
    pub kind: StoreKind,

    /// SQLite durability: `normal` survives a crash of the broker process
    /// (kill -9) but not of the machine; `full` fsyncs every commit and
    /// survives power loss, at a higher publish latency.
    #[arg(long, env = "SHOAL_STORE_SYNC", value_enum, default_value_t = StoreSync::Normal)]
    pub store_sync: StoreSync,

    /// Bound of the queue from publishers to the group-commit writer, in
    /// operations. When full, publishers wait (backpressure to the socket);
    /// nothing is dropped.
    #[arg(long, env = "SHOAL_STORE_QUEUE", default_value_t = 16_384)]
    pub store_queue: usize,

    /// Most operations committed in one transaction (group commit).
    #[arg(long, env = "SHOAL_STORE_BATCH", default_value_t = 1024)]
    pub store_batch: usize,

    /// Time between retention passes (see `retain_messages` and
    /// `retain_age` in `--namespace`).
    #[arg(long, env = "SHOAL_RETENTION_INTERVAL", value_parser = secs, value_name = "DURATION", default_value = "1m")]
    pub retention_interval: Duration,

    /// PostgreSQL for `--store postgres`:
    /// `postgres://user:pass@host:port/db`. Migrations run at start.
    #[arg(long, env = "SHOAL_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,

    /// PostgreSQL connections in this node's pool.
    #[arg(long, env = "SHOAL_POSTGRES_POOL", default_value_t = 16)]
    pub postgres_pool: usize,
}

impl StoreOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.store_queue == 0 || self.store_batch == 0 {
            return Err(invalid("store-queue", "positive, as --store-batch"));
        }
        if self.retention_interval.is_zero() {
            return Err(invalid("retention-interval", "positive"));
        }
        if self.kind == StoreKind::Postgres {
            match &self.postgres_url {
                Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {}
                _ => {
                    return Err(ConfigError::Needs {
                        flag: "store postgres",
                        needs: "postgres-url postgres://...",
                    })
                }
            }
            if self.postgres_pool == 0 {
                return Err(invalid("postgres-pool", "positive"));
            }
        }
        Ok(())
    }

    /// Whether the store is shared by every node (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.kind == StoreKind::Postgres
    }
}

/// Several nodes sharing rooms through Redis.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cluster")]
pub struct ClusterOpts {
    /// Cluster bus: `local` (a single node; rooms are sequenced in
    /// process) or `redis` (several nodes share rooms through
    /// `--redis-url`; Redis assigns each room's seqs and keeps its hot
    /// history).
    #[arg(long, env = "SHOAL_BUS", value_enum, default_value_t = BusKind::Local)]
    pub bus: BusKind,

    /// Redis for `--bus redis`: `redis://[user:pass@]host:port[/db]`
    /// (`rediss://` for TLS) for one Redis, or
    /// `redis+cluster://[user:pass@]host:port,host:port,...` (`rediss+cluster://`)
    /// for a Redis Cluster given by seed nodes; rooms spread over its
    /// shards by hash tag.
    #[arg(long, env = "SHOAL_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<RedisTarget>,

    /// Multiplexed Redis command connections. Publishes from every
    /// WebSocket connection share them and are pipelined.
    #[arg(long, env = "SHOAL_REDIS_CONNECTIONS", default_value_t = 2)]
    pub redis_connections: usize,

    /// Messages kept per room in Redis (the hot history that `join
    /// {since}` and gap recovery read). Trimmed approximately (`MAXLEN ~`);
    /// a `since` older than what is kept gets a `gap` frame.
    #[arg(long, env = "SHOAL_REDIS_STREAM_LEN", default_value_t = 10_000)]
    pub redis_stream_len: usize,

    /// Timeout of one Redis command and of connecting. A publish that
    /// times out is answered `error 503` (retry with the same `cid` is
    /// safe).
    #[arg(
        long = "redis-timeout-ms",
        env = "SHOAL_REDIS_TIMEOUT_MS",
        value_parser = millis,
        value_name = "DURATION",
        default_value = "2s"
    )]
    pub redis_timeout: Duration,

    /// Publishes per second one user may make across the whole cluster
    /// (`--bus redis`; counted in Redis by the publish script). Over it a
    /// publish gets `error 429`. 0: no cluster-wide limit (the
    /// per-connection `--rate-limit` still applies).
    #[arg(long, env = "SHOAL_USER_PUBLISH_RATE", default_value_t = 0)]
    pub user_publish_rate: u64,

    /// Replicas of a room's Redis primary that must hold a message before
    /// it is delivered and acked (`WAIT`, within `--redis-timeout-ms`;
    /// fewer in time: `error 503`, retry with the `cid`). With replicas,
    /// set it to 1 so that a failover loses no acked message and reuses
    /// no seq; 0 relies on Redis's asynchronous replication (a primary
    /// that dies may take its last acked messages with it). Costs one
    /// round trip per publish.
    #[arg(long, env = "SHOAL_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u64,

    /// Presence lease of a node process: a process that stops refreshing
    /// it (crashed) has its users leave the rooms' presence within 1.5
    /// times this, whether or not the node restarts under the same id.
    /// Refreshed every third of it.
    #[arg(
        long = "presence-lease-ms",
        env = "SHOAL_PRESENCE_LEASE_MS",
        value_parser = millis,
        value_name = "DURATION",
        default_value = "10s"
    )]
    pub presence_lease: Duration,

    /// Bus payloads waiting for delivery on this node. Overflow policy:
    /// the payload is dropped and counted, and the node reads what it
    /// missed from the hot history (no message is lost, it comes later).
    #[arg(long, env = "SHOAL_BUS_INBOUND_QUEUE", default_value_t = 65_536)]
    pub bus_inbound_queue: usize,

    /// How long a node keeps its clients while it cannot reach the bus
    /// (Redis). A blip shorter than this is ridden out (publishes get
    /// `error 503`, connections stay); past it every client is closed
    /// with 4006 so it reconnects to a node that can still deliver. While
    /// the bus is down, WebSocket handshakes get 503.
    #[arg(
        long = "bus-down-grace-ms",
        env = "SHOAL_BUS_DOWN_GRACE_MS",
        value_parser = millis,
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub bus_down_grace: Duration,

    /// Time between sweeps of the archiver that copies messages from the
    /// Redis hot streams to PostgreSQL (`--bus redis --store postgres`;
    /// one node sweeps at a time).
    #[arg(
        long = "archive-interval-ms",
        env = "SHOAL_ARCHIVE_INTERVAL_MS",
        value_parser = millis,
        value_name = "DURATION",
        default_value = "100ms"
    )]
    pub archive_interval: Duration,

    /// This node's address as the other nodes reach it, for the admin
    /// console's cluster view (default: the listen address, 127.0.0.1 if
    /// it listens on every interface).
    #[arg(long, env = "SHOAL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
}

impl ClusterOpts {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.bus != BusKind::Redis {
            return Ok(());
        }
        if self.redis_url.is_none() {
            return Err(ConfigError::Needs {
                flag: "bus redis",
                needs: "redis-url redis://host:port",
            });
        }
        if self.redis_connections == 0 {
            return Err(invalid("redis-connections", "positive"));
        }
        if self.redis_timeout.is_zero() {
            return Err(invalid("redis-timeout-ms", "positive"));
        }
        if self.presence_lease < Duration::from_millis(300) {
            return Err(invalid("presence-lease-ms", "at least 300ms"));
        }
        if self.redis_stream_len < 100 {
            return Err(invalid("redis-stream-len", "at least 100"));
        }
        if self.bus_inbound_queue == 0 {
            return Err(invalid("bus-inbound-queue", "positive"));
        }
        if self.archive_interval.is_zero() {
            return Err(invalid("archive-interval-ms", "positive"));
        }
        Ok(())
    }
}

/// Where the bus's Redis is: `--redis-url`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis: its URL.
    Single(String),
    /// A Redis Cluster: one `redis://` URL per seed node.
    Cluster(Vec<String>),
}

impl FromStr for RedisTarget {
    type Err = String;
    fn from_str(url: &str) -> Result<RedisTarget, String> {
        let (scheme, rest) = if let Some(r) = url.strip_prefix("redis+cluster://") {
            ("redis", r)
        } else if let Some(r) = url.strip_prefix("rediss+cluster://") {
            ("rediss", r)
        } else if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(RedisTarget::Single(url.to_string()));
        } else {
            return Err(
                "--redis-url must be redis://, rediss://, redis+cluster:// or rediss+cluster://"
                    .into(),
            );
        };
        // `[user:pass@]h1:p1,h2:p2[/db][?query]`: the user info and the
        // suffix apply to every seed node.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, suffix) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (&authority[..=i], &authority[i + 1..]),
            None => ("", authority),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{userinfo}{h}{suffix}"))
            .collect();
        if nodes.is_empty() {
            return Err("a redis+cluster:// URL needs at least one host:port".into());
        }
        Ok(RedisTarget::Cluster(nodes))
    }
}

impl Config {
    /// Check every group's invariants (those clap cannot express).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.auth.validate()?;
        self.conn.validate()?;
        self.http.validate()?;
        self.rooms.validate()?;
        self.store.validate()?;
        self.cluster.validate()
    }

    /// Defaults with an ephemeral listen port and the given data dir; for tests.
    pub fn for_tests(data: PathBuf) -> Self {
        let mut c = Config::parse_from(["shoal"]);
        c.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.store.data = data;
        c
    }

    /// Like [`Config::for_tests`] with extra flags (data dir unset).
    pub fn parse_from_for_tests(args: &[&str]) -> Self {
        Config::parse_from(std::iter::once("shoal").chain(args.iter().copied()))
    }
}

/// SQLite durability (`--store-sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreSync {
    /// Survives a crash of the process, not of the machine.
    Normal,
    /// fsync on every commit: survives power loss.
    Full,
}

/// Which store a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// Embedded SQLite in `--data`.
    Sqlite,
    /// Shared PostgreSQL.
    Postgres,
}

/// Which cluster bus a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// Single node: no bus.
    Local,
    /// Redis (single instance).
    Redis,
}

/// Who may publish in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishPolicy {
    /// Any member of the room.
    Members,
    /// Only the server API.
    Api,
}

/// Options of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceOpts {
    /// Who may publish.
    pub publish: PublishPolicy,
    /// Whether `presence` events are sent.
    pub presence: bool,
    /// Maximum distinct connections in one room of this namespace.
    pub max_members: usize,
    /// Whether messages are stored (history, replay, receipts).
    pub persist: bool,
    /// Keep at most this many newest messages per room.
    pub retain_messages: Option<u64>,
    /// Drop messages older than this many seconds.
    pub retain_age_secs: Option<u64>,
    /// Rooms may be joined by name without being created (`open=off`:
    /// only created rooms exist; see PROTOCOL.md §5b).
    pub open: bool,
}

impl Default for NamespaceOpts {
    fn default() -> Self {
        NamespaceOpts {
            publish: PublishPolicy::Members,
            presence: true,
            max_members: 10_000,
            persist: true,
            retain_messages: None,
            retain_age_secs: None,
            open: true,
        }
    }
}

/// One `--namespace` flag, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    name: String,
    publish: Option<PublishPolicy>,
    presence: Option<bool>,
    max_members: Option<usize>,
    persist: Option<bool>,
    retain_messages: Option<u64>,
    retain_age_secs: Option<u64>,
    open: Option<bool>,
}

fn on_off(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{k}={v}: expected on|off")),
    }
}

fn number<T: FromStr>(k: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{k}={v}: expected a number"))
}

impl NamespaceSpec {
    fn apply(&self, mut o: NamespaceOpts) -> NamespaceOpts {
        if let Some(p) = self.publish {
            o.publish = p;
        }
        if let Some(p) = self.presence {
            o.presence = p;
        }
        if let Some(m) = self.max_members {
            o.max_members = m;
        }
        if let Some(p) = self.persist {
            o.persist = p;
        }
        if self.retain_messages.is_some() {
            o.retain_messages = self.retain_messages;
        }
        if self.retain_age_secs.is_some() {
            o.retain_age_secs = self.retain_age_secs;
        }
        if let Some(v) = self.open {
            o.open = v;
        }
        o
    }
}

impl FromStr for NamespaceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, opts) = s
            .split_once(':')
            .ok_or_else(|| format!("namespace spec `{s}` must be NS:key=value,..."))?;
        if name != "*" {
            shoal_proto::names::validate_user(name)
                .map_err(|e| format!("namespace `{name}`: {e}"))?;
        }
        if name == shoal_proto::names::DM_NAMESPACE {
            return Err("the `dm` namespace is reserved for direct messages".into());
        }
        let mut spec = NamespaceSpec {
            name: name.to_string(),
            publish: None,
            presence: None,
            max_members: None,
            persist: None,
            retain_messages: None,
            retain_age_secs: None,
            open: None,
        };
        for kv in opts.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("`{kv}` must be key=value"))?;
            match k {
                "publish" => {
                    spec.publish = Some(match v {
                        "members" => PublishPolicy::Members,
                        "api" => PublishPolicy::Api,
                        _ => return Err(format!("publish={v}: expected members|api")),
                    })
                }
                "presence" => spec.presence = Some(on_off(k, v)?),
                "persist" => spec.persist = Some(on_off(k, v)?),
                "open" => spec.open = Some(on_off(k, v)?),
                "max_members" => spec.max_members = Some(number(k, v)?),
                "retain_messages" => spec.retain_messages = Some(number(k, v)?),
                "retain_age" => spec.retain_age_secs = Some(number(k, v)?),
                _ => return Err(format!("unknown namespace option `{k}`")),
            }
        }
        Ok(spec)
    }
}

/// Resolved namespace options.
#[derive(Debug, Clone, Default)]
pub struct NamespaceTable {
    default: NamespaceOpts,
    by_name: HashMap<String, NamespaceOpts>,
}

impl NamespaceTable {
    /// True if any namespace (or the default) has a retention rule.
    pub fn any_retention(&self) -> bool {
        std::iter::once(&self.default)
            .chain(self.by_name.values())
            .any(|o| o.retain_messages.is_some() || o.retain_age_secs.is_some())
    }

    /// Options for a namespace (`""` for rooms without one). DM rooms always
    /// allow their two members to publish, have presence off and two users.
    pub fn get(&self, namespace: &str) -> NamespaceOpts {
        if namespace == shoal_proto::names::DM_NAMESPACE {
            return NamespaceOpts {
                publish: PublishPolicy::Members,
                presence: false,
                persist: true,
                ..self.default.clone()
            };
        }
        self.by_name
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| self.default.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_specs() {
        let c = Config::parse_from([
            "shoal",
            "--namespace",
            "*:max_members=5",
            "--namespace",
            "news:publish=api,presence=off",
        ]);
        let t = c.rooms.namespace_table();
        assert_eq!(t.get("").max_members, 5);
        let news = t.get("news");
        assert_eq!(news.publish, PublishPolicy::Api);
        assert!(!news.presence);
        assert_eq!(news.max_members, 5);
        assert!(news.persist);
        let t = Config::parse_from([
            "shoal",
            "--namespace",
            "tick:persist=off",
            "--namespace",
            "chat:retain_messages=100,retain_age=3600",
        ])
        .rooms
        .namespace_table();
        assert!(!t.get("tick").persist);
        assert_eq!(t.get("chat").retain_messages, Some(100));
        assert_eq!(t.get("chat").retain_age_secs, Some(3600));
        assert!(t.get("dm").persist);
        assert!("x:persist=maybe".parse::<NamespaceSpec>().is_err());
        assert!("dm:presence=on".parse::<NamespaceSpec>().is_err());
        assert!("x:colour=red".parse::<NamespaceSpec>().is_err());
        assert!("nocolon".parse::<NamespaceSpec>().is_err());
    }

    #[test]
    fn defaults_validate() {
        let c = Config::parse_from(["shoal"]);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.conn.idle_timeout = Duration::from_secs(1);
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                flag: "idle-timeout",
                ..
            })
        ));
    }

    #[test]
    fn durations_take_units_and_bare_numbers_keep_their_old_unit() {
        let c = Config::parse_from([
            "shoal",
            "--write-timeout",
            "3",
            "--idle-timeout",
            "90s",
            "--ping-interval",
            "1m",
            "--redis-timeout-ms",
            "250",
            "--bus-down-grace-ms",
            "2s",
            "--typing-interval-ms",
            "1500ms",
        ]);
        assert_eq!(c.conn.write_timeout, Duration::from_secs(3));
        assert_eq!(c.conn.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.conn.ping_interval, Duration::from_secs(60));
        assert_eq!(c.cluster.redis_timeout, Duration::from_millis(250));
        assert_eq!(c.cluster.bus_down_grace, Duration::from_secs(2));
        assert_eq!(c.conn.typing_interval, Duration::from_millis(1500));
        // Defaults as the old bare numbers meant them.
        let d = Config::parse_from(["shoal"]);
        assert_eq!(d.auth.token_ttl, Duration::from_secs(86_400));
        assert_eq!(d.rooms.idempotency_window, Duration::from_secs(600));
        assert_eq!(d.cluster.archive_interval, Duration::from_millis(100));
        assert!(Config::try_parse_from(["shoal", "--write-timeout", "soon"]).is_err());
        assert!(Config::try_parse_from(["shoal", "--write-timeout", "99999999999"]).is_err());
    }

    #[test]
    fn each_group_checks_itself() {
        let c = Config::parse_from(["shoal", "--bus", "redis"]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Needs {
                flag: "bus redis",
                ..
            })
        ));
        let c = Config::parse_from(["shoal", "--store", "postgres"]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Needs {
                flag: "store postgres",
                ..
            })
        ));
        let c = Config::parse_from(["shoal", "--api-key", "short"]);
        assert_eq!(
            c.validate().map_err(|e| e.to_string()).err().as_deref(),
            Some("--api-key: at least 16 bytes (unset it to disable the server API)")
        );
        assert!(Config::try_parse_from(["shoal", "--store-sync", "sometimes"]).is_err());
        assert!(Config::try_parse_from(["shoal", "--redis-url", "http://h:1"]).is_err());
    }

    #[test]
    fn redis_urls_name_one_redis_or_the_seed_nodes_of_a_cluster() {
        let t = |s: &str| s.parse::<RedisTarget>();
        assert_eq!(
            t("redis://h:1/2"),
            Ok(RedisTarget::Single("redis://h:1/2".into()))
        );
        assert_eq!(
            t("redis+cluster://u:p@a:1,b:2/?x=1"),
            Ok(RedisTarget::Cluster(vec![
                "redis://u:p@a:1/?x=1".into(),
                "redis://u:p@b:2/?x=1".into()
            ]))
        );
        assert_eq!(
            t("rediss+cluster://a:1"),
            Ok(RedisTarget::Cluster(vec!["rediss://a:1".into()]))
        );
        assert!(t("redis+cluster://").is_err());
        assert!(t("http://h:1").is_err());
    }
}
