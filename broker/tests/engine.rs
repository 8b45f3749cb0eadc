//! The connection engine's read path against a real broker and raw
//! sockets: bytes that arrive with the handshake, frames split across
//! many reads, and many frames in one read are all read whole and in
//! order.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

mod common;
use common::*;

/// A masked client text frame.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

fn ping(id: u64) -> Vec<u8> {
    masked_text(format!(r#"{{"t":"ping","id":{id}}}"#).as_bytes())
}

fn upgrade_request(addr: std::net::SocketAddr, token: &str) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: shoal.v1.json\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes()
}

/// Reads the 101 response, then server text frames (unmasked, JSON).
struct Reader {
    s: TcpStream,
    buf: Vec<u8>,
    upgraded: bool,
}

impl Reader {
    async fn fill(&mut self) {
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut tmp))
            .await
            .expect("server answers in time")
            .expect("read");
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&tmp[..n]);
    }

    /// The next server frame's JSON.
    async fn next(&mut self) -> serde_json::Value {
        while !self.upgraded {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(self.buf.starts_with(b"HTTP/1.1 101"));
                self.buf.drain(..i + 4);
                self.upgraded = true;
            } else {
                self.fill().await;
            }
        }
        loop {
            if self.buf.len() >= 2 {
                let (len, off) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    126 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let v = serde_json::from_slice(&self.buf[off..off + len]).expect("json frame");
                    self.buf.drain(..off + len);
                    return v;
                }
            }
            self.fill().await;
        }
    }

    /// Skip frames until a pong; its id.
    async fn pong(&mut self) -> u64 {
        loop {
            let v = self.next().await;
            if v["t"] == "pong" {
                return v["id"].as_u64().expect("pong id");
            }
        }
    }
}

#[tokio::test]
async fn a_frame_sent_with_the_handshake_is_not_lost() {
    let b = Broker::start().await;
    let mut s = TcpStream::connect(b.addr).await.expect("tcp");
    // Request and first frame in one write: hyper reads both, and the
    // frame must reach the connection as its first bytes.
    let mut bytes = upgrade_request(b.addr, &token_for("early"));
    bytes.extend(ping(7));
    s.write_all(&bytes).await.expect("write");
    let mut r = Reader {
        s,
        buf: vec![],
        upgraded: false,
    };
    assert_eq!(r.next().await["t"], "hello");
    assert_eq!(r.pong().await, 7);
    bystander_served(&b).await;
}

#[tokio::test]
async fn frames_split_across_reads_and_many_in_one_read_arrive_whole_in_order() {
    let b = Broker::start_with(|c| {
        c.conn.rate_limit = 10_000.0;
        c.conn.rate_burst = 10_000.0;
    })
    .await;
    let mut s = TcpStream::connect(b.addr).await.expect("tcp");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&upgrade_request(b.addr, &token_for("split")))
        .await
        .expect("write");
    // One frame a byte at a time (each byte its own segment and read).
    for byte in ping(1) {
        s.write_all(&[byte]).await.expect("byte");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A large frame (over one read of a small socket buffer is not
    // needed: 2 KB split in three writes) then 200 frames in one write.
    let big =
        masked_text(format!(r#"{{"t":"ping","id":2,"pad":"{}"}}"#, "x".repeat(2000)).as_bytes());
    for part in big.chunks(700) {
        s.write_all(part).await.expect("part");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst: Vec<u8> = (3..203).flat_map(ping).collect();
    s.write_all(&burst).await.expect("burst");
    let mut r = Reader {
        s,
        buf: vec![],
        upgraded: false,
    };
    assert_eq!(r.next().await["t"], "hello");
    for id in 1..203 {
        assert_eq!(r.pong().await, id, "pongs in order");
    }
    bystander_served(&b).await;
}
