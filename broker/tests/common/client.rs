//! WebSocket clients: `Client` (tokio-tungstenite, an independent
//! implementation) and `Raw`, which writes raw frames (any opcode, RSV
//! bits, mask or none).

use super::*;

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub enc: Encoding,
    pub next_id: u64,
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
            reply_to: None,
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
            reply_to: None,
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

/// A WebSocket client that writes raw frames (any opcode, RSV bits, mask
/// or none) after a hand-written upgrade, and reads server frames.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

/// The HTTP request that upgrades to a WebSocket on `/ws`.
pub fn upgrade_request(addr: SocketAddr, token: &str, proto: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {proto}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

/// One client frame's bytes. `first` is the whole first byte (FIN, RSV,
/// opcode); `masked` applies a fixed masking key.
pub fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
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
    f
}

impl Raw {
    pub async fn connect(b: &impl Endpoint, token: &str, proto: &str) -> Raw {
        Self::connect_with(b, token, proto, &[]).await
    }

    /// Like [`Raw::connect`], with `first` written in the same write as
    /// the upgrade request.
    pub async fn connect_with(b: &impl Endpoint, token: &str, proto: &str, first: &[u8]) -> Raw {
        let mut s = TcpStream::connect(b.addr()).await.expect("tcp");
        let mut req = upgrade_request(b.addr(), token, proto).into_bytes();
        req.extend_from_slice(first);
        s.write_all(&req).await.expect("write");
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

    /// Write one frame (see [`client_frame`]).
    pub async fn frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let _ = self
            .s
            .write_all(&client_frame(first, payload, masked))
            .await;
    }

    /// The next server frame (opcode, payload), or None on EOF or when
    /// nothing complete arrives before `deadline`.
    pub async fn next_frame(&mut self, deadline: tokio::time::Instant) -> Option<(u8, Vec<u8>)> {
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
                    return Some((op, payload));
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

    /// Read server frames until a close frame (its code) or EOF (None).
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (op, payload) = self.next_frame(deadline).await?;
            if op == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }
}
