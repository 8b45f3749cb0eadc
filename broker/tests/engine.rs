//! The connection engine's read path against a real broker and raw
//! sockets: bytes that arrive with the handshake, frames split across
//! many reads, and many frames in one read are all read whole and in
//! order.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

mod common;
use common::*;

fn ping(id: u64) -> Vec<u8> {
    client_frame(
        0x81,
        format!(r#"{{"t":"ping","id":{id}}}"#).as_bytes(),
        true,
    )
}

/// The next server frame's JSON.
async fn next_json(r: &mut Raw) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (_, payload) = r.next_frame(deadline).await.expect("a frame in time");
    serde_json::from_slice(&payload).expect("json frame")
}

/// Skip server frames until a pong; its id.
async fn pong(r: &mut Raw) -> u64 {
    loop {
        let v = next_json(r).await;
        if v["t"] == "pong" {
            return v["id"].as_u64().expect("pong id");
        }
    }
}

#[tokio::test]
async fn a_frame_sent_with_the_handshake_is_not_lost() {
    let b = Broker::start().await;
    // Request and first frame in one write: hyper reads both, and the
    // frame must reach the connection as its first bytes.
    let mut r = Raw::connect_with(&b, &token_for("early"), "shoal.v1.json", &ping(7)).await;
    assert_eq!(next_json(&mut r).await["t"], "hello");
    assert_eq!(pong(&mut r).await, 7);
    bystander_served(&b).await;
}

#[tokio::test]
async fn frames_split_across_reads_and_many_in_one_read_arrive_whole_in_order() {
    let b = Broker::start_with(|c| {
        c.conn.rate_limit = 10_000.0;
        c.conn.rate_burst = 10_000.0;
    })
    .await;
    let mut r = Raw::connect(&b, &token_for("split"), "shoal.v1.json").await;
    r.s.set_nodelay(true).expect("nodelay");
    let s = &mut r.s;
    // One frame a byte at a time (each byte its own segment and read).
    for byte in ping(1) {
        s.write_all(&[byte]).await.expect("byte");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A 2 KB frame in three writes, then 200 frames in one write.
    let big = client_frame(
        0x81,
        format!(r#"{{"t":"ping","id":2,"pad":"{}"}}"#, "x".repeat(2000)).as_bytes(),
        true,
    );
    for part in big.chunks(700) {
        s.write_all(part).await.expect("part");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst: Vec<u8> = (3..203).flat_map(ping).collect();
    s.write_all(&burst).await.expect("burst");
    assert_eq!(next_json(&mut r).await["t"], "hello");
    for id in 1..203 {
        assert_eq!(pong(&mut r).await, id, "pongs in order");
    }
    bystander_served(&b).await;
}
