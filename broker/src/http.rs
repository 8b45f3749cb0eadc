//! HTTP routing: REST API, `/health`, `/metrics`, the web client, and the
//! `/ws` handshake (authentication, origin and capacity checks happen
//! here, before any upgrade).
//!
//! Every error is JSON `{error, message}` with a matching status; internal
//! details are logged, never returned.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Method, Request, Response, StatusCode,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::json;
use shoal_proto::{names::RoomName, Encoding};

use crate::{auth::AuthError, hub::Reply, state::AppState, store::StoreError};

pub mod admin;

/// Response type of every handler.
pub type Resp = Response<Full<Bytes>>;

/// Largest accepted REST request body.
pub const MAX_BODY: usize = 64 * 1024;

/// An error answered as `{error, message}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
    /// Seconds for a `Retry-After` header (429 and 503 that will pass).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            message: message.into(),
            retry_after: None,
        }
    }
    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    fn no_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }
    fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
    fn into_response(self) -> Resp {
        let mut r = json_response(
            self.status,
            &json!({"error": self.error, "message": self.message}),
        );
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => {
                ApiError::new(StatusCode::CONFLICT, "conflict", "already exists")
            }
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "storage unavailable; retry later",
                )
            }
        }
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The client address of the connection a request came on (a request
/// extension set by the server).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Take a login/registration token for the request's client address;
/// 429 with Retry-After when its bucket is empty.
fn login_admit_ip<B>(state: &AppState, req: &Request<B>) -> Result<(), ApiError> {
    let Some(peer) = req.extensions().get::<Peer>() else {
        return Ok(());
    };
    state
        .login_by_ip
        .check(&peer.0.ip())
        .map_err(|wait| login_refused(state, "address", wait))
}

/// Take a login token for a user name (any spelling counts as one).
fn login_admit_user(state: &AppState, user: &str) -> Result<(), ApiError> {
    state
        .login_by_user
        .check(&shoal_proto::names::user_key(user))
        .map_err(|wait| login_refused(state, "user", wait))
}

fn login_refused(state: &AppState, scope: &'static str, wait: Duration) -> ApiError {
    state.metrics.rate_limited(match scope {
        "user" => "login_user",
        _ => "login_address",
    });
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many login attempts for this {scope}; retry later"),
    )
    .retry_after(wait.as_secs_f64().ceil() as u64)
}

