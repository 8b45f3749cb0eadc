//! The operators' API behind the admin console (`/admin`): what every node
//! holds (connections, rooms, users) and the actions on it (disconnect,
//! revoke, moderate any room, delete any message), every action audited.
//!
//! Rules:
//! - Only operators: a token whose user is in `--admins` or that carries
//!   `"admin": true`; anyone else gets 403, no token 401.
//! - The whole cluster, from any node: the live nodes announce their
//!   address on the bus (a lease renewed every [`HEARTBEAT`]); a request
//!   gathers each node's own view (`/api/admin/local...`) with the
//!   operator's token (all nodes at once), and an action on a connection
//!   goes to the node that holds it. A node that does not answer within
//!   [`FAN_OUT_TIMEOUT`] is listed with its error, never hides the others.
//! - Every action is written to the admin audit log (`GET
//!   /api/admin/audit`) before it is answered.

use std::{sync::Arc, time::Duration};

use hyper::{body::Incoming, Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_proto::{entry::ModAction, names::RoomName, CloseCode, EventKind, Meta};

use super::{authenticate, hub_error, json_response, read_json, ApiError, Resp};
use crate::{
    hub::{Post, Reply},
    metrics::quantile_of,
    state::AppState,
    store::AdminEntry,
};

/// How often a node renews its announced address (its lease is three times this).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a gathered request waits for another node.
pub const FAN_OUT_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether these claims are an operator's.
pub fn is_admin(state: &AppState, claims: &crate::auth::Claims) -> bool {
    claims.admin || state.cfg.auth.admins.contains(&claims.sub)
}

/// The operator making `req`, or 401/403.
fn operator(state: &AppState, req: &Request<Incoming>) -> Result<crate::auth::Claims, ApiError> {
    let claims = authenticate(state, req)?;
    if !is_admin(state, &claims) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "operators only (--admins)",
        ));
    }
    Ok(claims)
}

/// Route `/api/admin/...`; None for a path that is not one.
pub async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    path: &str,
) -> Option<(&'static str, Result<Resp, ApiError>)> {
    let rest = path.strip_prefix("/api/admin/")?;
    let method = req.method().clone();
    let out = match (&method, rest) {
        (&Method::GET, "local") => ("admin_local", local(state, &req).await),
        (&Method::GET, "overview") => ("admin_overview", overview(state, &req).await),
        (&Method::GET, "audit") => ("admin_audit", audit(state, &req).await),
        (&Method::POST, "local/disconnect") => ("admin_local", local_disconnect(state, req).await),
        (&Method::POST, "disconnect") => ("admin_disconnect", disconnect(state, req).await),
        (&Method::POST, "revoke") => ("admin_revoke", revoke(state, req).await),
        (&Method::POST, "ban") => ("admin_ban", ban(state, req, true).await),
        (&Method::POST, "unban") => ("admin_ban", ban(state, req, false).await),
        (&Method::POST, p) if p.starts_with("rooms/") => {
            let p = percent_encoding::percent_decode_str(&p["rooms/".len()..])
                .decode_utf8_lossy()
                .to_string();
            match p.rsplit_once('/') {
                Some((room, "moderate")) => ("admin_moderate", moderate(state, req, room).await),
                Some((head, "delete")) => match head
                    .rsplit_once("/messages/")
                    .and_then(|(room, seq)| Some((room.to_string(), seq.parse::<u64>().ok()?)))
                {
                    Some((room, seq)) => ("admin_delete", delete(state, req, &room, seq).await),
                    None => ("other", Err(ApiError::no_route())),
                },
                _ => ("other", Err(ApiError::no_route())),
            }
        }
        _ => ("other", Err(ApiError::no_route())),
    };
    Some(out)
}

/// Write an operator's action to the audit log.
async fn record(
    state: &AppState,
    actor: &str,
    action: &str,
    detail: Value,
) -> Result<(), ApiError> {
    state
        .store
        .admin_record(AdminEntry {
            ts: crate::clock::now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            detail: detail.to_string(),
        })
        .await?;
    tracing::info!(actor, action, %detail, "operator action");
    Ok(())
}

