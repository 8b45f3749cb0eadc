//! The protocols loadgen speaks, so that the same scenario, schedule and
//! measurement run against Shoal and against the servers users compare it
//! with: Socket.IO v4 (Engine.IO v4 over WebSocket only) and Pusher
//! (protocol 7, as sockudo serves it).
//!
//! Each protocol answers four questions: how to connect, how to join a
//! room, how to publish message `k` with a body, and what an incoming
//! frame means. Shoal frames go through `shoal_proto` (loadgen never
//! calls a serializer for them); the other two are JSON text protocols.
//!
//! Shoal numbers messages per room (`seq`); Socket.IO and Pusher do not,
//! so every body carries its publisher (`p`) and that publisher's message
//! number (`n`), and loss is counted per publisher.

use std::net::IpAddr;

use fastwebsockets::{Frame, OpCode, Payload};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use shoal_proto::{ClientFrame, Encoding, ServerFrame};

use crate::client::{self, ConnectError, Ws};

/// Which server protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Shoal's own protocol (`/ws`, JWT, MessagePack or JSON frames).
    Shoal,
    /// Socket.IO v4 over WebSocket: events `join` (room, ack), `pub`
    /// (room, body, ack) and `msg` (room, body) from the server.
    Socketio,
    /// Pusher protocol 7: private channels authorised with the app secret,
    /// `client-msg` events forwarded to the other subscribers.
    Pusher,
}

/// A Pusher application's credentials (loopback test servers only).
#[derive(Debug, Clone)]
pub struct PusherApp {
    /// Application key (in the connection path).
    pub key: String,
    /// Application secret (signs channel subscriptions).
    pub secret: String,
}

/// Per-connection state learned at connect time.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Pusher's socket id (part of the signed subscription string).
    pub socket_id: Option<String>,
}

/// The stamps loadgen's publishers put in every body (`{"s", "p", "n",
/// "x"}`); the padding `x` is skipped, not decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Stamp {
    /// Intended send time, ns since the Unix epoch.
    pub s: Option<u64>,
    /// Publisher id.
    pub p: Option<u64>,
    /// The publisher's message number.
    pub n: Option<u64>,
}

impl Stamp {
    /// The stamps of a body decoded some other way.
    pub fn of(v: &Value) -> Stamp {
        Stamp {
            s: v.get("s").and_then(Value::as_u64),
            p: v.get("p").and_then(Value::as_u64),
            n: v.get("n").and_then(Value::as_u64),
        }
    }
}

/// What a received frame means to a scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A room message: its room seq where the protocol has one, and the
    /// publisher's stamps from its body.
    Msg {
        /// Room sequence number (Shoal only).
        seq: Option<u64>,
        /// The stamps of the body the publisher sent.
        body: Stamp,
    },
    /// The server accepted publish `id` (Shoal, Socket.IO).
    Ack {
        /// The publish's request id.
        id: u64,
        /// The room seq it was given (Shoal only).
        seq: Option<u64>,
    },
    /// The server refused something (its error code).
    Error(u16),
    /// A protocol-level ping to answer with this text frame.
    Reply(Vec<u8>),
    /// Anything else (presence, hello, pongs).
    Other,
    /// Bytes that did not parse.
    Undecodable,
}

/// One protocol with what it needs to sign in.
#[derive(Debug, Clone)]
pub struct Wire {
    /// The protocol.
    pub protocol: Protocol,
    /// Shoal's encoding (others are JSON text).
    pub enc: Encoding,
    shoal_secret: Option<Vec<u8>>,
    pusher: Option<PusherApp>,
}

impl Wire {
    /// Shoal, signing tokens with `secret`.
    pub fn shoal(enc: Encoding, secret: Vec<u8>) -> Wire {
        Wire {
            protocol: Protocol::Shoal,
            enc,
            shoal_secret: Some(secret),
            pusher: None,
        }
    }

    /// Socket.IO. With a secret, each client puts a token signed with it
    /// in its CONNECT (Shoal's own `/socket.io/` endpoint needs one; the
    /// Node peer ignores it).
    pub fn socketio(secret: Option<Vec<u8>>) -> Wire {
        Wire {
            protocol: Protocol::Socketio,
            enc: Encoding::Json,
            shoal_secret: secret,
            pusher: None,
        }
    }

    /// Pusher with the given app.
    pub fn pusher(app: PusherApp) -> Wire {
        Wire {
            protocol: Protocol::Pusher,
            enc: Encoding::Json,
            shoal_secret: None,
            pusher: Some(app),
        }
    }

    /// Whether a publisher receives its own messages (Pusher client events
    /// go to the *other* subscribers only).
    pub fn echoes_sender(&self) -> bool {
        self.protocol != Protocol::Pusher
    }