/// Route one request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let (route, result): (&'static str, Result<Resp, ApiError>) = match (&method, path.as_str()) {
        (&Method::GET, "/ws") => ("ws", ws_handshake(&state, req).await),
        (_, p) if p.starts_with("/api/admin/") => match admin::route(&state, req, p).await {
            Some(out) => out,
            None => ("other", Err(ApiError::no_route())),
        },
        (&Method::GET, "/admin") => ("static", Ok(asset(ADMIN_HTML, "text/html; charset=utf-8"))),
        (&Method::GET, "/admin.js") => (
            "static",
            Ok(asset(ADMIN_JS, "text/javascript; charset=utf-8")),
        ),
        (&Method::GET, "/health") => ("health", Ok(health(&state))),
        (&Method::GET, "/metrics") => ("metrics", Ok(metrics(&state))),
        (&Method::POST, "/api/register") => ("register", register(&state, req).await),
        (&Method::POST, "/api/login") => ("login", login(&state, req).await),
        (&Method::POST, "/api/logout") => ("logout", logout(&state, req).await),
        (&Method::GET, "/api/users") => ("users", users(&state, req).await),
        (&Method::POST, "/api/publish") => ("api_publish", api_publish(&state, req, None).await),
        (&Method::GET, "/api/rooms") => ("rooms", user_rooms(&state, req).await),
        (&Method::POST, "/api/rooms") => ("room_create", create_room(&state, req).await),
        (&Method::POST, "/api/files") => ("file_upload", upload(&state, req).await),
        (&Method::GET, p) if p.starts_with("/api/files/") => {
            let id = p["/api/files/".len()..].to_string();
            ("file_get", download(&state, req, &id).await)
        }
        (m, p) if p.starts_with("/api/rooms/") => {
            // Room names contain `:`; clients may send it percent-encoded.
            let rest = percent_encoding::percent_decode_str(&p["/api/rooms/".len()..])
                .decode_utf8_lossy()
                .to_string();
            match (m, rest.rsplit_once('/')) {
                (&Method::POST, Some((room, "messages"))) => {
                    let room = room.to_string();
                    ("api_publish", api_publish(&state, req, Some(room)).await)
                }
                (&Method::GET, Some((room, "messages"))) => {
                    let room = room.to_string();
                    ("history", history(&state, req, &room).await)
                }
                (&Method::GET, Some((room, "search"))) => {
                    let room = room.to_string();
                    ("search", search(&state, req, &room).await)
                }
                (&Method::GET, Some((room, "audit"))) => {
                    let room = room.to_string();
                    ("audit", audit(&state, req, &room).await)
                }
                (&Method::GET, Some((room, "info"))) => {
                    let room = room.to_string();
                    ("room_info", room_info(&state, req, &room).await)
                }
                (&Method::GET, Some((head, what @ ("thread" | "edits")))) => {
                    let parsed = head
                        .rsplit_once("/messages/")
                        .and_then(|(room, seq)| Some((room.to_string(), seq.parse::<u64>().ok()?)));
                    match (parsed, what) {
                        (Some((room, seq)), "thread") => {
                            ("thread", thread(&state, req, &room, seq).await)
                        }
                        (Some((room, seq)), _) => ("edits", edits(&state, req, &room, seq).await),
                        (None, _) => ("other", Err(ApiError::no_route())),
                    }
                }
                _ => ("other", Err(ApiError::no_route())),
            }
        }
        (&Method::GET, "/" | "/index.html") => {
            ("static", Ok(asset(INDEX_HTML, "text/html; charset=utf-8")))
        }
        (&Method::GET, "/app.js") => (
            "static",
            Ok(asset(APP_JS, "text/javascript; charset=utf-8")),
        ),
        (&Method::GET, "/style.css") => ("static", Ok(asset(STYLE_CSS, "text/css; charset=utf-8"))),
        (&Method::GET, "/vendor/shoal-client.js") => (
            "static",
            Ok(asset(SHOAL_CLIENT_JS, "text/javascript; charset=utf-8")),
        ),
        (&Method::GET, "/vendor/socket.io.min.js") => (
            "static",
            Ok(asset(SOCKET_IO_JS, "text/javascript; charset=utf-8")),
        ),
        (
            _,
            "/ws" | "/health" | "/metrics" | "/api/register" | "/api/login" | "/api/logout"
            | "/api/users" | "/api/publish" | "/api/rooms" | "/api/files",
        ) => (
            "other",
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} not allowed on {path}"),
            )),
        ),
        _ => ("other", Err(ApiError::no_route())),
    };
    let resp = result.unwrap_or_else(ApiError::into_response);
    state.metrics.http(route, resp.status().as_u16());
    Ok(resp)
}

// The web client, embedded in the binary: only these exact paths are
// served, so no request path ever reaches the filesystem.
const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const ADMIN_HTML: &str = include_str!("../static/admin.html");
const ADMIN_JS: &str = include_str!("../static/admin.js");
const STYLE_CSS: &str = include_str!("../static/style.css");
// @shoal/client (clients/js), an ES module: pages import it from here.
const SHOAL_CLIENT_JS: &str = include_str!("../../clients/js/src/index.js");
// The stock socket.io-client 4.8.4 bundle (MIT; its source map reference
// removed), loaded by the web client only for its long-polling fallback.
const SOCKET_IO_JS: &str = include_str!("../static/vendor/socket.io.min.js");

fn asset(body: &'static str, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data: blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn health(state: &AppState) -> Resp {
    let store_up = state.metrics.store_up.get() == 1;
    let bus = state.hub.cluster_health();
    let ok = store_up && bus != Some(false);
    json_response(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({
            "status": if ok { "ok" } else { "degraded" },
            "node": state.node,
            "connections": state.metrics.connections.get(),
            "store": if store_up { "up" } else { "down" },
            "bus": match bus { None => "local", Some(true) => "up", Some(false) => "down" },
        }),
    )
}

fn metrics(state: &AppState) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

async fn read_json<T: DeserializeOwned>(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let body = read_body(state, req, MAX_BODY, "body").await?;
    parse_json(&body)
}

