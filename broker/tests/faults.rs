//! Fault tests against a real broker on loopback: a reconnection storm of
//! 5,000 clients admitted through the handshake rate limit (4005 tells the
//! excess to back off) and recovering every message with `since`; a disk
//! that really fills up (a small tmpfs) under a broker process.

mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use rand::Rng;
use serde_json::json;
use shoal_proto::{CloseCode, Encoding, ErrorCode, ServerFrame};
use tokio::sync::watch;

const CLIENTS: usize = 5000;
const ROOMS: usize = 50;

/// Connect, retrying with jittered exponential backoff when the broker
/// says 4005 (or refuses): what a well-behaved client does.
async fn connect_with_backoff(b: &Broker, token: &str, throttled: &AtomicU64) -> Client {
    let mut delay = 100u64;
    for _ in 0..30 {
        if let Ok(mut c) = b.try_connect_raw(token, Encoding::MsgPack).await {
            match c.try_recv(Duration::from_secs(10)).await {
                Ok(ServerFrame::Hello { .. }) => return c,
                Err(End::Closed(Some(code))) if code == CloseCode::TryAgainLater.as_u16() => {
                    throttled.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("unexpected first frame: {other:?}"),
            }
        }
        let jitter = rand::rng().random_range(delay / 2..=delay);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        delay = (delay * 2).min(3000);
    }
    panic!("could not reconnect after 30 tries");
}

/// Join (with `since` when given); the joined seq and the replayed seqs.
async fn join(c: &mut Client, room: &str, since: Option<u64>) -> (u64, Vec<u64>) {
    let (before, seq) = c.join_since(room, since).await;
    (seq, before.iter().filter_map(msg_seq).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_storm_is_admitted_and_recovers_with_since() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let b = Arc::new(
        Broker::start_with(|c| {
            c.conn.handshake_rate = 800.0;
            c.auth.api_key = Some("storm-key-0123456789abc".into());
            c.conn.max_rooms_per_connection = 4;
        })
        .await,
    );
    let throttled = Arc::new(AtomicU64::new(0));
    let (drop_tx, drop_rx) = watch::channel(false);
    let (final_tx, final_rx) = watch::channel(Vec::<u64>::new());
    let done = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let b = b.clone();
        let throttled = throttled.clone();
        let done = done.clone();
        let mut drop_rx = drop_rx.clone();
        let mut final_rx = final_rx.clone();
        tasks.push(tokio::spawn(async move {
            let token = mint(
                json!({"sub": format!("s{i}"), "exp": now() + 3600, "jti": format!("j{i}")}),
                jsonwebtoken::Algorithm::HS256,
                SECRET.as_bytes(),
            );
            let room = format!("storm{}", i % ROOMS);
            let mut c = connect_with_backoff(&b, &token, &throttled).await;
            let (mut last, _) = join(&mut c, &room, None).await;
            let first = last;
            let mut reconnected = false;
            loop {
                // Read until told to drop, then until the final seq is known
                // and reached.
                let target = final_rx.borrow().get(i % ROOMS).copied();
                if reconnected && target.is_some_and(|t| last >= t) {
                    break;
                }
                tokio::select! {
                    _ = drop_rx.changed(), if !reconnected => {
                        drop(c);
                        // Everyone reconnects within 2 s, with jitter.
                        let jitter = rand::rng().random_range(0..2000);
                        tokio::time::sleep(Duration::from_millis(jitter)).await;
                        c = connect_with_backoff(&b, &token, &throttled).await;
                        let (_, replayed) = join(&mut c, &room, Some(last)).await;
                        for s in replayed {
                            assert_eq!(s, last + 1, "client {i}: gap or duplicate in replay");
                            last = s;
                        }
                        reconnected = true;
                    }
                    _ = final_rx.changed() => {}
                    f = c.try_recv(Duration::from_secs(30)) => match f {
                        Ok(ServerFrame::Msg { seq, .. }) => {
                            assert_eq!(seq, last + 1, "client {i}: gap or duplicate");
                            last = seq;
                        }
                        Ok(_) => {}
                        Err(e) => panic!("client {i}: {e:?}"),
                    },
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            (first, last)
        }));
    }

    // Wait for everyone to be in, while publishing into every room.
    let http = reqwest::Client::new();
    let publish = |room: usize| {
        let http = http.clone();
        let url = b.url("/api/publish");
        async move {
            let r = http
                .post(url)
                .bearer_auth("storm-key-0123456789abc")
                .json(&json!({"room": format!("storm{room}"), "body": "tick"}))
                .send()
                .await
                .expect("publish");
            assert_eq!(r.status().as_u16(), 201);
            r.json::<serde_json::Value>().await.expect("json")["seq"]
                .as_u64()
                .expect("seq")
        }
    };
    // Generous: this checks that the storm settles without loss, not how
    // fast (loadgen measures that); a cold `make test` on 2 cores with the
    // disk busy flushing build output has taken over 2 minutes here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut last_seq = vec![0u64; ROOMS];
    let mut round = 0;
    while b.metric("shoal_room_members").await < CLIENTS as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients did not all join"
        );
        let r = round % ROOMS;
        last_seq[r] = publish(r).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everyone drops at once and reconnects with jitter, while publishing goes on.
    drop_tx.send(true).expect("signal");
    for _ in 0..150 {
        let r = round % ROOMS;
        last_seq[r] = publish(r).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    final_tx.send(last_seq.clone()).expect("final");
    let mut results = vec![];
    for t in tasks {
        results.push(
            tokio::time::timeout_at(deadline, t)
                .await
                .expect("storm did not settle in time")
                .expect("client task"),
        );
    }
    assert_eq!(done.load(Ordering::Relaxed), CLIENTS as u64);
    for (i, (first, last)) in results.iter().enumerate() {
        assert_eq!(
            *last,
            last_seq[i % ROOMS],
            "client {i} ends at the room's last seq"
        );
        assert!(first <= last);
    }
    let t = throttled.load(Ordering::Relaxed);
    assert!(t > 0, "the handshake rate limit never engaged");
    assert!(
        b.metric("shoal_handshakes_total{result=\"rate_limited\"")
            .await
            >= t as f64,
        "throttled handshakes are counted"
    );
    eprintln!("storm: {CLIENTS} clients, {t} handshakes told to back off (4005), all recovered");
}

/// A tmpfs of `mb` MiB mounted on a fresh temp dir (a disk that can
/// really fill up); unmounted when dropped. Needs root, as CI runs.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a {mb} MiB tmpfs failed: this test needs root");
        SmallDisk { dir }
    }

    /// Write zeros to `name` until the disk is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join(name)).expect("create filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_with_503_loses_nothing_acked_and_recovers() {
    let disk = SmallDisk::mount(32);
    let data = disk.dir.path().join("data");
    let mut p = Proc::start(&data, &[]).await;
    let token = p.user("alice").await;
    let bystander_token = p.user("bob").await;
    let mut alice = p.connect(&token, Encoding::MsgPack).await;
    let mut bob = p.connect(&bystander_token, Encoding::MsgPack).await;
    alice.join("disk").await;
    bob.join("disk").await;
    let body = "x".repeat(1000);
    let mut acked = vec![];
    for _ in 0..50 {
        match alice.publish("disk", json!(body)).await {
            ServerFrame::Ack { seq, .. } => acked.push(seq),
            f => panic!("{f:?}"),
        }
    }

    disk.fill("filler");
    // Publishes go on until the database needs a page the disk cannot
    // give (the WAL reuses what it already has); from then on, 503s.
    let mut refused = 0;
    for _ in 0..20_000 {
        match alice.publish("disk", json!(body)).await {
            ServerFrame::Ack { seq, .. } => acked.push(seq),
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, ErrorCode::Unavailable as u16);
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
            f => panic!("{f:?}"),
        }
    }
    assert_eq!(refused, 5, "the full disk never refused a publish");
    let (s, v) = p.get("/health", None).await;
    assert_eq!((s, v["store"].as_str()), (503, Some("down")), "{v}");
    assert!(p.metric("shoal_errors_total{code=\"unavailable\"").await >= 5.0);
    // The bystander is still served, and saw exactly the acked messages.
    let mut seen = vec![];
    while seen.len() < acked.len() {
        if let Some(s) = msg_seq(&bob.recv().await) {
            seen.push(s);
        }
    }
    assert_eq!(seen, acked);

    // Space comes back: publishing resumes with the next seq, no gap.
    std::fs::remove_file(disk.dir.path().join("filler")).expect("remove filler");
    let next = loop {
        match alice.publish("disk", json!("after")).await {
            ServerFrame::Ack { seq, .. } => break seq,
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, ErrorCode::Unavailable as u16);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            f => panic!("{f:?}"),
        }
    };
    assert_eq!(
        next,
        acked.len() as u64 + 1,
        "refused publishes left no seq behind"
    );
    acked.push(next);
    let (s, _) = p.get("/health", None).await;
    assert_eq!(s, 200);

    // Everything acked is on disk, even after kill -9.
    p.kill9();
    drop((alice, bob));
    let p = Proc::start(&data, &[]).await;
    assert_eq!(p.stored_seqs(&token, "disk").await, acked);
}