    /// Whether messages carry a per-room sequence number (Shoal).
    pub fn has_room_seq(&self) -> bool {
        self.protocol == Protocol::Shoal
    }

    /// Whether publishes are acknowledged (Pusher client events are not;
    /// a sent message counts as accepted).
    pub fn has_acks(&self) -> bool {
        self.protocol != Protocol::Pusher
    }

    /// The channel name for room `room` (Pusher client events need a
    /// private channel).
    pub fn room_name(&self, room: &str) -> String {
        match self.protocol {
            Protocol::Pusher => format!("private-{room}"),
            _ => room.to_string(),
        }
    }

    /// Connect as `user` and complete the protocol's opening exchange.
    pub async fn connect(
        &self,
        url: &str,
        user: &str,
        source: Option<IpAddr>,
    ) -> Result<(Ws, Session), ConnectError> {
        match self.protocol {
            Protocol::Shoal => {
                let secret = self.shoal_secret.as_deref().unwrap_or_default();
                let token = client::mint_token(secret, user, 3600)
                    .map_err(|e| ConnectError::Handshake(e.to_string()))?;
                let ws = client::connect(url, &token, self.enc, source).await?;
                Ok((ws, Session::default()))
            }
            Protocol::Socketio => {
                let mut ws =
                    client::open(url, "/socket.io/?EIO=4&transport=websocket", &[], source).await?;
                // Engine.IO open packet, then the Socket.IO namespace connect.
                self.expect_text(&mut ws, |t| t.starts_with('0')).await?;
                let connect = match &self.shoal_secret {
                    Some(secret) => {
                        let token = client::mint_token(secret, user, 3600)
                            .map_err(|e| ConnectError::Handshake(e.to_string()))?;
                        format!("40{}", json!({ "token": token }))
                    }
                    None => "40".to_string(),
                };
                write_text(&mut ws, connect.into_bytes()).await?;
                self.expect_text(&mut ws, |t| t.starts_with("40")).await?;
                Ok((ws, Session::default()))
            }
            Protocol::Pusher => {
                let key = self.pusher.as_ref().map_or("", |p| p.key.as_str());
                let path = format!("/app/{key}?protocol=7&client=shoal-loadgen&version=0.1");
                let mut ws = client::open(url, &path, &[], source).await?;
                let t = self
                    .expect_text(&mut ws, |t| t.contains("pusher:connection_established"))
                    .await?;
                let v: Value =
                    serde_json::from_str(&t).map_err(|e| ConnectError::Handshake(e.to_string()))?;
                // `data` is a JSON document inside a string.
                let data: Value = v["data"]
                    .as_str()
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_else(|| v["data"].clone());
                let socket_id = data["socket_id"]
                    .as_str()
                    .ok_or_else(|| ConnectError::Handshake("no socket_id".into()))?
                    .to_string();
                Ok((
                    ws,
                    Session {
                        socket_id: Some(socket_id),
                    },
                ))
            }
        }
    }