/// Read a request body of at most `max` bytes under the body timeout and
/// minimum rate (see `httpconn`).
async fn read_body(
    state: &AppState,
    req: Request<Incoming>,
    max: usize,
    what: &str,
) -> Result<Bytes, ApiError> {
    use crate::httpconn::BodyError;
    let limits = state.cfg.http.body_limits(max);
    let declared = content_length(&req);
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} larger than {max} bytes"),
        ));
    }
    crate::httpconn::read_body(req.into_body(), limits, declared)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{what} larger than {max} bytes"),
            ),
            BodyError::TooSlow => {
                state.metrics.http_timeout("body");
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "{what} stalled for {} s or arrived slower than {} bytes/s",
                        limits.timeout.as_secs(),
                        limits.min_rate
                    ),
                )
            }
            BodyError::Aborted => ApiError::bad_request(format!("{what} ended early")),
        })
}

/// The declared `Content-Length`, if any and readable.
fn content_length<B>(req: &Request<B>) -> Option<usize> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Parse an untrusted REST body; a bad one is a 400, never a panic.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The token from `Authorization: Bearer` or the `token` query parameter.
fn bearer<B>(req: &Request<B>) -> Option<String> {
    if let Some(v) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string())
    })
}

fn authenticate<B>(state: &AppState, req: &Request<B>) -> Result<crate::auth::Claims, ApiError> {
    let verified = bearer(req)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
        .and_then(|t| state.auth.verify(&t));
    verified.map_err(|e| {
        state.metrics.auth_failure(e.label());
        ApiError::unauthorized(e.to_string())
    })
}

/// Body of `POST /api/register` and `POST /api/login`.
#[derive(Debug, Deserialize)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

async fn register(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    login_admit_ip(state, &req)?;
    let c: Credentials = read_json(state, req).await?;
    shoal_proto::names::validate_user(&c.username)
        .map_err(|e| ApiError::bad_request(format!("username: {e}")))?;
    if c.password.len() < 8 || c.password.len() > 1024 {
        return Err(ApiError::bad_request("password must be 8 to 1024 bytes"));
    }
    let hash = state
        .auth
        .hash_password(c.password)
        .await
        .map_err(ApiError::internal)?;
    state
        .store
        .create_user(&c.username, &hash)
        .await
        .map_err(|e| match e {
            StoreError::Conflict => {
                ApiError::new(StatusCode::CONFLICT, "conflict", "username taken")
            }
            e => e.into(),
        })?;
    state.directory.seen(&Arc::from(c.username.as_str()));
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"username": c.username}),
    ))
}

async fn login(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    login_admit_ip(state, &req)?;
    let c: Credentials = read_json(state, req).await?;
    login_admit_user(state, &c.username)?;
    let found = if shoal_proto::names::validate_user(&c.username).is_ok() {
        state.store.password_hash(&c.username).await?
    } else {
        None
    };
    // Names are case-insensitive: the token carries the name as registered.
    let (name, hash) = found.map_or((None, None), |(n, h)| (Some(n), Some(h)));
    if !state.auth.check_password(c.password, hash).await {
        state.metrics.auth_failure("bad_password");
        return Err(ApiError::unauthorized("invalid username or password"));
    }
    let name = name.unwrap_or(c.username);
    if state.auth.is_banned(&name) {
        state.metrics.auth_failure("banned");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this account is banned",
        ));
    }
    let (token, claims) = state.auth.issue(&name).map_err(ApiError::internal)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"token": token, "expires_at": claims.exp, "username": name}),
    ))
}

async fn logout(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let claims = authenticate(state, &req)?;
    if claims.jti.is_empty() {
        return Err(ApiError::bad_request(
            "token has no jti and cannot be revoked",
        ));
    }
    state.store.revoke(&claims.jti, claims.exp).await?;
    state.auth.revoke(&claims.jti, claims.exp);
    // Other nodes close the token's connections and refuse it.
    state
        .hub
        .revoke_everywhere(&claims.sub, &claims.jti, claims.exp)
        .await
        .map_err(hub_error)?;
    let closed = state.hub.close_token(
        &claims.sub,
        &claims.jti,
        shoal_proto::CloseCode::TokenRevoked,
    );
    Ok(json_response(
        StatusCode::OK,
        &json!({"revoked": true, "closed_connections": closed}),
    ))
}

async fn users(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    authenticate(state, &req)?;
    let list = state.store.list_users().await?;
    let users: Vec<_> = list
        .into_iter()
        .map(|u| json!({"username": u.name, "online": state.hub.is_online(&u.name)}))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"users": users})))
}

