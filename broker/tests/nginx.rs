//! Three broker processes on a real Redis bus behind a real nginx (the
//! template in `nginx/`) over `wss://`: sticky sessions, and a node killed
//! with -9 under load whose clients fail over and lose nothing.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use serde_json::json;
use shoal_proto::{Encoding, ServerFrame};

const ROOM: &str = "ops";
const N: u64 = 300;

async fn node(redis: &Redis, dir: &std::path::Path, id: &str) -> Proc {
    redis
        .node_proc(dir, &["--presence-lease-ms", "1000", "--node-id", id])
        .await
}

/// A subscriber that follows the room through failovers: on a lost
/// connection it reconnects through nginx with the same sid and rejoins
/// with `since` = the last seq it has. Returns every seq it saw, in order,
/// and the nodes it was served by.
async fn follow(ng: &Nginx, user: &str, sid: &str, first: Client) -> (Vec<u64>, Vec<String>) {
    let mut seen: Vec<u64> = vec![];
    let mut nodes = vec![];
    let mut c = first;
    loop {
        match c.try_recv(Duration::from_secs(15)).await {
            Ok(ServerFrame::Msg { seq, .. }) => {
                seen.push(seq);
                if seq >= N {
                    return (seen, nodes);
                }
            }
            Ok(_) => {}
            Err(End::Timeout) => panic!("{user}: stalled after {:?}", seen.last()),
            Err(_) => {
                // Connection lost: fail over.
                let mut attempt = 0;
                let (mut next, node) = loop {
                    attempt += 1;
                    match ng.connect(&token_for(user), sid, Encoding::MsgPack).await {
                        Ok(x) => break x,
                        Err(e) if attempt < 100 => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("{user}: cannot reconnect: {e}"),
                    }
                };
                nodes.push(node);
                let (replayed, _) = next.join_since(ROOM, seen.last().copied()).await;
                seen.extend(replayed.iter().filter_map(msg_seq));
                if seen.last().is_some_and(|s| *s >= N) {
                    return (seen, nodes);
                }
                c = next;
            }
        }
    }
}

#[tokio::test]
async fn sticky_wss_through_nginx_and_failover_after_kill_9_loses_nothing() {
    let redis = Redis::start().await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = vec![];
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(node(&redis, d.path(), &format!("n{i}")).await);
    }
    let ng = Nginx::start(&nodes.iter().map(|p| p.addr).collect::<Vec<_>>()).await;

    let (mut publisher, pub_node) = ng
        .connect(&token_for("pub"), "publisher", Encoding::MsgPack)
        .await
        .expect("publisher");
    // Sticky: the same sid lands on the same node every time.
    for _ in 0..3 {
        let (_, again) = ng
            .connect(&token_for("pub"), "publisher", Encoding::MsgPack)
            .await
            .expect("again");
        assert_eq!(again, pub_node);
    }
    let mut subs = vec![];
    let mut by_node: HashMap<String, usize> = HashMap::new();
    for i in 0..12 {
        let user = format!("s{i}");
        let sid = format!("sid-{i}");
        let (mut c, n) = ng
            .connect(&token_for(&user), &sid, Encoding::MsgPack)
            .await
            .expect("subscriber");
        c.join(ROOM).await;
        *by_node.entry(n.clone()).or_default() += 1;
        subs.push((user, sid, c, n));
    }
    assert!(by_node.len() >= 2, "sids spread over nodes: {by_node:?}");
    let victim = by_node
        .iter()
        .filter(|(n, _)| **n != pub_node)
        .max_by_key(|(_, c)| **c)
        .map(|(n, _)| n.clone())
        .expect("a node without the publisher has subscribers");
    publisher.join(ROOM).await;

    let ng = std::sync::Arc::new(ng);
    let followers: Vec<_> = subs
        .into_iter()
        .map(|(user, sid, c, n)| {
            let ng = ng.clone();
            tokio::spawn(async move {
                let (seen, moved_to) = follow(&ng, &user, &sid, c).await;
                (user, n, seen, moved_to)
            })
        })
        .collect();

    // Publish N messages with client ids, retrying refusals with the same
    // cid (exactly-once), and kill the victim node a third of the way in.
    let mut acked = vec![];
    let victim_idx: usize = victim[1..].parse().expect("node id n<i>");
    for k in 0..N {
        if k == N / 3 {
            nodes[victim_idx].kill9();
        }
        loop {
            let f = publisher
                .publish_cid(ROOM, Some(&format!("m{k}")), json!({ "k": k }))
                .await;
            match f {
                ServerFrame::Ack { seq, .. } => {
                    acked.push(seq);
                    break;
                }
                ServerFrame::Error { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
                f => panic!("{f:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(acked, (1..=N).collect::<Vec<_>>());

    let mut failed_over = 0;
    for f in followers {
        let (user, first_node, seen, moved_to) = tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("followers finish")
            .expect("follower");
        assert_eq!(
            seen,
            (1..=N).collect::<Vec<_>>(),
            "{user} (first on {first_node}) saw every acked message once, in order"
        );
        if first_node == victim {
            failed_over += 1;
            assert!(
                moved_to.iter().all(|n| *n != victim),
                "{user} moved off the dead node: {moved_to:?}"
            );
        } else {
            assert!(
                moved_to.is_empty(),
                "{user} on a live node kept its connection"
            );
        }
    }
    assert!(failed_over >= 1);
}
