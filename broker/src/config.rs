//! The broker's one typed configuration, from command-line flags and
//! `SHOAL_*` environment variables. Every limit lives here with its default
//! and overflow policy, so `shoal --help` is the reference.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;

/// Shortest accepted `--api-key`.
pub const MIN_API_KEY_LEN: usize = 16;

/// Shoal: a real-time messaging broker (rooms, direct messages, presence)
/// over WebSocket.
#[derive(Debug, Clone, Parser)]
#[command(name = "shoal", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on for HTTP, REST and WebSocket (`/ws`).
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Data directory for the embedded database and the generated JWT secret.
    #[arg(long, env = "SHOAL_DATA", default_value = "./data")]
    pub data: PathBuf,

    /// Node id reported in `hello`, `/health` and metrics. Default: hostname-port.
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,

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

    /// PEM certificate chain: serve TLS (`https://`, `wss://`) on `--listen`
    /// instead of plain HTTP. Needs `--tls-key`. Reloaded on SIGHUP.
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Lifetime of tokens issued by `POST /api/login`, in seconds.
    #[arg(long = "token-ttl", env = "SHOAL_TOKEN_TTL", default_value_t = 86_400)]
    pub token_ttl_secs: u64,

    /// Key for the server API (`POST /api/rooms/{room}/messages`), sent as
    /// `Authorization: Bearer <key>` (only there: never in a URL). At
    /// least 16 bytes; an empty key is refused at start. Server API
    /// disabled when unset.
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// WebSocket handshakes admitted per second (token bucket, burst of one
    /// second's worth); over it the upgrade completes and is closed at once
    /// with 4005 (try again later), which tells clients to back off with
    /// jitter. Protects a node from reconnection storms. 0 = unlimited.
    #[arg(long, env = "SHOAL_HANDSHAKE_RATE", default_value_t = 5000.0)]
    pub handshake_rate: f64,

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

    /// Seconds a single socket write may take before the peer is treated as
    /// a slow consumer and dropped.
    #[arg(
        long = "write-timeout",
        env = "SHOAL_WRITE_TIMEOUT",
        default_value_t = 10
    )]
    pub write_timeout_secs: u64,

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

    /// Minimum milliseconds between two `typing` frames from one connection
    /// to one room; faster ones get `error 429` and are not forwarded.
    #[arg(long, env = "SHOAL_TYPING_INTERVAL_MS", default_value_t = 1000)]
    pub typing_interval_ms: u64,

    /// Seconds between server pings on an idle connection.
    #[arg(
        long = "ping-interval",
        env = "SHOAL_PING_INTERVAL",
        default_value_t = 25
    )]
    pub ping_interval_secs: u64,

    /// Seconds without any frame from the client (pongs count) before the
    /// connection is closed with 4004.
    #[arg(
        long = "idle-timeout",
        env = "SHOAL_IDLE_TIMEOUT",
        default_value_t = 60
    )]
    pub idle_timeout_secs: u64,

    /// Seconds a client has to send its HTTP request headers and complete
    /// the WebSocket upgrade.
    #[arg(
        long = "handshake-timeout",
        env = "SHOAL_HANDSHAKE_TIMEOUT",
        default_value_t = 10
    )]
    pub handshake_timeout_secs: u64,

    /// Longest wait, in seconds, for the next part of an HTTP request
    /// body; also the grace before `--http-body-min-rate` applies. Over
    /// it: 408 and the connection closes.
    #[arg(
        long = "http-body-timeout",
        env = "SHOAL_HTTP_BODY_TIMEOUT",
        default_value_t = 10
    )]
    pub http_body_timeout_secs: u64,

    /// Slowest accepted average rate of an HTTP request body, in bytes per
    /// second, once the body timeout's grace has passed (0: no minimum).
    /// Slower: 408 and the connection closes.
    #[arg(long, env = "SHOAL_HTTP_BODY_MIN_RATE", default_value_t = 16 * 1024)]
    pub http_body_min_rate: u64,

    /// Seconds an HTTP response write may make no progress (a client that
    /// does not read) before the connection is dropped.
    #[arg(
        long = "http-write-timeout",
        env = "SHOAL_HTTP_WRITE_TIMEOUT",
        default_value_t = 30
    )]
    pub http_write_timeout_secs: u64,

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

    /// Seconds graceful shutdown waits for connections to drain after
    /// sending close 1001, before exiting anyway.
    #[arg(
        long = "shutdown-timeout",
        env = "SHOAL_SHUTDOWN_TIMEOUT",
        default_value_t = 10
    )]
    pub shutdown_timeout_secs: u64,

    /// Allowed `Origin` values for browser WebSocket handshakes
    /// (comma-separated). Empty allows any origin; requests without an
    /// Origin header (non-browser clients) are always allowed.
    #[arg(long, env = "SHOAL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Per-namespace options, `NS:key=value,...` (repeatable; `;`-separated in
    /// the env var). NS `*` sets the defaults for rooms without a namespace
    /// and for unlisted namespaces. Keys: `publish=members|api` (who may
    /// publish; `api` = only `POST /api/publish`), `presence=on|off`,
    /// `max_members=N` (default 10000), `persist=on|off` (store history;
    /// default on), `retain_messages=N` (keep the newest N per room),
    /// `retain_age=SECS` (drop older messages); no retention by default.
    #[arg(long = "namespace", env = "SHOAL_NAMESPACES", value_delimiter = ';')]
    pub namespaces: Vec<NamespaceSpec>,

    /// Bound of the queue from publishers to the group-commit writer, in
    /// operations. When full, publishers wait (backpressure to the socket);
    /// nothing is dropped.
    #[arg(long, env = "SHOAL_STORE_QUEUE", default_value_t = 16_384)]
    pub store_queue: usize,

    /// Most operations committed in one transaction (group commit).
    #[arg(long, env = "SHOAL_STORE_BATCH", default_value_t = 1024)]
    pub store_batch: usize,

    /// SQLite durability: `normal` survives a crash of the broker process
    /// (kill -9) but not of the machine; `full` fsyncs every commit and
    /// survives power loss, at a higher publish latency.
    #[arg(long, env = "SHOAL_STORE_SYNC", default_value = "normal", value_parser = ["normal", "full"])]
    pub store_sync: String,

    /// Seconds a client message id (`pub {cid}`) is remembered per room: a
    /// retried `pub` with the same cid within the window is acked with the
    /// original seq and not delivered again. At most 4096 ids per room.
    #[arg(
        long = "idempotency-window",
        env = "SHOAL_IDEMPOTENCY_WINDOW",
        default_value_t = 600
    )]
    pub idempotency_window_secs: u64,

    /// Seconds between retention passes (see `retain_messages` and
    /// `retain_age` in `--namespace`).
    #[arg(
        long = "retention-interval",
        env = "SHOAL_RETENTION_INTERVAL",
        default_value_t = 60
    )]
    pub retention_interval_secs: u64,

    /// Largest attachment accepted by `POST /api/files`, in bytes; larger
    /// gets 413.
    #[arg(long, env = "SHOAL_MAX_FILE_SIZE", default_value_t = 5 * 1024 * 1024)]
    pub max_file_size: usize,

    /// Bytes of attachments one user may keep stored (all rooms); an
    /// upload past it gets 413. Files leave with their room's retention
    /// (`retain_age`). 0: no quota.
    #[arg(long, env = "SHOAL_USER_FILE_QUOTA", default_value_t = 100 * 1024 * 1024)]
    pub user_file_quota: u64,

    /// Stored rooms one user may be a member of (memberships last until
    /// `leave`); joining one more gets `error 409`.
    #[arg(long, env = "SHOAL_MAX_ROOMS_PER_USER", default_value_t = 1000)]
    pub max_rooms_per_user: u64,

    /// Bytes of uploads the node reads at once, all connections together
    /// (each upload holds its Content-Length while it is read). More get
    /// 503 with Retry-After. At least `--max-file-size`.
    #[arg(long, env = "SHOAL_MAX_UPLOAD_MEMORY", default_value_t = 64 * 1024 * 1024)]
    pub max_upload_memory: usize,

    /// URL that gets `POST {user, room, seq, from, preview}` (JSON) when a
    /// direct message commits and its recipient has no live connection, for
    /// push notifications. Plain `http://` (put a TLS proxy in front for
    /// an external service). Retried 4 times with doubling backoff; at most
    /// 1024 wait, more are dropped and counted.
    #[arg(long, env = "SHOAL_OFFLINE_WEBHOOK")]
    pub offline_webhook: Option<String>,

    /// First retry delay of the offline webhook, in milliseconds.
    #[arg(long, env = "SHOAL_WEBHOOK_BACKOFF_MS", default_value_t = 500)]
    pub webhook_backoff_ms: u64,

    /// Where users, memberships, receipts, files and (in a cluster) the
    /// archived history live: `sqlite` (embedded, in `--data`) or
    /// `postgres` (shared by the nodes of a cluster, `--postgres-url`).
    #[arg(long, env = "SHOAL_STORE", value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,

    /// PostgreSQL for `--store postgres`:
    /// `postgres://user:pass@host:port/db`. Migrations run at start.
    #[arg(long, env = "SHOAL_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,

    /// PostgreSQL connections in this node's pool.
    #[arg(long, env = "SHOAL_POSTGRES_POOL", default_value_t = 16)]
    pub postgres_pool: usize,

    /// Milliseconds between sweeps of the archiver that copies messages
    /// from the Redis hot streams to PostgreSQL (`--bus redis --store
    /// postgres`; one node sweeps at a time).
    #[arg(long, env = "SHOAL_ARCHIVE_INTERVAL_MS", default_value_t = 100)]
    pub archive_interval_ms: u64,

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
    pub redis_url: Option<String>,

    /// Multiplexed Redis command connections. Publishes from every
    /// WebSocket connection share them and are pipelined.
    #[arg(long, env = "SHOAL_REDIS_CONNECTIONS", default_value_t = 2)]
    pub redis_connections: usize,

    /// Messages kept per room in Redis (the hot history that `join
    /// {since}` and gap recovery read). Trimmed approximately (`MAXLEN ~`);
    /// a `since` older than what is kept gets a `gap` frame.
    #[arg(long, env = "SHOAL_REDIS_STREAM_LEN", default_value_t = 10_000)]
    pub redis_stream_len: usize,

    /// Timeout of one Redis command and of connecting, in milliseconds.
    /// A publish that times out is answered `error 503` (retry with the
    /// same `cid` is safe).
    #[arg(long, env = "SHOAL_REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,

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

    /// Presence lease of a node process, in milliseconds: a process that
    /// stops refreshing it (crashed) has its users leave the rooms'
    /// presence within 1.5 times this, whether or not the node restarts
    /// under the same id. Refreshed every third of it.
    #[arg(long, env = "SHOAL_PRESENCE_LEASE_MS", default_value_t = 10_000)]
    pub presence_lease_ms: u64,

    /// Bus payloads waiting for delivery on this node. Overflow policy:
    /// the payload is dropped and counted, and the node reads what it
    /// missed from the hot history (no message is lost, it comes later).
    #[arg(long, env = "SHOAL_BUS_INBOUND_QUEUE", default_value_t = 65_536)]
    pub bus_inbound_queue: usize,

    /// How long a node keeps its clients while it cannot reach the bus
    /// (Redis), in milliseconds. A blip shorter than this is ridden out
    /// (publishes get `error 503`, connections stay); past it every
    /// client is closed with 4006 so it reconnects to a node that can
    /// still deliver. While the bus is down, WebSocket handshakes get 503.
    #[arg(long, env = "SHOAL_BUS_DOWN_GRACE_MS", default_value_t = 5_000)]
    pub bus_down_grace_ms: u64,

    /// Number of room registry shards (rounded up to a power of two).
    #[arg(long, env = "SHOAL_SHARDS", default_value_t = 64)]
    pub shards: usize,

    /// Runtime worker threads; 0: one per CPU core. Set it to the CPU
    /// limit of a container, or to split one machine between several
    /// nodes (more threads than cores only adds context switches).
    #[arg(long, env = "SHOAL_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "SHOAL_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// Check cross-field invariants that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_size < 128 {
            return Err("--max-message-size must be at least 128 bytes".into());
        }
        if self.outbound_queue == 0 || self.write_batch == 0 {
            return Err("--outbound-queue and --write-batch must be positive".into());
        }
        if self.rate_limit <= 0.0 || self.rate_burst < 1.0 {
            return Err("--rate-limit must be > 0 and --rate-burst >= 1".into());
        }
        if self.ping_interval_secs == 0 || self.idle_timeout_secs <= self.ping_interval_secs {
            return Err("--idle-timeout must be longer than --ping-interval (> 0)".into());
        }
        if self.store_queue == 0 || self.store_batch == 0 {
            return Err("--store-queue and --store-batch must be positive".into());
        }
        if let Some(u) = &self.offline_webhook {
            if !u.starts_with("http://") {
                return Err("--offline-webhook must be an http:// URL".into());
            }
        }
        if let Some(k) = &self.api_key {
            if k.trim().len() < MIN_API_KEY_LEN {
                return Err(format!(
                    "--api-key / SHOAL_API_KEY must be at least {MIN_API_KEY_LEN} bytes \
                     (unset it to disable the server API)"
                ));
            }
        }
        if self.http_body_timeout_secs == 0
            || self.http_write_timeout_secs == 0
            || self.max_http_connections == 0
        {
            return Err(
                "--http-body-timeout, --http-write-timeout and --max-http-connections must be positive"
                    .into(),
            );
        }
        if self.max_upload_memory < self.max_file_size || self.max_upload_memory > u32::MAX as usize
        {
            return Err(
                "--max-upload-memory must be at least --max-file-size and under 4 GiB".into(),
            );
        }
        if self.retention_interval_secs == 0 {
            return Err("--retention-interval must be positive".into());
        }
        if self.store == StoreKind::Postgres {
            match &self.postgres_url {
                Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {}
                _ => return Err("--store postgres needs --postgres-url postgres://...".into()),
            }
            if self.postgres_pool == 0 || self.archive_interval_ms == 0 {
                return Err("--postgres-pool and --archive-interval-ms must be positive".into());
            }
        }
        if self.bus == BusKind::Redis {
            match &self.redis_url {
                Some(u) => crate::bus::redis_conn::Target::parse(u).map(|_| ())?,
                None => return Err("--bus redis needs --redis-url redis://host:port".into()),
            }
            if self.redis_connections == 0 || self.redis_timeout_ms == 0 {
                return Err("--redis-connections and --redis-timeout-ms must be positive".into());
            }
            if self.presence_lease_ms < 300 {
                return Err("--presence-lease-ms must be at least 300".into());
            }
            if self.redis_stream_len < 100 || self.bus_inbound_queue == 0 {
                return Err("--redis-stream-len must be >= 100 and --bus-inbound-queue > 0".into());
            }
        }
        if self.token_ttl_secs == 0 {
            return Err("--token-ttl must be positive".into());
        }
        if let Some(k) = &self.jwt_secret {
            if k.len() < 32 {
                return Err("SHOAL_JWT_SECRET must be at least 32 bytes".into());
            }
        }
        Ok(())
    }

    /// Defaults with an ephemeral listen port and the given data dir; for tests.
    pub fn for_tests(data: PathBuf) -> Self {
        let mut c = Config::parse_from(["shoal"]);
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.data = data;
        c
    }

    /// Like [`Config::for_tests`] with extra flags (data dir unset).
    pub fn parse_from_for_tests(args: &[&str]) -> Self {
        Config::parse_from(std::iter::once("shoal").chain(args.iter().copied()))
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

    /// Durations in one place.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }
    /// See `--idle-timeout`.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// How HTTP request bodies of at most `max` bytes are read.
    pub fn body_limits(&self, max: usize) -> crate::httpconn::BodyLimits {
        crate::httpconn::BodyLimits {
            max,
            timeout: Duration::from_secs(self.http_body_timeout_secs),
            min_rate: self.http_body_min_rate,
        }
    }
    /// Longest an HTTP response write may make no progress.
    pub fn http_write_timeout(&self) -> Duration {
        Duration::from_secs(self.http_write_timeout_secs)
    }
    /// See `--handshake-timeout`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    /// See `--write-timeout`.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
    /// See `--idempotency-window`.
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_secs)
    }
    /// See `--retention-interval`.
    pub fn retention_interval(&self) -> Duration {
        Duration::from_secs(self.retention_interval_secs)
    }
    /// See `--shutdown-timeout`.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
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
        let t = c.namespace_table();
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
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.idle_timeout_secs = 1;
        assert!(bad.validate().is_err());
    }
}