/// Body of `POST /api/publish`.
#[derive(Debug, Deserialize)]
pub struct ApiPublish {
    /// Target room (or taken from the path).
    #[serde(default)]
    pub room: Option<String>,
    /// Message body.
    pub body: shoal_proto::Body,
    /// Client message id for idempotent retries.
    #[serde(default)]
    pub cid: Option<String>,
}

/// Compare a presented key with the configured one without leaking where
/// (or whether, by length) they differ: both are hashed to 32 bytes first,
/// then compared over every byte.
fn keys_match(given: &[u8], key: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given), Sha256::digest(key));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The server API key: only from `Authorization: Bearer` (a key in a URL
/// ends up in proxy and access logs).
fn api_key_header<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn hub_error(e: crate::hub::HubError) -> ApiError {
    let status = StatusCode::from_u16(e.code.as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
    ApiError::new(status, e.code.name(), e.message)
}

/// Server-side publish: `POST /api/publish {room, body, cid?}` (or
/// `POST /api/rooms/{room}/messages {body}`), with the API key. Answers
/// after the message is stored and delivered, with its seq.
async fn api_publish(
    state: &AppState,
    req: Request<Incoming>,
    path_room: Option<String>,
) -> Result<Resp, ApiError> {
    let Some(key) = &state.cfg.auth.api_key else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "server API disabled (no SHOAL_API_KEY)",
        ));
    };
    match api_key_header(&req) {
        Some(t) if !t.is_empty() && keys_match(t.as_bytes(), key.as_bytes()) => {}
        _ => {
            state.metrics.auth_failure("bad_api_key");
            return Err(ApiError::unauthorized("invalid API key"));
        }
    }
    let p: ApiPublish = read_json(state, req).await?;
    let Some(room) = path_room.or(p.room) else {
        return Err(ApiError::bad_request("missing `room`"));
    };
    let name =
        RoomName::parse(&room).map_err(|e| ApiError::bad_request(format!("room `{room}`: {e}")))?;
    if name.dm.is_some() {
        return Err(ApiError::bad_request(
            "the server API does not post into direct-message rooms",
        ));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let from: Arc<str> = Arc::from(SERVER_SENDER);
    state
        .hub
        .publish_async(&name, &from, p.body.into(), p.cid, true, Reply::Chan(tx))
        .await;
    let out = rx
        .await
        .map_err(|_| ApiError::internal("publish reply dropped"))?
        .map_err(hub_error)?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"room": room, "seq": out.seq, "ts": out.ts, "recipients": out.recipients}),
    ))
}

/// Sender name of messages published through the server API.
pub use shoal_proto::names::SERVER_SENDER;

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn num<T: std::str::FromStr>(q: &HashMap<String, String>, k: &str) -> Result<Option<T>, ApiError> {
    q.get(k)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("`{k}` must be a non-negative integer")))
        })
        .transpose()
}

/// Authenticated user allowed to read `room` (not another pair's DM, not
/// a private room they are no member of, not banned), in a namespace that
/// keeps history.
async fn room_access(
    state: &AppState,
    req: &Request<Incoming>,
    room: &str,
) -> Result<crate::auth::Claims, ApiError> {
    let claims = authenticate(state, req)?;
    let name = state
        .hub
        .check_access(room, &claims.sub)
        .map_err(hub_error)?;
    if !state.hub.persists(&name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this namespace keeps no history",
        ));
    }
    state
        .hub
        .may_read(&name, &claims.sub)
        .await
        .map_err(hub_error)?;
    Ok(claims)
}

/// `POST /api/rooms {room, private?, topic?}`: create a room you own
/// (201 `{room, seq}`); 409 if it exists.
async fn create_room(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        room: String,
        #[serde(default)]
        private: bool,
        #[serde(default)]
        topic: Option<String>,
        #[serde(default)]
        title: Option<String>,
    }
    let claims = authenticate(state, &req)?;
    let c: Create = read_json(state, req).await?;
    let what = shoal_proto::entry::ModAction {
        private: Some(c.private),
        topic: c.topic,
        title: c.title,
        ..Default::default()
    };
    let (room, post) = state
        .hub
        .moderation(
            &c.room,
            &claims.sub,
            shoal_proto::EventKind::Create,
            what,
            &state.directory,
            false,
        )
        .await
        .map_err(hub_error)?;
    let name = RoomName::parse(&room).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let from: Arc<str> = Arc::from(claims.sub.as_str());
    state
        .hub
        .publish_async(&name, &from, post, None, false, Reply::Chan(tx))
        .await;
    let out = rx
        .await
        .map_err(|_| ApiError::internal("publish reply dropped"))?
        .map_err(hub_error)?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"room": room, "seq": out.seq, "ts": out.ts}),
    ))
}