/// Most connections (and rooms) one node lists per request.
pub const MAX_LISTED: usize = 5000;
/// What it lists without `?limit=`.
pub const DEFAULT_LISTED: usize = 500;

/// What a listing asks for: `?user=` (a name, or a prefix ending in `*`)
/// and `?limit=` (at most [`MAX_LISTED`]).
#[derive(Debug, Clone, Default)]
struct Filter {
    user: Option<String>,
    limit: usize,
}

impl Filter {
    fn of(req: &Request<Incoming>) -> Self {
        let q = super::query(req);
        Filter {
            user: q.get("user").filter(|u| !u.is_empty()).cloned(),
            limit: q
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(DEFAULT_LISTED)
                .clamp(1, MAX_LISTED),
        }
    }

    fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::from("?"));
        q.append_pair("limit", &self.limit.to_string());
        if let Some(u) = &self.user {
            q.append_pair("user", u);
        }
        q.finish()
    }

    fn matches(&self, user: &str) -> bool {
        match self.user.as_deref() {
            None => true,
            Some(f) => match f.strip_suffix('*') {
                Some(prefix) => user.starts_with(prefix),
                None => user == f,
            },
        }
    }
}

/// This node's view: its connections (those `f` matches, at most its
/// limit, with the total), rooms (at most the limit) and stats.
fn local_view(state: &AppState, f: &Filter) -> Value {
    let m = &state.metrics;
    let conns: Vec<_> = state
        .hub
        .connections_snapshot()
        .into_iter()
        .filter(|c| f.matches(&c.user))
        .collect();
    let total = conns.len();
    let mut rooms = state.hub.rooms_snapshot();
    let rooms_total = rooms.len();
    let publish = m.buckets("publish_seconds");
    rooms.truncate(f.limit);
    json!({
        "node": state.node,
        "connections_total": total,
        "connections": conns.into_iter().take(f.limit).collect::<Vec<_>>(),
        "rooms_total": rooms_total,
        "rooms": rooms,
        "stats": {
            "deliveries": m.deliveries.get(),
            "connections": m.connections.get(),
            // Accept to ack (stored, delivered), since start: bucket bounds.
            "publish_p50_ms": quantile_of(&publish, 0.5).map(|s| s * 1e3),
            "publish_p99_ms": quantile_of(&publish, 0.99).map(|s| s * 1e3),
        },
    })
}

/// `GET /api/admin/local`: this node only.
async fn local(state: &AppState, req: &Request<Incoming>) -> Result<Resp, ApiError> {
    operator(state, req)?;
    Ok(json_response(
        StatusCode::OK,
        &local_view(state, &Filter::of(req)),
    ))
}

/// The live nodes (id, address); just this one without a cluster.
async fn nodes(state: &AppState) -> Vec<(String, Option<String>)> {
    match state.hub.cluster_nodes().await {
        Some(Ok(v)) if !v.is_empty() => v.into_iter().map(|(n, u)| (n, Some(u))).collect(),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "node list unavailable; showing this node only");
            vec![(state.node.clone(), None)]
        }
        _ => vec![(state.node.clone(), None)],
    }
}

/// Ask node `url` for `path` (GET, or POST with `body`) as the operator.
async fn ask_node(
    state: &AppState,
    url: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let full = format!("{}{path}", url.trim_end_matches('/'));
    let r = match body {
        Some(b) => state.admin_http.post(&full).json(b),
        None => state.admin_http.get(&full),
    };
    let resp = r
        .bearer_auth(token)
        .timeout(FAN_OUT_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", v["message"]));
    }
    Ok(v)
}

