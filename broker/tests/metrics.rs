//! `/metrics` against a real broker: every family is exposed with its
//! documented type and the `node` label, and counters move when their event
//! happens.

mod common;

use common::*;
use serde_json::json;
use shoal_proto::{ClientFrame, Encoding, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

/// (family, type): the documented set.
const FAMILIES: &[(&str, &str)] = &[
    ("shoal_connections", "gauge"),
    ("shoal_handshakes", "counter"),
    ("shoal_auth_failures", "counter"),
    ("shoal_frames_in", "counter"),
    ("shoal_frames_out", "counter"),
    ("shoal_deliveries", "counter"),
    ("shoal_errors", "counter"),
    ("shoal_closes", "counter"),
    ("shoal_rate_limited", "counter"),
    ("shoal_ephemeral_dropped", "counter"),
    ("shoal_rooms", "gauge"),
    ("shoal_room_members", "gauge"),
    ("shoal_publish_seconds", "histogram"),
    ("shoal_fanout_seconds", "histogram"),
    ("shoal_outbound_queue_depth", "histogram"),
    ("shoal_write_batch_frames", "histogram"),
    ("shoal_idempotent_retries", "counter"),
    ("shoal_store_batch_ops", "histogram"),
    ("shoal_store_commit_seconds", "histogram"),
    ("shoal_store_errors", "counter"),
    ("shoal_store_up", "gauge"),
    ("shoal_replayed", "counter"),
    ("shoal_retention_removed", "counter"),
    ("shoal_webhook_sent", "counter"),
    ("shoal_webhook_failed_attempts", "counter"),
    ("shoal_webhook_dropped", "counter"),
    ("shoal_ws_out_bytes", "counter"),
    ("shoal_bus_inbound_dropped", "counter"),
    ("shoal_bus_bad_payloads", "counter"),
    ("shoal_bus_gap_filled", "counter"),
    ("shoal_bus_up", "gauge"),
    ("shoal_redis_command_seconds", "histogram"),
    ("shoal_redis_pipeline_depth", "histogram"),
    ("shoal_redis_errors", "counter"),
    ("shoal_redis_reconnects", "counter"),
    ("shoal_redis_subscriptions", "gauge"),
    ("shoal_http_requests", "counter"),
    ("shoal_process_cpu_seconds", "counter"),
    ("shoal_process_resident_memory_bytes", "gauge"),
    ("shoal_process_open_fds", "gauge"),
    ("shoal_process_start_time_seconds", "gauge"),
];

#[tokio::test]
async fn every_family_is_exposed_and_counters_move() {
    let b = Broker::start_with(|c| c.conn.rate_burst = 5.0).await;
    let text = b.metrics().await;
    for (name, kind) in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} ({kind}) missing"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("node=\"")),
            "{name}: no sample with a node label"
        );
    }
    let m = sample;
    let before = b.metrics().await;

    // A bad token: handshake refused and counted by reason.
    assert!(b.try_connect("garbage", Encoding::Json).await.is_err());
    // A publish: deliveries, frames, store and latency histograms move.
    let t = b.user("alice").await;
    let mut a = b.connect(&t, Encoding::Json).await;
    a.join("m").await;
    assert!(matches!(
        a.publish("m", json!("x")).await,
        ServerFrame::Ack { .. }
    ));
    // A malformed frame: invalid frame and a 400 error.
    a.send_raw(Message::Text("{nope".into()))
        .await
        .expect("send");
    a.recv_until(|f| matches!(f, ServerFrame::Error { code: 400, .. }))
        .await;
    // Over the token bucket (burst 5): rate limited.
    for _ in 0..10 {
        a.send(&ClientFrame::Ping { id: None }).await;
    }
    a.recv_until(|f| matches!(f, ServerFrame::Error { code: 429, .. }))
        .await;
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let after = b.metrics().await;
    for key in [
        "shoal_handshakes_total{result=\"unauthorized\"",
        "shoal_handshakes_total{result=\"ok\"",
        "shoal_auth_failures_total{reason=\"malformed\"",
        "shoal_frames_in_total{type=\"pub\"",
        "shoal_frames_in_total{type=\"invalid\"",
        "shoal_frames_out_total{type=\"msg\"",
        "shoal_frames_out_total{type=\"ack\"",
        "shoal_deliveries_total",
        "shoal_errors_total{code=\"bad_request\"",
        "shoal_errors_total{code=\"rate_limited\"",
        "shoal_rate_limited_total{kind=\"frame\"",
        "shoal_publish_seconds_count",
        "shoal_fanout_seconds_count",
        "shoal_store_batch_ops_count",
        "shoal_store_commit_seconds_count",
        "shoal_direct_writes_total",
        "shoal_ws_out_bytes_total",
        "shoal_http_requests_total{route=\"login\",status=\"200\"",
    ] {
        assert!(
            m(&after, key) > m(&before, key),
            "{key} did not move: {} -> {}",
            m(&before, key),
            m(&after, key)
        );
    }
    assert_eq!(m(&after, "shoal_connections"), 0.0);
    assert!(m(&after, "shoal_process_resident_memory_bytes") > 0.0);
}