/// `GET /api/rooms/{room}/info`: the room's rules as a reader sees them:
/// `{room, created, private, owner, topic, admins, members (private
/// rooms), you (your role)}`.
async fn room_info(state: &AppState, req: Request<Incoming>, room: &str) -> Result<Resp, ApiError> {
    let claims = room_access(state, &req, room).await?;
    let name = RoomName::parse(room).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let v = state
        .hub
        .room_info(&name, &claims.sub)
        .await
        .map_err(hub_error)?;
    Ok(json_response(StatusCode::OK, &v))
}

/// `GET /api/rooms/{room}/audit?before=&limit=`: the room's moderation
/// entries and deletions, newest first, for its owner and admins.
async fn audit(state: &AppState, req: Request<Incoming>, room: &str) -> Result<Resp, ApiError> {
    let claims = room_access(state, &req, room).await?;
    let (before, limit) = page_params(&req)?;
    if !state
        .hub
        .is_moderator(room, &claims.sub)
        .await
        .map_err(hub_error)?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the audit log is for the room's owner and admins",
        ));
    }
    let entries = state.store.audit(room, before, limit).await?;
    let entries: Vec<_> = entries
        .into_iter()
        .map(|e| {
            json!({"seq": e.msg.seq, "from": e.msg.from, "ts": e.msg.ts,
                   "kind": e.meta.kind.map(|k| k.name()), "target": e.meta.target,
                   "body": e.msg.body})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": room, "entries": entries}),
    ))
}

/// `?before=&limit=` of a page of messages (limit 1 to 200, default 50).
fn page_params(req: &Request<Incoming>) -> Result<(Option<u64>, usize), ApiError> {
    let q = query(req);
    let before = num::<u64>(&q, "before")?;
    let limit = num::<u32>(&q, "limit")?
        .unwrap_or(50)
        .clamp(1, crate::session::MAX_HISTORY_PAGE) as usize;
    Ok((before, limit))
}

/// `GET /api/rooms/{room}/messages?before=&limit=`: a history page, newest first.
async fn history(state: &AppState, req: Request<Incoming>, room: &str) -> Result<Resp, ApiError> {
    let (before, limit) = page_params(&req)?;
    let claims = room_access(state, &req, room).await?;
    let (messages, more) = state.hub.history(room, before, limit, &claims.sub).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": room, "messages": messages, "more": more}),
    ))
}

/// `GET /api/rooms/{room}/messages/{seq}/thread?before=&limit=`: the
/// replies to a message, newest first, like history.
async fn thread(
    state: &AppState,
    req: Request<Incoming>,
    room: &str,
    seq: u64,
) -> Result<Resp, ApiError> {
    let claims = room_access(state, &req, room).await?;
    let (before, limit) = page_params(&req)?;
    let (messages, more) = state
        .hub
        .thread(room, seq, before, limit, &claims.sub)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": room, "seq": seq, "messages": messages, "more": more}),
    ))
}

/// `GET /api/rooms/{room}/messages/{seq}/edits`: the previous versions of
/// a message, oldest first (retention removes them with the message).
async fn edits(
    state: &AppState,
    req: Request<Incoming>,
    room: &str,
    seq: u64,
) -> Result<Resp, ApiError> {
    let claims = room_access(state, &req, room).await?;
    match state.hub.target(room, seq, &claims.sub).await? {
        Some(t) if !t.event => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no message {seq} in `{room}`"),
            ))
        }
    }
    let versions = state.hub.edits(room, seq).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": room, "seq": seq, "versions": versions}),
    ))
}