/// `GET /api/admin/overview?user=&limit=`: every node's view, and the
/// users online over all of them (among the connections listed).
async fn overview(state: &AppState, req: &Request<Incoming>) -> Result<Resp, ApiError> {
    operator(state, req)?;
    let token = super::bearer(req).unwrap_or_default();
    let f = Filter::of(req);
    let path = format!("/api/admin/local{}", f.query());
    // Every node at once: the slowest one (at most FAN_OUT_TIMEOUT) sets
    // the time, in node order.
    let asks = nodes(state).await.into_iter().map(|(node, url)| {
        let (f, path, token) = (&f, &path, &token);
        async move {
            match url {
                _ if node == state.node => local_view(state, f),
                Some(u) => match ask_node(state, &u, path, token, None).await {
                    Ok(v) => v,
                    Err(e) => json!({"node": node, "error": e}),
                },
                None => json!({"node": node, "error": "no address"}),
            }
        }
    });
    let views: Vec<Value> = futures_util::future::join_all(asks).await;
    let mut users: std::collections::BTreeMap<String, (u64, Vec<String>)> = Default::default();
    for v in &views {
        let node = v["node"].as_str().unwrap_or_default().to_string();
        for c in v["connections"].as_array().into_iter().flatten() {
            let u = users
                .entry(c["user"].as_str().unwrap_or_default().to_string())
                .or_default();
            u.0 += 1;
            if !u.1.contains(&node) {
                u.1.push(node.clone());
            }
        }
    }
    let users: Vec<Value> = users
        .into_iter()
        .map(
            |(user, (sessions, nodes))| json!({"user": user, "sessions": sessions, "nodes": nodes}),
        )
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"node": state.node, "nodes": views, "users": users}),
    ))
}

/// `GET /api/admin/audit`: the newest 200 operator actions.
async fn audit(state: &AppState, req: &Request<Incoming>) -> Result<Resp, ApiError> {
    operator(state, req)?;
    let entries = state.store.admin_audit(200).await?;
    Ok(json_response(StatusCode::OK, &json!({"entries": entries})))
}

/// What to disconnect: one connection (`node` + `id`) or a user everywhere.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    user: Option<String>,
}

/// Close what `t` names on this node with `code`: (closed, token ids).
fn close_here(state: &AppState, t: &Target, code: CloseCode) -> (usize, Vec<String>) {
    match (t.id, t.user.as_deref()) {
        (Some(id), _) => (usize::from(state.hub.close_conn(id, code)), vec![]),
        (None, Some(user)) => {
            let jtis = state.hub.close_user(user, code);
            (jtis.len(), jtis)
        }
        _ => (0, vec![]),
    }
}

/// `POST /api/admin/local/disconnect {id | user, revoke?}`: on this node.
async fn local_disconnect(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    operator(state, &req)?;
    let v: Value = read_json(state, req).await?;
    let revoke = v["revoke"].as_bool().unwrap_or(false);
    let t = Target {
        node: None,
        id: v["id"].as_u64(),
        user: v["user"].as_str().map(str::to_string),
    };
    let code = if revoke {
        CloseCode::TokenRevoked
    } else {
        CloseCode::Disconnected
    };
    let (closed, jtis) = close_here(state, &t, code);
    Ok(json_response(
        StatusCode::OK,
        &json!({"node": state.node, "closed": closed, "jtis": jtis}),
    ))
}

/// Close what `t` names wherever it is (`revoke`: close with 4002 and
/// revoke the tokens they used); returns (closed, token ids).
async fn close_everywhere(
    state: &AppState,
    token: &str,
    t: &Target,
    revoke: bool,
) -> Result<(usize, Vec<String>), ApiError> {
    let code = if revoke {
        CloseCode::TokenRevoked
    } else {
        CloseCode::Disconnected
    };
    let mut closed = 0;
    let mut jtis = Vec::new();
    for (node, url) in nodes(state).await {
        if t.node.as_ref().is_some_and(|n| *n != node) {
            continue;
        }
        if node == state.node {
            let (n, j) = close_here(state, t, code);
            closed += n;
            jtis.extend(j);
            continue;
        }
        let Some(url) = url else { continue };
        let body = json!({"id": t.id, "user": t.user, "revoke": revoke});
        match ask_node(
            state,
            &url,
            "/api/admin/local/disconnect",
            token,
            Some(&body),
        )
        .await
        {
            Ok(v) => {
                closed += v["closed"].as_u64().unwrap_or(0) as usize;
                jtis.extend(
                    v["jtis"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|j| j.as_str().map(str::to_string)),
                );
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "node_unavailable",
                    format!("node {node}: {e}"),
                ))
            }
        }
    }
    Ok((closed, jtis))
}

