//! Socket.IO v4 clients on the broker's own listener: `/socket.io/` (the
//! default JSON parser) and `/socket.io-msgpack/` (`socket.io-msgpack-parser`),
//! both transports (HTTP long-polling and WebSocket, with the standard
//! upgrade), served by socketioxide; the event vocabulary is
//! `shoal_proto::sio`.
//!
//! Rules:
//! - **One hub, one session.** A Socket.IO socket is a [`Session`] with a
//!   [`ConnHandle`] like a `/ws` connection: the same admission (token,
//!   origin, handshake rate, `--max-connections`, cluster health), the same
//!   per-request rate limit, rooms-per-connection bound, replay with
//!   `since`, revocation and token expiry. Only the bytes differ: the
//!   handle's sink turns frames into events ([`SioOut`]).
//! - **Order.** socketioxide runs each event's handler in a task of its
//!   own, in no fixed order; so an event is taken off the wire by an
//!   extractor ([`Inbound`]), which runs in arrival order, and queued to
//!   the socket's session task, which handles one at a time.
//! - **Bounds and overflow policy.** Events waiting for the session:
//!   [`INBOX`] per socket; past it an event is refused with error 429.
//!   Requests awaiting their ack: `--outbound-queue` per socket; past it,
//!   429. Frames waiting to be written: socketioxide's per-socket buffer,
//!   sized `--outbound-queue`; when full, an ephemeral frame (typing,
//!   presence) is dropped and counted, anything else ends the socket as a
//!   slow consumer (4003), exactly like `/ws`. Packets: `--max-message-size`
//!   (engine.io `maxPayload`); binary attachments are refused (bodies are
//!   JSON values).
//! - **Encode once.** A frame delivered to many Socket.IO sockets is made
//!   an event payload once per namespace ([`Payload`]), and its JSON text
//!   is copied into each socket's packet; MessagePack-parser sockets
//!   serialize the shared value per socket (socketioxide frames each
//!   packet itself).
//! - **Why a socket ended.** Before the broker disconnects a socket it
//!   emits `close {code, reason, reconnect}` with the `/ws` close code
//!   (4002 revoked, 4001 token expired, 4003 slow consumer, 1008 policy,
//!   1001 shutdown); `reconnect` says whether the client should connect
//!   again (Socket.IO clients do not reconnect by themselves after a
//!   server-side disconnect).

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use parking_lot::Mutex;
use serde_json::{json, value::RawValue, Value};
use shoal_proto::{
    sio::{self as vocab, EventArgs},
    ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame,
};
use socketioxide::{
    adapter::LocalAdapter,
    extract::{AckSender, Event, SocketRef, TryData},
    handler::{ConnectHandler, FromMessageParts, Value as SioValue},
    service::SocketIoService,
    socket::Socket,
    ParserConfig, SendError, SocketError, SocketIo, TransportType,
};
use tokio::{
    sync::{mpsc, OwnedSemaphorePermit},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{AuthError, Claims},
    outbound::{ConnHandle, Pushed, Sink},
    session::Session,
    state::AppState,
};

/// Path of the endpoint using Socket.IO's default (JSON) parser.
pub const JSON_PATH: &str = "/socket.io";
/// Path of the endpoint using the MessagePack parser.
pub const MSGPACK_PATH: &str = "/socket.io-msgpack";
/// Events queued for one socket's session before more are refused (429).
pub const INBOX: usize = 64;
/// How often a replay retries a full socket buffer.
const RETRY: Duration = Duration::from_millis(5);

/// socketioxide's HTTP service, as the listener serves it.
pub type Service = SocketIoService<engineioxide::service::NotFoundService>;

/// The two Socket.IO endpoints.
pub struct Endpoints {
    json: (Service, SocketIo),
    msgpack: (Service, SocketIo),
    /// The sockets' session tasks.
    sessions: tokio_util::task::TaskTracker,
}