    /// Join `room`; returns the room's seq at join time (0 where the
    /// protocol has none).
    pub async fn join(&self, ws: &mut Ws, s: &Session, room: &str) -> anyhow::Result<u64> {
        match self.protocol {
            Protocol::Shoal => {
                client::send(
                    ws,
                    self.enc,
                    &ClientFrame::Join {
                        id: Some(1),
                        room: room.into(),
                        since: None,
                    },
                )
                .await
                .map_err(anyhow::Error::msg)?;
                loop {
                    match client::read_frame(ws, self.enc)
                        .await
                        .map_err(anyhow::Error::msg)?
                    {
                        Some(ServerFrame::Joined { seq, .. }) => return Ok(seq),
                        Some(ServerFrame::Error { code, message, .. }) => {
                            anyhow::bail!("join {room}: {code} {message}")
                        }
                        Some(_) => continue,
                        None => anyhow::bail!("closed during join"),
                    }
                }
            }
            Protocol::Socketio => {
                let pkt = format!("420{}", json!(["join", room]));
                write_text(ws, pkt.into_bytes()).await?;
                self.expect_text(ws, |t| t.starts_with("430")).await?;
                Ok(0)
            }
            Protocol::Pusher => {
                let channel = self.room_name(room);
                let socket_id = s.socket_id.as_deref().unwrap_or_default();
                let app = self
                    .pusher
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("no Pusher app"))?;
                let auth = pusher_auth(app, socket_id, &channel);
                let pkt = json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}});
                write_text(ws, pkt.to_string().into_bytes()).await?;
                let t = self
                    .expect_text(ws, |t| {
                        t.contains("subscription_succeeded") || t.contains("pusher:error")
                    })
                    .await?;
                anyhow::ensure!(!t.contains("pusher:error"), "subscribe {channel}: {t}");
                Ok(0)
            }
        }
    }

    /// The frame that publishes message `k` with `body` to `room`.
    pub fn publish(&self, room: &str, k: u64, body: Value) -> anyhow::Result<Frame<'static>> {
        let bytes = match self.protocol {
            Protocol::Shoal => {
                let f = ClientFrame::Pub {
                    id: Some(k),
                    room: Some(room.to_string()),
                    to: None,
                    cid: None,
                    body,
                    reply_to: None,
                };
                return Ok(client::data_frame(self.enc, self.enc.encode_client(&f)?));
            }
            Protocol::Socketio => format!("42{k}{}", json!(["pub", room, body])).into_bytes(),
            Protocol::Pusher => {
                json!({"event": "client-msg", "channel": self.room_name(room), "data": body})
                    .to_string()
                    .into_bytes()
            }
        };
        Ok(Frame::text(Payload::Owned(bytes)))
    }

    /// Whether the protocol has room-log events (edits, reactions).
    pub fn has_events(&self) -> bool {
        self.protocol == Protocol::Shoal
    }

    /// An edit of message `seq` as request `k` (Shoal only).
    pub fn edit(
        &self,
        room: &str,
        k: u64,
        seq: u64,
        body: Value,
    ) -> anyhow::Result<Frame<'static>> {
        anyhow::ensure!(self.has_events(), "edits need the Shoal protocol");
        let f = ClientFrame::Edit {
            id: Some(k),
            room: room.to_string(),
            seq,
            body,
        };
        Ok(client::data_frame(self.enc, self.enc.encode_client(&f)?))
    }

    /// A reaction added (`on`) or removed on message `seq` as request `k`
    /// (Shoal only).
    pub fn react(&self, room: &str, k: u64, seq: u64, on: bool) -> anyhow::Result<Frame<'static>> {
        anyhow::ensure!(self.has_events(), "reactions need the Shoal protocol");
        let f = ClientFrame::React {
            id: Some(k),
            room: room.to_string(),
            seq,
            emoji: "👍".into(),
            on,
        };
        Ok(client::data_frame(self.enc, self.enc.encode_client(&f)?))
    }

    /// Interpret a received data frame.
    pub fn decode(&self, payload: &[u8]) -> Incoming {
        match self.protocol {
            Protocol::Shoal => match self.enc.decode_msg_as::<Stamp>(payload) {
                // Deliveries are most frames: read only their seq and stamps.
                Ok(Some((seq, body))) => Incoming::Msg {
                    seq: Some(seq),
                    body,
                },
                _ => self.decode_shoal(payload),
            },
            Protocol::Socketio => decode_socketio(payload),
            Protocol::Pusher => decode_pusher(payload),
        }
    }

    fn decode_shoal(&self, payload: &[u8]) -> Incoming {
        match self.enc.decode_server(payload) {
            Ok(ServerFrame::Msg { seq, body, .. }) => Incoming::Msg {
                seq: Some(seq),
                body: Stamp::of(&body),
            },
            Ok(ServerFrame::Ack { id, seq, .. }) => Incoming::Ack {
                id: id.unwrap_or(0),
                seq: Some(seq),
            },
            Ok(ServerFrame::Error { code, .. }) => Incoming::Error(code),
            Ok(_) => Incoming::Other,
            Err(_) => Incoming::Undecodable,
        }
    }
}

fn decode_socketio(payload: &[u8]) -> Incoming {
    let Ok(t) = std::str::from_utf8(payload) else {
        return Incoming::Undecodable;
    };
    if t == "2" {
        return Incoming::Reply(b"3".to_vec()); // Engine.IO ping -> pong
    }
    if let Some(rest) = t.strip_prefix("42") {
        let Ok(Value::Array(a)) = serde_json::from_str::<Value>(rest) else {
            return Incoming::Undecodable;
        };
        if a.first().and_then(Value::as_str) == Some("msg") {
            // The Node peer emits msg(room, body); Shoal's endpoint emits
            // msg({room, seq, from, ts, body}). Completion is tracked per
            // publisher either way (the peer has no seqs).
            match a.len() {
                3 => {
                    return Incoming::Msg {
                        seq: None,
                        body: Stamp::of(&a[2]),
                    }
                }
                2 if a[1].get("seq").is_some() => {
                    return Incoming::Msg {
                        seq: None,
                        body: Stamp::of(&a[1]["body"]),
                    }
                }
                _ => {}
            }
        }
        return Incoming::Other;
    }
    if let Some(rest) = t.strip_prefix("43") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        return match rest[..digits].parse() {
            Ok(id) => Incoming::Ack { id, seq: None },
            Err(_) => Incoming::Undecodable,
        };
    }
    if t.starts_with("44") {
        return Incoming::Error(400); // Socket.IO CONNECT_ERROR
    }
    Incoming::Other
}