/// `POST /api/admin/disconnect {node, id} | {user}`: close a connection,
/// or every connection of a user, with 4007 (the client does not
/// reconnect by itself).
async fn disconnect(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let op = operator(state, &req)?;
    let token = super::bearer(&req).unwrap_or_default();
    let t: Target = read_json(state, req).await?;
    if t.id.is_some() == t.user.is_some() || (t.id.is_some() && t.node.is_none()) {
        return Err(ApiError::bad_request(
            "give {node, id} for one connection or {user} for all of a user's",
        ));
    }
    record(
        state,
        &op.sub,
        "disconnect",
        json!({"node": t.node, "id": t.id, "user": t.user}),
    )
    .await?;
    let (closed, _) = close_everywhere(state, &token, &t, false).await?;
    Ok(json_response(StatusCode::OK, &json!({"closed": closed})))
}

/// `POST /api/admin/revoke {user}`: close every connection of the user
/// with 4002 and revoke the tokens they used, on every node (tokens the
/// user holds but does not use now stay valid until they expire).
async fn revoke(state: &AppState, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let op = operator(state, &req)?;
    let token = super::bearer(&req).unwrap_or_default();
    let t: Target = read_json(state, req).await?;
    let Some(user) = t
        .user
        .clone()
        .filter(|_| t.id.is_none() && t.node.is_none())
    else {
        return Err(ApiError::bad_request("give {user}"));
    };
    record(state, &op.sub, "revoke", json!({"user": user})).await?;
    let (closed, jtis) = close_everywhere(state, &token, &t, true).await?;
    // Our tokens live at most --token-ttl: a revocation that long covers them.
    let exp = crate::clock::now_secs() + state.cfg.auth.token_ttl.as_secs();
    let mut revoked = 0;
    for jti in jtis.iter().filter(|j| !j.is_empty()) {
        state.store.revoke(jti, exp).await?;
        state.auth.revoke(jti, exp);
        state
            .hub
            .revoke_everywhere(&user, jti, exp)
            .await
            .map_err(hub_error)?;
        revoked += 1;
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"closed": closed, "revoked_tokens": revoked}),
    ))
}

/// `POST /api/admin/ban {user, until?}` (ms; absent: for good) and `POST
/// /api/admin/unban {user}`: a server ban refuses the user's tokens and
/// logins on every node and disconnects them (4007). It is kept as a
/// revocation (`auth::ban_key`): stored, announced, loaded at start.
async fn ban(state: &AppState, req: Request<Incoming>, on: bool) -> Result<Resp, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ban {
        user: String,
        #[serde(default)]
        until: Option<u64>,
    }
    let op = operator(state, &req)?;
    let token = super::bearer(&req).unwrap_or_default();
    let b: Ban = read_json(state, req).await?;
    shoal_proto::names::validate_user(&b.user)
        .map_err(|e| ApiError::bad_request(format!("user `{}`: {e}", b.user)))?;
    if b.user == op.sub {
        return Err(ApiError::bad_request("an operator cannot ban themselves"));
    }
    let now = crate::clock::now_secs();
    // Seconds, as revocations keep them; "for good" is a century.
    let exp = match b.until {
        Some(ms) if ms / 1000 <= now => {
            return Err(ApiError::bad_request("`until` is in the past"))
        }
        Some(ms) => ms.div_ceil(1000),
        None => now + 100 * 365 * 24 * 3600,
    };
    let key = crate::auth::ban_key(&b.user);
    record(
        state,
        &op.sub,
        if on { "ban" } else { "unban" },
        json!({"user": b.user, "until": b.until}),
    )
    .await?;
    state.store.unrevoke(&key).await?;
    state.auth.unrevoke(&key);
    let closed = if on {
        state.store.revoke(&key, exp).await?;
        state.auth.revoke(&key, exp);
        // The other nodes refuse the user too, and disconnect them.
        state
            .hub
            .revoke_everywhere(&b.user, &key, exp)
            .await
            .map_err(hub_error)?;
        let t = Target {
            node: None,
            id: None,
            user: Some(b.user.clone()),
        };
        close_everywhere(state, &token, &t, false).await?.0
    } else {
        // Expiry 0 is "lifted" to the other nodes.
        state
            .hub
            .revoke_everywhere(&b.user, &key, 0)
            .await
            .map_err(hub_error)?;
        0
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"user": b.user, "banned": on, "closed": closed}),
    ))
}