impl Endpoints {
    /// Build both endpoints with the connection limits of `cfg`; no
    /// namespace accepts sockets until [`Endpoints::attach`].
    pub fn new(cfg: &crate::config::ConnOpts) -> Endpoints {
        let build = |path: &'static str, msgpack: bool| {
            let b = SocketIo::builder()
                .req_path(path)
                .ping_interval(cfg.ping_interval)
                // A peer silent for the idle timeout is gone, as on /ws.
                .ping_timeout(
                    cfg.idle_timeout
                        .saturating_sub(cfg.ping_interval)
                        .max(Duration::from_secs(1)),
                )
                .connect_timeout(cfg.handshake_timeout)
                .max_buffer_size(cfg.outbound_queue.max(1))
                .max_payload(cfg.max_message_size as u64 + 64)
                .ws_max_message_size(cfg.max_message_size + 64)
                .ws_max_frame_size(cfg.max_message_size + 64)
                .transports([TransportType::Polling, TransportType::Websocket]);
            let b = if msgpack {
                b.with_parser(ParserConfig::msgpack())
            } else {
                b.with_parser(ParserConfig::common().max_incoming_binaries(0))
            };
            b.build_svc()
        };
        Endpoints {
            json: build(JSON_PATH, false),
            msgpack: build(MSGPACK_PATH, true),
            sessions: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Accept sockets in every namespace (`/` and `/<namespace>`).
    pub fn attach(&self, state: std::sync::Weak<AppState>) {
        for (io, json) in [(&self.json.1, true), (&self.msgpack.1, false)] {
            let connect = {
                let state = state.clone();
                move |s: SocketRef| on_connect(state.clone(), s)
            };
            let handler = connect.with({
                let state = state.clone();
                move |s: SocketRef, TryData(auth): TryData<ConnectAuth>| {
                    admit(state.clone(), s, auth.ok().and_then(|a| a.token), json)
                }
            });
            io.ns("/", handler.clone());
            if let Err(e) = io.dyn_ns("/{namespace}", handler) {
                tracing::error!(error = %e, "socket.io namespaces not served");
            }
        }
    }

    /// The endpoint serving `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Service> {
        let under = |p: &str| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under(JSON_PATH) {
            Some(&self.json.0)
        } else if under(MSGPACK_PATH) {
            Some(&self.msgpack.0)
        } else {
            None
        }
    }

    /// At shutdown (the sessions see the shutdown token): wait for the
    /// sessions to end, then close every engine.io session.
    pub async fn shutdown(&self) {
        self.sessions.close();
        self.sessions.wait().await;
        self.json.1.close().await;
        self.msgpack.1.close().await;
    }
}

/// Why a socket was refused at CONNECT (sent as `connect_error`).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("{0}")]
    Namespace(vocab::EventError),
    #[error("origin not allowed")]
    Origin,
    #[error("this node cannot reach the cluster bus; connect to another node")]
    BusDown,
    #[error("too many connections being opened; retry later")]
    RateLimited,
    #[error("connection limit reached; retry later")]
    OverCapacity,
    #[error("shutting down")]
    ShuttingDown,
}

/// What CONNECT admitted, handed to the socket's session.
struct Admitted {
    claims: Claims,
    permit: OwnedSemaphorePermit,
    handle: ConnHandle,
    inbox: mpsc::Receiver<Incoming>,
}

/// Extensions can hold only `Clone` values: the admission is taken once.
type Stash = Arc<Mutex<Option<Admitted>>>;

/// The `auth` payload of CONNECT.
#[derive(Debug, Default, serde::Deserialize)]
struct ConnectAuth {
    #[serde(default)]
    token: Option<String>,
}

