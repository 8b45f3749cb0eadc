//! Offline notifications: when a direct message commits and its recipient
//! has no live connection on this node, POST `{user, room, seq, from,
//! preview}` as JSON to `--offline-webhook`, so a team can forward it to
//! FCM/APNs.
//!
//! Bounded and best effort: at most `QUEUE` notifications wait (more are
//! dropped and counted); each is tried `ATTEMPTS` times with backoff; a
//! 2xx answer ends it. The message itself is always in the DM room's
//! history whatever happens here.

use std::{sync::Arc, time::Duration};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

/// Notifications waiting to be sent; more are dropped and counted.
pub const QUEUE: usize = 1024;
/// Tries per notification.
pub const ATTEMPTS: u32 = 4;
/// Longest preview, in characters.
pub const PREVIEW_CHARS: usize = 120;

/// One notification.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Offline {
    /// Recipient with no live connection.
    pub user: String,
    /// DM room.
    pub room: String,
    /// Message seq.
    pub seq: u64,
    /// Sender.
    pub from: String,
    /// Start of the message text (empty for non-text bodies).
    pub preview: String,
}

/// Counters of the webhook.
#[derive(Clone, Default)]
pub struct WebhookMetrics {
    /// Delivered (2xx).
    pub sent: Counter,
    /// Failed attempts (non-2xx, timeout, connection error).
    pub failed_attempts: Counter,
    /// Given up after every attempt, or dropped because the queue was full.
    pub dropped: Counter,
}

/// Handle to the sender task.
#[derive(Clone)]
pub struct Webhook {
    tx: mpsc::Sender<Offline>,
    metrics: Arc<WebhookMetrics>,
}

impl Webhook {
    /// Start the sender task for `url`; `backoff` is the first retry delay
    /// (doubled each time).
    pub fn start(url: String, backoff: Duration, metrics: Arc<WebhookMetrics>) -> Webhook {
        let (tx, mut rx) = mpsc::channel::<Offline>(QUEUE);
        let m = metrics.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default();
            while let Some(n) = rx.recv().await {
                let mut delay = backoff;
                let mut ok = false;
                for attempt in 1..=ATTEMPTS {
                    match client.post(&url).json(&n).send().await {
                        Ok(r) if r.status().is_success() => {
                            ok = true;
                            break;
                        }
                        Ok(r) => {
                            tracing::debug!(status = %r.status(), attempt, "offline webhook refused")
                        }
                        Err(e) => tracing::debug!(error = %e, attempt, "offline webhook failed"),
                    }
                    m.failed_attempts.inc();
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
                if ok {
                    m.sent.inc();
                } else {
                    tracing::warn!(user = %n.user, room = %n.room, seq = n.seq, "offline webhook gave up");
                    m.dropped.inc();
                }
            }
        });
        Webhook { tx, metrics }
    }

    /// Queue a notification without waiting; dropped (and counted) if full.
    pub fn notify(&self, n: Offline) {
        if self.tx.try_send(n).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

/// First [`PREVIEW_CHARS`] characters of `text`.
pub fn preview(text: Option<&str>) -> String {
    text.unwrap_or("").chars().take(PREVIEW_CHARS).collect()
}