/// `POST /api/admin/rooms/{room}/moderate {action, user?, until?, role?,
/// topic?, reason?}`: a moderation action in any created room, as an
/// operator (the rules of `hub::acl` with an owner's rights).
async fn moderate(state: &AppState, req: Request<Incoming>, room: &str) -> Result<Resp, ApiError> {
    #[derive(Deserialize)]
    struct Body {
        action: String,
        #[serde(flatten)]
        what: ModAction,
    }
    let op = operator(state, &req)?;
    let b: Body = read_json(state, req).await?;
    let Some(kind) = EventKind::action(&b.action) else {
        return Err(ApiError::bad_request(format!(
            "unknown action `{}`",
            b.action
        )));
    };
    let (name, post) = state
        .hub
        .moderation(room, &op.sub, kind, b.what.clone(), &state.directory, true)
        .await
        .map_err(hub_error)?;
    record(
        state,
        &op.sub,
        "moderate",
        json!({"room": name, "action": kind.name(), "what": b.what}),
    )
    .await?;
    let seq = publish(state, &name, &op.sub, post).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": name, "seq": seq}),
    ))
}

/// `POST /api/admin/rooms/{room}/messages/{seq}/delete`: delete any
/// message. The deletion is the room's entry by the system sender
/// (`server`): members see the system removed it, the audit log who.
async fn delete(
    state: &AppState,
    req: Request<Incoming>,
    room: &str,
    seq: u64,
) -> Result<Resp, ApiError> {
    let op = operator(state, &req)?;
    let name =
        RoomName::parse(room).map_err(|e| ApiError::bad_request(format!("room `{room}`: {e}")))?;
    if !state.hub.persists(&name) {
        return Err(ApiError::bad_request("this namespace keeps no messages"));
    }
    match state.hub.target(room, seq, &op.sub).await? {
        Some(t) if !t.event && !t.deleted => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no message {seq} in `{room}`"),
            ))
        }
    }
    record(state, &op.sub, "delete", json!({"room": room, "seq": seq})).await?;
    let post = Post {
        body: shoal_proto::Body::Null,
        meta: Meta::event(EventKind::Delete, seq),
    };
    let at = publish(state, room, shoal_proto::names::SERVER_SENDER, post).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"room": room, "seq": seq, "at": at}),
    ))
}

/// Sequence `post` in `room` as `from`; its seq.
async fn publish(state: &AppState, room: &str, from: &str, post: Post) -> Result<u64, ApiError> {
    let name = RoomName::parse(room).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let from: Arc<str> = Arc::from(from);
    // Through the server API's path: the system sender may publish here.
    state
        .hub
        .publish_async(&name, &from, post, None, true, Reply::Chan(tx))
        .await;
    let out = rx
        .await
        .map_err(|_| ApiError::internal("publish reply dropped"))?
        .map_err(hub_error)?;
    Ok(out.seq)
}

/// Keep announcing this node's address on the bus until `stop`.
pub async fn heartbeat(state: Arc<AppState>, url: String) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = state.hub.announce(&state.node, &url, HEARTBEAT * 3).await {
            tracing::debug!(error = %e, "node address not announced");
        }
    }
}