/// `GET /api/rooms/{room}/search?q=&limit=&offset=`: full-text search, best first.
async fn search(state: &AppState, req: Request<Incoming>, room: &str) -> Result<Resp, ApiError> {
    room_access(state, &req, room).await?;
    let q = query(&req);
    let text = q.get("q").map(|s| s.trim()).unwrap_or("");
    if text.is_empty() || text.len() > 256 {
        return Err(ApiError::bad_request("`q` must be 1 to 256 bytes"));
    }
    if text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "`q` must not contain control characters",
        ));
    }
    if state.hub.history_is_hot_only() {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "search needs the shared store (--store postgres) in a cluster",
        ));
    }
    let limit = num::<u32>(&q, "limit")?.unwrap_or(20).clamp(1, 100) as usize;
    let offset = num::<u32>(&q, "offset")?.unwrap_or(0).min(10_000) as usize;
    let hits = state.store.search(room, text, limit, offset).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": room, "q": text, "messages": hits, "offset": offset}),
    ))
}

/// Attachment types accepted, as detected from the bytes.
pub const FILE_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
];

fn sanitize_file_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ' '))
        .take(100)
        .collect();
    let clean = clean.trim().trim_start_matches('.').to_string();
    if clean.is_empty() {
        "file".into()
    } else {
        clean
    }
}

/// The type of `data` by its magic bytes; UTF-8 without NULs is text.
fn detect_type(data: &[u8]) -> Option<&'static str> {
    match infer::get(data) {
        Some(t) => FILE_TYPES.iter().copied().find(|k| *k == t.mime_type()),
        None if !data.contains(&0) && std::str::from_utf8(data).is_ok() => Some("text/plain"),
        None => None,
    }
}

/// May `user` read or post attachments in `room`? DM parties, or recorded
/// members of the room.
async fn file_access(state: &AppState, room: &str, user: &str) -> Result<(), ApiError> {
    let name = state.hub.check_access(room, user).map_err(hub_error)?;
    if name.dm.is_some() || state.store.is_member(room, user).await? {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only members of the room may use its files",
        ))
    }
}

/// `POST /api/files?room=&name=` with the raw bytes as the body and a
/// `Content-Type` that must match them.
async fn upload(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let claims = authenticate(state, &req)?;
    let q = query(&req);
    let room = q
        .get("room")
        .ok_or_else(|| ApiError::bad_request("missing `room`"))?
        .clone();
    file_access(state, &room, &claims.sub).await?;
    let declared = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let name = sanitize_file_name(q.get("name").map(String::as_str).unwrap_or("file"));
    let max = state.cfg.http.max_file_size;
    let Some(length) = content_length(&req) else {
        return Err(ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "uploads need a Content-Length",
        ));
    };
    if length > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("file larger than {max} bytes"),
        ));
    }
    let quota = state.cfg.http.user_file_quota;
    if quota > 0 {
        let used = state.store.file_usage(&claims.sub).await?;
        if used + length as u64 > quota {
            state.metrics.rate_limited("file_quota");
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "quota_exceeded",
                format!("upload quota of {quota} bytes reached ({used} stored)"),
            ));
        }
    }
    // The upload's bytes come out of the node's upload budget while it is
    // read (see `httpconn`).
    let _budget = u32::try_from(length)
        .ok()
        .and_then(|n| state.upload_budget.clone().try_acquire_many_owned(n).ok())
        .ok_or_else(|| {
            state.metrics.rate_limited("upload_memory");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "too many uploads in progress; retry shortly",
            )
            .retry_after(1)
        })?;
    let data = read_body(state, req, max, "file").await?;
    if data.is_empty() {
        return Err(ApiError::bad_request("empty file"));
    }
    let Some(detected) = detect_type(&data) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("accepted types: {}", FILE_TYPES.join(", ")),
        ));
    };
    if declared != detected {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type `{declared}` does not match the bytes ({detected})"),
        ));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let size = data.len();
    state
        .store
        .put_file(crate::store::FileRecord {
            id: id.clone(),
            room: room.clone(),
            owner: claims.sub.clone(),
            name: name.clone(),
            content_type: detected.into(),
            data: data.to_vec(),
            created_ms: crate::clock::now_ms(),
        })
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"id": id, "url": format!("/api/files/{id}"), "room": room,
                "name": name, "content_type": detected, "size": size}),
    ))
}

