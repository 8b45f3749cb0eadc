//! Test harness: a real broker on 127.0.0.1:0 in a temp dir, real HTTP and
//! WebSocket clients (reqwest, tokio-tungstenite: an independent WebSocket
//! implementation).
#![allow(dead_code, missing_docs, unused_imports)]

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

mod broker;
mod client;
mod nginx;
mod partition;
mod postgres;
mod redis;
mod sio;

pub use broker::*;
pub use client::*;
pub use nginx::*;
pub use partition::*;
pub use postgres::*;
pub use redis::*;
pub use sio::*;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// The check after every hostile input: a bystander joins a room,
/// publishes and is acked.
pub async fn bystander_served(e: &impl Endpoint) {
    let mut c = e.connect(&token_for("bystander"), Encoding::Json).await;
    c.join("calm").await;
    assert!(matches!(
        c.publish("calm", json!("still here")).await,
        ServerFrame::Ack { .. }
    ));
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

/// A token for `user` signed with the shared test secret (every node of a
/// test cluster accepts it).
pub fn token_for(user: &str) -> String {
    mint(
        json!({"sub": user, "exp": now() + 3600, "jti": format!("j-{user}")}),
        jsonwebtoken::Algorithm::HS256,
        SECRET.as_bytes(),
    )
}

pub use shoal_broker::testing::free_port;
