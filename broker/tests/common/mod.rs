//! Test harness: a real broker on 127.0.0.1:0 in a temp dir, real HTTP and
//! WebSocket clients (reqwest, tokio-tungstenite: an independent WebSocket
//! implementation).
#![allow(dead_code, missing_docs)]

use std::{net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use shoal_broker::Config;
use shoal_proto::{ClientFrame, Encoding, ServerFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::HeaderValue, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

pub struct Broker {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Broker {
    pub async fn start() -> Broker {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_tests(dir.path().to_path_buf());
        cfg.jwt_secret = Some(SECRET.into());
        cfg.log = std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "warn".into());
        f(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(shoal_broker::server::run(listener, cfg, shutdown.clone()));
        Broker {
            addr,
            shutdown,
            task: Some(task),
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("shutdown in time")
                .expect("join")
                .expect("run");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub enc: Encoding,
    next_id: u64,
}

/// What a receive produced other than a frame.
#[derive(Debug, PartialEq)]
pub enum End {
    Closed(Option<u16>),
    Error(String),
    Timeout,
}

impl Client {
    pub async fn send(&mut self, f: &ClientFrame) {
        let bytes = self.enc.encode_client(f).expect("encode");
        let msg = match self.enc {
            Encoding::MsgPack => Message::Binary(bytes.into()),
            Encoding::Json => Message::Text(String::from_utf8(bytes).expect("utf8").into()),
        };
        self.ws.send(msg).await.expect("send");
    }

    /// Like `send`, but a broken connection is an error, not a panic.
    pub async fn try_send(&mut self, f: &ClientFrame) -> Result<(), String> {
        let bytes = self.enc.encode_client(f).map_err(|e| e.to_string())?;
        let msg = match self.enc {
            Encoding::MsgPack => Message::Binary(bytes.into()),
            Encoding::Json => {
                Message::Text(String::from_utf8(bytes).map_err(|e| e.to_string())?.into())
            }
        };
        self.send_raw(msg).await
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<(), String> {
        self.ws.send(m).await.map_err(|e| e.to_string())
    }

    pub fn id(&mut self) -> Option<u64> {
        self.next_id += 1;
        Some(self.next_id)
    }

    pub async fn try_recv(&mut self, within: Duration) -> Result<ServerFrame, End> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(End::Timeout),
                Ok(None) => return Err(End::Closed(None)),
                Ok(Some(Err(e))) => return Err(End::Error(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Binary(b) => {
                    assert_eq!(
                        self.enc,
                        Encoding::MsgPack,
                        "binary frame on a json connection"
                    );
                    return Ok(self.enc.decode_server(&b).expect("decode server frame"));
                }
                Message::Text(t) => {
                    assert_eq!(
                        self.enc,
                        Encoding::Json,
                        "text frame on a msgpack connection"
                    );
                    return Ok(self
                        .enc
                        .decode_server(t.as_bytes())
                        .expect("decode server frame"));
                }
                Message::Close(c) => {
                    return Err(End::Closed(c.map(|c: CloseFrame| u16::from(c.code))))
                }
                _ => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> ServerFrame {
        match self.try_recv(Duration::from_secs(5)).await {
            Ok(f) => f,
            Err(e) => panic!("expected a frame, got {e:?}"),
        }
    }

    /// Receive until a frame matches `pred`, skipping others (presence etc.).
    pub async fn recv_until(&mut self, pred: impl Fn(&ServerFrame) -> bool) -> ServerFrame {
        loop {
            let f = self.recv().await;
            if pred(&f) {
                return f;
            }
        }
    }

    /// Wait for the connection to end; returns the close code.
    pub async fn closed(&mut self) -> End {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> u64 {
        let id = self.id();
        self.send(&ClientFrame::Join {
            id,
            room: room.into(),
            since: None,
        })
        .await;
        match self
            .recv_until(|f| matches!(f, ServerFrame::Joined { .. } | ServerFrame::Error { .. }))
            .await
        {
            ServerFrame::Joined { id: rid, seq, .. } => {
                assert_eq!(rid, id);
                seq
            }
            e => panic!("join {room}: {e:?}"),
        }
    }

    pub async fn publish(&mut self, room: &str, body: Value) -> ServerFrame {
        self.publish_cid(room, None, body).await
    }

    /// Publish with an optional client message id; returns the `ack` or
    /// `error` answering it.
    pub async fn publish_cid(&mut self, room: &str, cid: Option<&str>, body: Value) -> ServerFrame {
        let id = self.id();
        self.send(&ClientFrame::Pub {
            id,
            room: Some(room.into()),
            to: None,
            cid: cid.map(str::to_string),
            body,
        })
        .await;
        self.recv_until(|f| matches!(f, ServerFrame::Ack { id: i, .. } | ServerFrame::Error { id: i, .. } if *i == id)).await
    }

    /// Send a direct message (no request id; callers wait for what they need).
    pub async fn send_dm(&mut self, to: &str, body: Value) {
        self.send(&ClientFrame::Pub {
            id: None,
            room: None,
            to: Some(to.into()),
            cid: None,
            body,
        })
        .await;
    }

    /// Join with an optional `since`; returns the frames that came before
    /// `joined` (the replay, and anything else) and the joined seq.
    pub async fn join_since(&mut self, room: &str, since: Option<u64>) -> (Vec<ServerFrame>, u64) {
        let id = self.id();
        self.send(&ClientFrame::Join {
            id,
            room: room.into(),
            since,
        })
        .await;
        let mut before = vec![];
        loop {
            match self.recv().await {
                ServerFrame::Joined { id: i, seq, .. } if i == id => return (before, seq),
                ServerFrame::Error { code, message, .. } => panic!("join {room}: {code} {message}"),
                f => before.push(f),
            }
        }
    }
}

/// The seq of a `msg` frame.
pub fn msg_seq(f: &ServerFrame) -> Option<u64> {
    match f {
        ServerFrame::Msg { seq, .. } => Some(*seq),
        _ => None,
    }
}

/// Value of one sample in Prometheus text: `name` or `name{a="b",c="d"`
/// (the sample of `name` whose labels include those pairs, in any order);
/// 0 when absent.
pub fn sample(text: &str, key: &str) -> f64 {
    let (name, labels) = key.split_once('{').unwrap_or((key, ""));
    let want: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .find(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && want.iter().all(|w| l.contains(w))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn mint(claims: Value, alg: jsonwebtoken::Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("mint")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
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
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
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
                    break; // port taken meanwhile: try another
                }
                if p.http
                    .get(format!("http://{addr}/health"))
                    .send()
                    .await
                    .is_ok()
                {
                    return p;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("broker process did not start");
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

/// HTTP and WebSocket helpers for anything with an address.
#[allow(async_fn_in_trait)]
pub trait Endpoint {
    fn addr(&self) -> SocketAddr;
    fn http(&self) -> &reqwest::Client;

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    async fn post(&self, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
        let mut r = self.http().post(self.url(path)).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.expect("http");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut r = self.http().get(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.expect("http");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn metrics(&self) -> String {
        self.http()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("http")
            .text()
            .await
            .expect("text")
    }

    /// Wait until `/health` answers `status`; its body.
    async fn health_becomes(&self, status: u16) -> Value {
        for _ in 0..200 {
            let (s, v) = self.get("/health", None).await;
            if s == status {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("/health never answered {status}");
    }

    /// Every stored seq of `room`, oldest first, paged through the REST
    /// history API.
    async fn stored_seqs(&self, token: &str, room: &str) -> Vec<u64> {
        let mut seqs = vec![];
        let mut before: Option<u64> = None;
        loop {
            let q = before.map(|b| format!("&before={b}")).unwrap_or_default();
            let (s, v) = self
                .get(
                    &format!("/api/rooms/{room}/messages?limit=200{q}"),
                    Some(token),
                )
                .await;
            assert_eq!(s, 200, "{v}");
            let page = v["messages"].as_array().expect("messages").clone();
            seqs.extend(page.iter().filter_map(|m| m["seq"].as_u64()));
            if !v["more"].as_bool().expect("more") {
                break;
            }
            before = page.last().and_then(|m| m["seq"].as_u64());
        }
        seqs.sort_unstable();
        seqs
    }

    /// Value of one sample of `/metrics` (see [`sample`]), e.g.
    /// `shoal_closes_total{reason="slow_consumer"`.
    async fn metric(&self, key: &str) -> f64 {
        sample(&self.metrics().await, key)
    }

    /// `POST /api/register` with the tests' password.
    async fn register(&self, name: &str) -> (u16, Value) {
        self.post(
            "/api/register",
            json!({"username": name, "password": "password123"}),
            None,
        )
        .await
    }

    /// Register and log in; returns the token.
    async fn user(&self, name: &str) -> String {
        let (s, _) = self.register(name).await;
        assert!(s == 201 || s == 409, "register {name}: {s}");
        let (s, v) = self
            .post(
                "/api/login",
                json!({"username": name, "password": "password123"}),
                None,
            )
            .await;
        assert_eq!(s, 200, "login {name}: {v}");
        v["token"].as_str().expect("token").to_string()
    }

    async fn connect(&self, token: &str, enc: Encoding) -> Client {
        self.try_connect(token, enc).await.expect("connect")
    }

    async fn try_connect(&self, token: &str, enc: Encoding) -> Result<Client, (u16, String)> {
        let mut c = self.try_connect_raw(token, enc).await?;
        match c.recv().await {
            ServerFrame::Hello { .. } => Ok(c),
            other => panic!("expected hello, got {other:?}"),
        }
    }

    /// Upgrade without reading `hello` (the broker may close at once with
    /// 4005 instead). Err for an HTTP refusal or a connection error (0).
    async fn try_connect_raw(&self, token: &str, enc: Encoding) -> Result<Client, (u16, String)> {
        let mut req = format!("ws://{}/ws", self.addr())
            .into_client_request()
            .expect("req");
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("hdr"),
        );
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(enc.subprotocol()),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                enc,
                next_id: 1,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => Err((0, e.to_string())),
        }
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

/// A token for `user` signed with the shared test secret (every node of a
/// test cluster accepts it).
pub fn token_for(user: &str) -> String {
    mint(
        json!({"sub": user, "exp": now() + 3600, "jti": format!("j-{user}")}),
        jsonwebtoken::Algorithm::HS256,
        SECRET.as_bytes(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

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

impl Client {
    /// Wrap an upgraded WebSocket (for clients that connect another way,
    /// e.g. through nginx over TLS).
    pub fn from_ws(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, enc: Encoding) -> Client {
        Client {
            ws,
            enc,
            next_id: 1,
        }
    }
}

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

/// A TCP relay on a free loopback port to `target` whose link can be cut
/// like a network partition: while cut, nothing crosses in either
/// direction and new connections hang unanswered (dropped, not refused,
/// so only timeouts notice). Healing resumes every held connection.
/// Its tasks end with the test's runtime.
pub struct Partition {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Partition {
    pub async fn start(target: SocketAddr) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let _ = rx.clone().wait_for(|cut| !*cut).await;
                    let Ok(up) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(relay(dr, uw, rx.clone()), relay(ur, dw, rx));
                });
            }
        });
        Partition { addr, cut }
    }

    /// Cut (true) or heal (false) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// Copy `r` to `w`, holding each chunk while the link is cut.
async fn relay(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() || w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// A WebSocket client that writes raw frames (any opcode, RSV bits, mask
/// or none) after a hand-written upgrade, and reads server frames.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(b: &impl Endpoint, token: &str, proto: &str) -> Raw {
        let mut s = TcpStream::connect(b.addr()).await.expect("tcp");
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {proto}\r\nAuthorization: Bearer {token}\r\n\r\n",
            b.addr()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut r = Raw { s, buf: vec![] };
        // Read the 101 response headers.
        loop {
            if let Some(i) = r.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&r.buf[..i]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                r.buf.drain(..i + 4);
                break;
            }
            let mut tmp = [0u8; 1024];
            let n = r.s.read(&mut tmp).await.expect("read");
            assert!(n > 0, "closed during handshake");
            r.buf.extend_from_slice(&tmp[..n]);
        }
        r
    }

    /// Write one frame. `first` is the whole first byte (FIN, RSV, opcode).
    pub async fn frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut f = vec![first];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x11, 0x22, 0x33, 0x44];
        if masked {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        let _ = self.s.write_all(&f).await;
    }

    /// Read server frames until a close frame (its code) or EOF (None).
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, off) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let payload: Vec<u8> = self.buf[off..off + len].to_vec();
                    self.buf.drain(..off + len);
                    if op == 0x8 {
                        return (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    }
                    continue;
                }
            }
            let mut tmp = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.s.read(&mut tmp)).await {
                Ok(Ok(n)) => n,
                _ => return None,
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}