/// `GET /api/files/{id}` (Bearer or `?token=`): members of the file's room only.
async fn download(state: &AppState, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let claims = authenticate(state, &req)?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such file");
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let f = state.store.get_file(id).await?.ok_or_else(not_found)?;
    file_access(state, &f.room, &claims.sub).await?;
    let disposition = if f.content_type.starts_with("image/") {
        "inline"
    } else {
        "attachment"
    };
    let mut r = Response::new(Full::new(Bytes::from(f.data)));
    let h = r.headers_mut();
    let hv = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("file"));
    h.insert(header::CONTENT_TYPE, hv(&f.content_type));
    h.insert(
        header::CONTENT_DISPOSITION,
        hv(&format!("{disposition}; filename=\"{}\"", f.name)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    Ok(r)
}

/// `GET /api/rooms`: rooms the user is a member of, with unread counts.
async fn user_rooms(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let claims = authenticate(state, &req)?;
    let rooms = state.store.user_rooms(&claims.sub).await?;
    Ok(json_response(StatusCode::OK, &json!({"rooms": rooms})))
}

/// Whether a connection's `Origin` passes `--allowed-origin` (for `/ws`
/// and Socket.IO alike). No list: all pass. Absent: not a browser,
/// allowed. Present: it must be readable and on the list (an unreadable
/// Origin is not an absent one).
pub(crate) fn origin_allowed(state: &AppState, headers: &hyper::HeaderMap) -> bool {
    let list = &state.cfg.auth.allowed_origins;
    list.is_empty()
        || headers
            .get(header::ORIGIN)
            .is_none_or(|o| o.to_str().is_ok_and(|o| list.iter().any(|a| a == o)))
}

async fn ws_handshake(state: &Arc<AppState>, mut req: Request<Incoming>) -> Result<Resp, ApiError> {
    let m = &state.metrics;
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        m.handshake("bad_request");
        return Err(ApiError::bad_request("expected a WebSocket upgrade"));
    }
    if !origin_allowed(state, req.headers()) {
        m.handshake("forbidden_origin");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "origin not allowed",
        ));
    }
    // A node cut off from the bus cannot deliver; a 503 sends the client
    // (or nginx's `proxy_next_upstream http_503`) to another node.
    if state.hub.cluster_health() == Some(false) {
        m.handshake("bus_down");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this node cannot reach the cluster bus; connect to another node",
        ));
    }
    let claims = authenticate(state, &req).inspect_err(|_| m.handshake("unauthorized"))?;
    let proto_header = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let Some(encoding) = Encoding::negotiate(proto_header.as_deref()) else {
        m.handshake("bad_request");
        return Err(ApiError::bad_request(format!(
            "unsupported subprotocol; use {} or {}",
            Encoding::MSGPACK_SUBPROTOCOL,
            Encoding::JSON_SUBPROTOCOL
        )));
    };
    let Ok(permit) = state.conn_permits.clone().try_acquire_owned() else {
        m.handshake("over_capacity");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "connection limit reached; retry later",
        ));
    };
    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req).map_err(|e| {
        m.handshake("bad_request");
        ApiError::bad_request(format!("bad WebSocket handshake: {e}"))
    })?;
    let (mut parts, _) = resp.into_parts();
    if proto_header.is_some() {
        parts.headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    // Over the handshake rate: finish the upgrade (browsers only see close
    // codes, not HTTP statuses) and close at once with 4005.
    let admitted = state
        .handshake_bucket
        .as_ref()
        .is_none_or(|b| b.lock().take());
    if admitted {
        m.handshake("ok");
    } else {
        m.handshake("rate_limited");
        m.rate_limited("handshake");
    }
    let st = state.clone();
    let timeout = state.cfg.conn.handshake_timeout;
    state.tracker.spawn(async move {
        let permit = permit;
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(mut ws)) if !admitted => {
                let code = shoal_proto::CloseCode::TryAgainLater;
                st.metrics.close(code);
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    ws.write_frame(fastwebsockets::Frame::close(
                        code.as_u16(),
                        code.reason().as_bytes(),
                    )),
                )
                .await;
            }
            Ok(Ok(ws)) => {
                let transport = crate::conn::Transport::from_upgraded(ws.into_inner().into_inner());
                // A task of its own: this one's state (the upgrade, its
                // timer) ends here instead of staying beside the
                // connection's for its whole life.
                let tracker = st.tracker.clone();
                tracker.spawn(async move {
                    // The connection holds its `--max-connections` permit.
                    let _permit = permit;
                    crate::conn::serve(st, transport, claims, encoding).await
                });
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                st.metrics.handshake("failed");
            }
            Err(_) => st.metrics.handshake("failed"),
        }
    });
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}
