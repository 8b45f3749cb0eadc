//! WebSocket client for the load generator: fastwebsockets over hyper's
//! client handshake, optionally bound to a chosen local source address so
//! one run can open more sockets than one address's ephemeral ports allow.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use fastwebsockets::{handshake, OpCode, WebSocket};
use http_body_util::Empty;
use hyper::{header, upgrade::Upgraded, Request};
use hyper_util::rt::TokioIo;
use shoal_proto::{Encoding, ServerFrame};

/// A connected client socket.
pub type Ws = WebSocket<TokioIo<Upgraded>>;

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// Why a connection attempt failed; the label is used in reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed (refused, unreachable, out of ports/files).
    #[error("tcp: {0}")]
    Tcp(String),
    /// The server answered the upgrade with an HTTP status.
    #[error("http {0}")]
    Status(u16),
    /// Handshake or first frame failed otherwise.
    #[error("handshake: {0}")]
    Handshake(String),
    /// No answer in time.
    #[error("timeout")]
    Timeout,
}

impl ConnectError {
    /// Short label for grouping failures.
    pub fn label(&self) -> String {
        self.to_string()
    }
}

/// `host:port` of a base URL like `http://127.0.0.1:8080` or `ws://h:p/`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Local source address number `i` of `n` (127.0.0.1, 127.0.0.2, ...).
pub fn source_ip(i: usize, n: u8) -> Option<IpAddr> {
    if n <= 1 {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i % n as usize) as u8,
    )))
}

/// Mint an HS256 token for a synthetic user.
pub fn mint_token(secret: &[u8], user: &str, ttl_secs: u64) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({"sub": user, "exp": now + ttl_secs, "iat": now, "jti": uuid::Uuid::new_v4().simple().to_string()});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )?)
}

/// Open a WebSocket to `url`'s `/ws` and wait for `hello`.
pub async fn connect(
    url: &str,
    token: &str,
    enc: Encoding,
    source: Option<IpAddr>,
) -> Result<Ws, ConnectError> {
    let auth = format!("Bearer {token}");
    let headers = [
        ("Sec-WebSocket-Protocol", enc.subprotocol()),
        ("Authorization", auth.as_str()),
    ];
    let mut ws = open(url, "/ws", &headers, source).await?;
    match read_frame(&mut ws, enc).await {
        Ok(Some(ServerFrame::Hello { .. })) => Ok(ws),
        Ok(other) => Err(ConnectError::Handshake(format!(
            "expected hello, got {other:?}"
        ))),
        Err(e) => Err(ConnectError::Handshake(e)),
    }
}

/// Open a WebSocket to `path` on `url`'s host with extra request headers,
/// from `source` when given.
pub async fn open(
    url: &str,
    path: &str,
    headers: &[(&str, &str)],
    source: Option<IpAddr>,
) -> Result<Ws, ConnectError> {
    let hp = host_port(url);
    let addr: SocketAddr = tokio::net::lookup_host(&hp)
        .await
        .map_err(|e| ConnectError::Tcp(e.to_string()))?
        .next()
        .ok_or_else(|| ConnectError::Tcp("no address".into()))?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| ConnectError::Tcp(e.kind().to_string()))?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| ConnectError::Tcp(e.kind().to_string()))?;
    }
    let stream = sock
        .connect(addr)
        .await
        .map_err(|e| ConnectError::Tcp(e.kind().to_string()))?;
    let _ = stream.set_nodelay(true);
    let mut req = Request::builder()
        .method("GET")
        // Origin-form request target: servers that route on the raw
        // request line (Node's engine.io) do not parse absolute-form.
        .uri(path)
        .header(header::HOST, hp.as_str())
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", handshake::generate_key())
        .header("Sec-WebSocket-Version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let (mut ws, _) = handshake::client(&SpawnExecutor, req, stream)
        .await
        .map_err(|e| match e {
            fastwebsockets::WebSocketError::InvalidStatusCode(s) => ConnectError::Status(s),
            e => ConnectError::Handshake(e.to_string()),
        })?;
    ws.set_auto_pong(true);
    ws.set_max_message_size(64 << 20);
    Ok(ws)
}

/// Read the next data frame and decode it; `Ok(None)` when the server closed.
pub async fn read_frame(ws: &mut Ws, enc: Encoding) -> Result<Option<ServerFrame>, String> {
    loop {
        let f = ws.read_frame().await.map_err(|e| e.to_string())?;
        match f.opcode {
            OpCode::Text | OpCode::Binary => {
                return enc
                    .decode_server(&f.payload)
                    .map(Some)
                    .map_err(|e| e.to_string());
            }
            OpCode::Close => return Ok(None),
            _ => continue,
        }
    }
}

/// Encode and send one client frame.
pub async fn send(ws: &mut Ws, enc: Encoding, f: &shoal_proto::ClientFrame) -> Result<(), String> {
    let bytes = enc.encode_client(f).map_err(|e| e.to_string())?;
    ws.write_frame(data_frame(enc, bytes))
        .await
        .map_err(|e| e.to_string())
}

/// A data frame of the encoding's message type.
pub fn data_frame(enc: Encoding, bytes: Vec<u8>) -> fastwebsockets::Frame<'static> {
    let payload = fastwebsockets::Payload::Owned(bytes);
    if enc.is_binary() {
        fastwebsockets::Frame::binary(payload)
    } else {
        fastwebsockets::Frame::text(payload)
    }
}

/// Unix time in nanoseconds (the clock stamped into payloads).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_sources() {
        assert_eq!(host_port("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host_port("ws://h:1/ws"), "h:1");
        assert_eq!(host_port("h:2"), "h:2");
        assert_eq!(source_ip(0, 1), None);
        assert_eq!(
            source_ip(5, 4),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
    }
}