/// CONNECT middleware: admission, then the socket's handle and inbox, set
/// up before the client may send its first event.
async fn admit(
    state: std::sync::Weak<AppState>,
    s: SocketRef,
    token: Option<String>,
    json: bool,
) -> Result<(), Refusal> {
    let state = state.upgrade().ok_or(Refusal::ShuttingDown)?;
    if state.shutdown.is_cancelled() {
        return Err(Refusal::ShuttingDown);
    }
    let m = &state.metrics;
    let prefix = vocab::namespace_prefix(s.ns()).map_err(|e| {
        m.handshake("bad_request");
        Refusal::Namespace(e)
    })?;
    let parts = s.req_parts();
    if !crate::http::origin_allowed(&state, &parts.headers) {
        m.handshake("forbidden_origin");
        return Err(Refusal::Origin);
    }
    if state.hub.cluster_health() == Some(false) {
        m.handshake("bus_down");
        return Err(Refusal::BusDown);
    }
    let token = token.or_else(|| query_token(parts.uri.query()));
    let claims = token
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
        .and_then(|t| state.auth.verify(&t))
        .map_err(|e| {
            m.auth_failure(e.label());
            m.handshake("unauthorized");
            Refusal::Unauthorized(e)
        })?;
    if !state
        .handshake_bucket
        .as_ref()
        .is_none_or(|b| b.lock().take())
    {
        m.handshake("rate_limited");
        m.rate_limited("handshake");
        return Err(Refusal::RateLimited);
    }
    let Ok(permit) = state.conn_permits.clone().try_acquire_owned() else {
        m.handshake("over_capacity");
        return Err(Refusal::OverCapacity);
    };
    let cfg = &state.cfg.conn;
    let out = SioOut {
        socket: s.clone(),
        json,
        prefix: prefix.map(Arc::from),
        acks: Mutex::new(Acks::default()),
        ack_limit: cfg.outbound_queue.max(1),
        write_timeout: cfg.write_timeout,
    };
    let handle = ConnHandle::new(
        claims.sub.as_str().into(),
        claims.jti.as_str().into(),
        if json {
            Encoding::Json
        } else {
            Encoding::MsgPack
        },
        (cfg.outbound_queue, cfg.write_batch),
        Sink::SocketIo(Box::new(out)),
        &state.shutdown,
        state.metrics.clone(),
    );
    handle.set_peer(crate::outbound::Peer {
        addr: parts.extensions.get::<crate::http::Peer>().map(|p| p.0),
        transport: "socket.io",
    });
    let (tx, inbox) = mpsc::channel(INBOX);
    s.extensions.insert(Inbox(tx, state.metrics.clone()));
    let cancel = handle.cancel_token();
    s.on_disconnect(move || {
        cancel.cancel();
        async {}
    });
    s.on_fallback(async |_: Inbound| {});
    s.extensions
        .insert::<Stash>(Arc::new(Mutex::new(Some(Admitted {
            claims,
            permit,
            handle,
            inbox,
        }))));
    m.handshake("ok");
    Ok(())
}

/// `token=` in a query string (old clients put it there).
fn query_token(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// CONNECT handler: the socket is connected; run its session.
async fn on_connect(state: std::sync::Weak<AppState>, s: SocketRef) {
    let Some(admitted) = s
        .extensions
        .remove::<Stash>()
        .and_then(|st| st.lock().take())
    else {
        return;
    };
    let Some(state) = state.upgrade() else {
        return;
    };
    state.sio.sessions.spawn(serve(state.clone(), s, admitted));
}

/// One event off the wire, for the session.
struct Incoming {
    event: String,
    args: Result<EventArgs, String>,
    ack: Option<AckSender>,
}

/// The sender side of a socket's inbox, kept in its extensions.
#[derive(Clone)]
struct Inbox(mpsc::Sender<Incoming>, Arc<crate::metrics::Metrics>);

/// Takes an event off the wire in arrival order (extractors run before
/// socketioxide spawns the handler) and queues it for the session.
struct Inbound;

impl FromMessageParts<LocalAdapter> for Inbound {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<LocalAdapter>>,
        v: &mut SioValue,
        ack_id: &Option<i64>,
    ) -> Result<Inbound, Infallible> {
        let event = Event::from_message_parts(s, v, ack_id)
            .map(|e| e.0)
            .unwrap_or_default();
        let args = match TryData::<EventArgs>::from_message_parts(s, v, ack_id) {
            Ok(TryData(r)) => r.map_err(|e| e.to_string()),
            Err(never) => match never {},
        };
        let ack = match AckSender::from_message_parts(s, v, ack_id) {
            Ok(a) => ack_id.map(|_| a),
            Err(never) => match never {},
        };
        let Some(Inbox(tx, metrics)) = s.extensions.get::<Inbox>() else {
            return Ok(Inbound);
        };
        if let Err(mpsc::error::TrySendError::Full(i)) = tx.try_send(Incoming { event, args, ack })
        {
            // A flood: refuse this event, keep what was accepted.
            let e = json!({"code": ErrorCode::RateLimited.as_u16(), "message": "too many events waiting; slow down"});
            let _ = match i.ack {
                Some(a) => a.send(&json!({ "error": e })),
                None => s.emit("error", &e),
            };
            metrics.rate_limited("socketio_inbox");
        }
        Ok(Inbound)
    }
}