fn decode_pusher(payload: &[u8]) -> Incoming {
    let Ok(mut v) = serde_json::from_slice::<Value>(payload) else {
        return Incoming::Undecodable;
    };
    match v["event"].as_str() {
        Some("client-msg") => {
            let data = v["data"].take();
            // Some servers forward `data` re-encoded as a string.
            let body = match data {
                Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
                d => d,
            };
            Incoming::Msg {
                seq: None,
                body: Stamp::of(&body),
            }
        }
        Some("pusher:ping") => Incoming::Reply(br#"{"event":"pusher:pong","data":{}}"#.to_vec()),
        Some("pusher:error") => {
            let data = match v["data"].take() {
                Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::Null),
                d => d,
            };
            Incoming::Error(data["code"].as_u64().unwrap_or(0) as u16)
        }
        Some(_) => Incoming::Other,
        None => Incoming::Undecodable,
    }
}

/// `key:hex(HMAC-SHA256(secret, "socket_id:channel"))`, Pusher's private
/// channel signature.
pub fn pusher_auth(app: &PusherApp, socket_id: &str, channel: &str) -> String {
    let mut mac = <Hmac<sha2::Sha256>>::new_from_slice(app.secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("{socket_id}:{channel}").as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}:{sig}", app.key)
}

async fn write_text(ws: &mut Ws, bytes: Vec<u8>) -> Result<(), ConnectError> {
    ws.write_frame(Frame::text(Payload::Owned(bytes)))
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))
}

impl Wire {
    /// Read text frames until one passes `want` (answering the protocol's
    /// pings on the way); returns it.
    async fn expect_text(
        &self,
        ws: &mut Ws,
        want: impl Fn(&str) -> bool,
    ) -> Result<String, ConnectError> {
        loop {
            let f = ws
                .read_frame()
                .await
                .map_err(|e| ConnectError::Handshake(e.to_string()))?;
            match f.opcode {
                OpCode::Text => {
                    let t = String::from_utf8_lossy(&f.payload).into_owned();
                    if want(&t) {
                        return Ok(t);
                    }
                    if let Incoming::Reply(pong) = self.decode(t.as_bytes()) {
                        write_text(ws, pong).await?;
                    }
                }
                OpCode::Close => return Err(ConnectError::Handshake("closed".into())),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketio_packets() {
        let w = Wire::socketio(None);
        let f = w.publish("r", 7, json!({"n": 7})).expect("frame");
        assert_eq!(&*f.payload, br#"427["pub","r",{"n":7}]"#);
        assert_eq!(w.decode(b"2"), Incoming::Reply(b"3".to_vec()));
        assert_eq!(
            w.decode(br#"42["msg","r",{"n":1}]"#),
            Incoming::Msg {
                seq: None,
                body: Stamp {
                    n: Some(1),
                    ..Stamp::default()
                }
            }
        );
        // Shoal's endpoint: one object with the frame's fields.
        assert_eq!(
            w.decode(br#"42["msg",{"room":"r","seq":4,"from":"a","ts":1,"body":{"n":2}}]"#),
            Incoming::Msg {
                seq: None,
                body: Stamp {
                    n: Some(2),
                    ..Stamp::default()
                }
            }
        );
        assert_eq!(w.decode(b"4312[]"), Incoming::Ack { id: 12, seq: None });
        assert_eq!(w.decode(b"42[oops"), Incoming::Undecodable);
    }

    #[test]
    fn pusher_signature_and_events() {
        // The worked example of Pusher's channel authorisation docs.
        let app = PusherApp {
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        assert_eq!(
            pusher_auth(&app, "1234.1234", "private-foobar"),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let w = Wire::pusher(app);
        assert_eq!(
            w.decode(br#"{"event":"client-msg","channel":"private-r","data":"{\"n\":2}"}"#),
            Incoming::Msg {
                seq: None,
                body: Stamp {
                    n: Some(2),
                    ..Stamp::default()
                }
            }
        );
        assert_eq!(
            w.decode(br#"{"event":"pusher:error","data":{"code":4301,"message":"x"}}"#),
            Incoming::Error(4301)
        );
        assert!(matches!(
            w.decode(br#"{"event":"pusher:ping","data":{}}"#),
            Incoming::Reply(_)
        ));
    }
}
