//! REST API and authentication against a real broker.
mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;
use shoal_proto::{CloseCode, Encoding};

#[tokio::test]
async fn register_login_users_logout() {
    let b = Broker::start().await;
    let (s, v) = b
        .post(
            "/api/register",
            json!({"username": "alice", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!((s, v["username"].as_str()), (201, Some("alice")));
    let (s, v) = b
        .post(
            "/api/register",
            json!({"username": "alice", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("conflict")));
    let (s, v) = b
        .post(
            "/api/register",
            json!({"username": "bad name", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
    let (s, _) = b
        .post(
            "/api/register",
            json!({"username": "bob", "password": "short"}),
            None,
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = b.post("/api/register", json!({"username": 5}), None).await;
    assert_eq!(s, 400);
    let (s, v) = b
        .post(
            "/api/login",
            json!({"username": "alice", "password": "wrong-password"}),
            None,
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (401, Some("unauthorized")));
    let (s, _) = b
        .post(
            "/api/login",
            json!({"username": "nobody", "password": "password123"}),
            None,
        )
        .await;
    assert_eq!(s, 401);

    let alice = b.user("alice").await;
    let bob = b.user("bob").await;
    let (s, _) = b.get("/api/users", None).await;
    assert_eq!(s, 401);
    let _c = b.connect(&bob, Encoding::Json).await;
    let (s, v) = b.get("/api/users", Some(&alice)).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["users"],
        json!([{"username": "alice", "online": false}, {"username": "bob", "online": true}])
    );

    // Logout revokes the token: live connections close with 4002, new handshakes get 401.
    let mut live = b.connect(&alice, Encoding::MsgPack).await;
    let (s, v) = b.post("/api/logout", json!({}), Some(&alice)).await;
    assert_eq!((s, v["closed_connections"].as_u64()), (200, Some(1)));
    assert_eq!(
        live.closed().await,
        End::Closed(Some(CloseCode::TokenRevoked.as_u16()))
    );
    let err = b
        .try_connect(&alice, Encoding::Json)
        .await
        .err()
        .expect("revoked token refused");
    assert_eq!(err.0, 401);
    assert!(err.1.contains("revoked"), "{}", err.1);
    let (s, _) = b.get("/api/users", Some(&alice)).await;
    assert_eq!(s, 401);
    assert!(b.metric("shoal_auth_failures_total{node=").await >= 0.0);
    assert!(b.metrics().await.contains("reason=\"revoked\"} 2"));

    let (s, v) = b.get("/health", None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = b.get("/nope", None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));
    b.stop().await;
}

#[tokio::test]
async fn revocation_survives_restart() {
    let b = Broker::start().await;
    let t = b.user("carol").await;
    let (s, _) = b.post("/api/logout", json!({}), Some(&t)).await;
    assert_eq!(s, 200);
    let dir = b.srv.dir.path().to_path_buf();
    // Restart on the same data dir.
    b.srv.stop.cancel();
    let b2 = Broker::start_with(|c| c.store.data = dir.clone()).await;
    assert_eq!(
        b2.try_connect(&t, Encoding::Json).await.err().map(|e| e.0),
        Some(401)
    );
    let t2 = b2.user("carol").await; // login again works
    assert!(b2.try_connect(&t2, Encoding::Json).await.is_ok());
    drop(b);
}

#[tokio::test]
async fn every_bad_token_kind_is_401_before_upgrade() {
    let b = Broker::start().await;
    let ok = b.user("dave").await;
    let n = now();
    let cases = vec![
        ("missing", String::new()),
        ("malformed", "not.a.jwt".to_string()),
        (
            "expired",
            mint(
                json!({"sub": "dave", "exp": n - 3600, "jti": "e"}),
                Algorithm::HS256,
                SECRET.as_bytes(),
            ),
        ),
        (
            "not yet valid",
            mint(
                json!({"sub": "dave", "exp": n + 3600, "nbf": n + 1800, "jti": "n"}),
                Algorithm::HS256,
                SECRET.as_bytes(),
            ),
        ),
        (
            "invalid signature",
            mint(
                json!({"sub": "dave", "exp": n + 3600, "jti": "f"}),
                Algorithm::HS256,
                b"some other secret entirely, 32+ bytes",
            ),
        ),
        (
            "algorithm not accepted",
            mint(
                json!({"sub": "dave", "exp": n + 3600, "jti": "a"}),
                Algorithm::HS512,
                SECRET.as_bytes(),
            ),
        ),
        (
            "malformed",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJkYXZlIiwiZXhwIjo5OTk5OTk5OTk5fQ."
                .to_string(),
        ),
        (
            "malformed",
            mint(
                json!({"sub": "dave", "jti": "x"}),
                Algorithm::HS256,
                SECRET.as_bytes(),
            ),
        ),
        (
            "invalid subject",
            mint(
                json!({"sub": "da ve", "exp": n + 3600}),
                Algorithm::HS256,
                SECRET.as_bytes(),
            ),
        ),
    ];
    for (want, token) in cases {
        let err = b
            .try_connect(&token, Encoding::Json)
            .await
            .err()
            .unwrap_or_else(|| panic!("{want}: accepted"));
        assert_eq!(err.0, 401, "{want}");
        let v: serde_json::Value = serde_json::from_str(&err.1).expect("json error body");
        assert_eq!(v["error"], "unauthorized");
        let msg = v["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(want), "{want}: {msg}");
    }
    // Token in the query string works too.
    let resp = b
        .http
        .get(b.url(&format!("/ws?token={ok}")))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 101);
    // Not an upgrade: 400 JSON.
    let (s, v) = b.get("/ws", Some(&ok)).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
    // Unknown subprotocol: 400.
    let resp = b
        .http
        .get(b.url("/ws"))
        .bearer_auth(&ok)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Protocol", "mqtt")
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn token_expiry_closes_live_connection_with_4001() {
    let b = Broker::start().await;
    let t = mint(
        json!({"sub": "erin", "exp": now() + 2, "jti": "short"}),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );
    let mut c = b.connect(&t, Encoding::Json).await;
    assert_eq!(
        c.closed().await,
        End::Closed(Some(CloseCode::TokenExpired.as_u16()))
    );
}

#[tokio::test]
async fn origin_allow_list_and_connection_limit() {
    let b = Broker::start_with(|c| {
        c.auth.allowed_origins = vec!["https://chat.example".into()];
        c.conn.max_connections = 1;
    })
    .await;
    let t = b.user("frank").await;
    let ws = |origin: &'static str| {
        b.http
            .get(b.url("/ws"))
            .bearer_auth(&t)
            .header("Origin", origin)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
    };
    assert_eq!(
        ws("https://evil.example")
            .await
            .expect("http")
            .status()
            .as_u16(),
        403
    );
    let _c = b.connect(&t, Encoding::Json).await;
    let err = b
        .try_connect(&t, Encoding::Json)
        .await
        .err()
        .expect("over capacity");
    assert_eq!(err.0, 503);
    assert!(b.metrics().await.contains("result=\"over_capacity\"} 1"));
}

#[tokio::test]
async fn web_client_is_served_with_a_strict_policy_and_no_filesystem_paths() {
    let b = Broker::start().await;
    for (path, ctype) in [
        ("/", "text/html"),
        ("/index.html", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = b.http.get(b.url(path)).send().await.expect("http");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .expect("str")
            .starts_with(ctype));
        let csp = r.headers()["content-security-policy"]
            .to_str()
            .expect("str");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    let page = b
        .http
        .get(b.url("/"))
        .send()
        .await
        .expect("http")
        .text()
        .await
        .expect("text");
    assert!(page.contains("role=\"log\"") && page.contains("aria-live"));
    for path in [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/app.js",
        "/app.js/../../Cargo.toml",
        "/.env",
    ] {
        let (s, v) = b.get(path, None).await;
        assert_eq!((s, v["error"].as_str()), (404, Some("not_found")), "{path}");
    }
}