/// A socket's session: requests in order, then cleanup and the reason.
async fn serve(state: Arc<AppState>, socket: SocketRef, admitted: Admitted) {
    let Admitted {
        claims,
        permit,
        handle,
        mut inbox,
    } = admitted;
    let _permit = permit;
    let Some(out) = handle.sio() else { return };
    let prefix = out.prefix().clone();
    state.hub.register(&handle);
    state.directory.seen(&handle.user);
    let cfg = &state.cfg.conn;
    handle.send(&ServerFrame::Hello {
        user: claims.sub.clone(),
        node: state.node.clone(),
        max_message_size: cfg.max_message_size as u64,
        ping_interval_ms: cfg.ping_interval.as_millis() as u64,
    });
    tracing::debug!(conn = handle.id, user = %handle.user, ns = socket.ns(), transport = ?socket.transport_type(), "socket.io connected");
    state.metrics.connections.inc();
    let mut session = Session::new(state.clone(), handle.clone());
    let expiry = tokio::time::sleep_until(crate::conn::token_deadline(claims.exp));
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            biased;
            _ = handle.cancelled() => break,
            _ = &mut expiry => {
                handle.close(CloseCode::TokenExpired);
                break;
            }
            next = inbox.recv() => {
                let Some(Incoming { event, args, ack }) = next else { break };
                let id = match ack {
                    Some(a) => match out.register(a) {
                        Ok(id) => Some(id),
                        Err(a) => {
                            state.metrics.rate_limited("socketio_acks");
                            let _ = a.send(&json!({"error": {"code": ErrorCode::RateLimited.as_u16(), "message": "too many requests awaiting a reply"}}));
                            continue;
                        }
                    },
                    None => None,
                };
                let decoded = args
                    .map_err(|e| format!("event `{event}`: bad arguments: {e}"))
                    .and_then(|a| vocab::client_frame(&event, a, id, prefix.as_deref()).map_err(|e| e.to_string()));
                let Some(frame) = session.take(decoded, id) else {
                    if handle.is_closing() {
                        break;
                    }
                    continue;
                };
                // Typing and receipts answer only errors; their ack says
                // "taken" once handled.
                let settle = matches!(frame, ClientFrame::Typing { .. } | ClientFrame::Mark { .. });
                if !Box::pin(session.run(frame)).await {
                    break;
                }
                if settle {
                    out.settle(id);
                }
            }
        }
    }
    drop(session);
    let code = handle.close_code().or_else(|| {
        state
            .shutdown
            .is_cancelled()
            .then_some(CloseCode::GoingAway)
    });
    if let Some(code) = code {
        if socket.connected() {
            let reconnect = !matches!(
                code,
                CloseCode::TokenRevoked | CloseCode::TokenExpired | CloseCode::Policy
            );
            let _ = socket.emit(
                "close",
                &json!({"code": code.as_u16(), "reason": code.reason(), "reconnect": reconnect}),
            );
        }
    }
    let _ = socket.disconnect();
    tracing::debug!(conn = handle.id, code = ?code, "socket.io disconnected");
}

/// A frame as an event payload, made once per namespace and shared.
pub struct Payload {
    name: &'static str,
    value: Value,
    json: Option<Box<RawValue>>,
}

impl Payload {
    /// The event for `frame` in the namespace with room prefix `prefix`.
    pub fn event(frame: &ServerFrame, prefix: Option<&str>) -> Payload {
        let (name, value) = vocab::server_event(frame, prefix);
        let json = vocab::to_raw_json(&value);
        Payload { name, value, json }
    }
}

/// Requests awaiting their reply: the broker's request id → the client's
/// ack callback.
#[derive(Default)]
struct Acks {
    next: u64,
    waiting: HashMap<u64, AckSender>,
}

/// A Socket.IO socket's output: what a [`ConnHandle`] with
/// [`Sink::SocketIo`] writes through.
pub struct SioOut {
    socket: SocketRef,
    json: bool,
    prefix: Option<Arc<str>>,
    acks: Mutex<Acks>,
    ack_limit: usize,
    write_timeout: Duration,
}

impl SioOut {
    /// The namespace's room prefix.
    pub fn prefix(&self) -> &Option<Arc<str>> {
        &self.prefix
    }

    /// Emit a shared payload.
    pub fn emit(&self, p: &Payload, ephemeral: bool) -> Pushed {
        outcome(self.emit_raw(p), ephemeral)
    }

    /// Emit in this socket's parser: the shared JSON text, or the value.
    fn emit_raw(&self, p: &Payload) -> Result<(), SendError> {
        match (&p.json, self.json) {
            (Some(raw), true) => self.socket.emit(p.name, &**raw),
            _ => self.socket.emit(p.name, &p.value),
        }
    }

    /// Send one frame to this socket: a reply to the request's ack
    /// callback if it is waiting, otherwise as an event.
    pub fn send(&self, frame: &ServerFrame) -> Pushed {
        if let Some(id) = vocab::reply_id(frame) {
            let waiting = self.acks.lock().waiting.remove(&id);
            if let Some(ack) = waiting {
                return outcome(
                    ack.send(&vocab::ack_payload(frame, self.prefix.as_deref())),
                    false,
                );
            }
        }
        self.emit(
            &Payload::event(frame, self.prefix.as_deref()),
            frame.is_ephemeral(),
        )
    }

    /// Send one frame, waiting (up to `--write-timeout`) while the socket's
    /// buffer is full: replay, paced by the client's reading.
    pub async fn send_wait(&self, frame: &ServerFrame, cancel: &CancellationToken) -> bool {
        let p = Payload::event(frame, self.prefix.as_deref());
        let deadline = Instant::now() + self.write_timeout;
        loop {
            match self.emit_raw(&p) {
                Ok(()) => return true,
                Err(SendError::Socket(SocketError::InternalChannelFull))
                    if Instant::now() < deadline =>
                {
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = cancel.cancelled() => return false,
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Keep an ack callback; its request id, or the callback back if too
    /// many are waiting.
    fn register(&self, ack: AckSender) -> Result<u64, AckSender> {
        let mut a = self.acks.lock();
        if a.waiting.len() >= self.ack_limit {
            return Err(ack);
        }
        a.next += 1;
        let id = a.next;
        a.waiting.insert(id, ack);
        Ok(id)
    }

    /// Answer a request that has no reply of its own (typing, mark) with
    /// `{}`, unless an error answered it already.
    fn settle(&self, id: Option<u64>) {
        let Some(id) = id else { return };
        let waiting = self.acks.lock().waiting.remove(&id);
        if let Some(ack) = waiting {
            let _ = ack.send(&json!({}));
        }
    }
}

/// What a send's result means for the slow-consumer policy.
fn outcome(r: Result<(), SendError>, ephemeral: bool) -> Pushed {
    match r {
        Ok(()) => Pushed::Queued,
        Err(SendError::Socket(SocketError::InternalChannelFull)) if ephemeral => Pushed::Dropped,
        Err(SendError::Socket(_)) => Pushed::Closed,
        Err(SendError::Serialize(e)) => {
            tracing::error!(error = %e, "socket.io payload did not serialize");
            Pushed::Queued
        }
    }
}
