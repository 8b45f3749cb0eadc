//! The archiver: moves messages from the rooms' hot streams in Redis to
//! the shared store (PostgreSQL) in batches.
//!
//! The publish script notes each archived room in the sorted set
//! `shoal:archive` with its newest seq. Every node runs an archiver, but
//! only the holder of a short lock (`shoal:archive:lock`) sweeps: for each
//! noted room it compares the store's last seq with the noted one, copies
//! the missing range from the stream (inserts are idempotent on
//! `(room, seq)`), and removes the note only if no newer message arrived
//! meanwhile. So a message acked by Redis reaches the database even if the
//! node that published it crashed right after, and is never stored twice.
//! A range the stream no longer holds (the archiver was down for longer
//! than `--redis-stream-len` messages of a room) is logged and counted.

use std::{sync::Arc, time::Duration};

use super::redis_conn::Conn;
use shoal_proto::codec::{body_text, body_to_storage};
use tokio_util::sync::CancellationToken;

use super::{keys::log_key, Bus};
use crate::{
    metrics::Metrics,
    store::{NewMsg, Store, WriteOp},
};

/// Rooms with messages the archiver has not copied yet (score: newest seq).
use super::keys::{room_of_log as room_of, ARCHIVE_KEY as DIRTY_KEY, ARCHIVE_LOCK_KEY as LOCK_KEY};
/// Rooms looked at per sweep.
const ROOMS_PER_SWEEP: isize = 256;
/// Messages per store transaction.
const BATCH: usize = 512;

const CLEAR_LUA: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"#;

/// One archiver per node.
pub struct Archiver {
    /// Redis command connection.
    pub conn: Conn,
    /// The bus (hot-history reads).
    pub bus: Arc<dyn Bus>,
    /// The shared store.
    pub store: Arc<dyn Store>,
    /// This node's id (lock owner).
    pub node: String,
    /// Time between sweeps.
    pub interval: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Archiver {
    /// Sweep every `interval` until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let clear = redis::Script::new(CLEAR_LUA);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first sweep comes one interval after start.
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.sweep(&clear).await {
                tracing::debug!(error = %e, "archive sweep stopped; retried next tick");
            }
        }
    }

    async fn sweep(&mut self, clear: &redis::Script) -> anyhow::Result<()> {
        // Hold (or renew) the lock for three intervals: a holder that
        // crashed is replaced within that.
        let ttl = (self.interval * 3).max(Duration::from_secs(1)).as_millis() as u64;
        let holder: Option<String> = redis::cmd("GET")
            .arg(LOCK_KEY)
            .query_async(&mut self.conn)
            .await?;
        match holder {
            Some(h) if h == self.node => {
                let _: () = redis::cmd("PEXPIRE")
                    .arg(LOCK_KEY)
                    .arg(ttl)
                    .query_async(&mut self.conn)
                    .await?;
            }
            Some(_) => return Ok(()),
            None => {
                let got: Option<String> = redis::cmd("SET")
                    .arg(LOCK_KEY)
                    .arg(&self.node)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut self.conn)
                    .await?;
                if got.is_none() {
                    return Ok(());
                }
            }
        }
        let dirty: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(DIRTY_KEY)
            .arg(0)
            .arg(ROOMS_PER_SWEEP - 1)
            .arg("WITHSCORES")
            .query_async(&mut self.conn)
            .await?;
        for (log, upto) in dirty {
            let Some(room) = room_of(&log) else {
                let _: i64 = redis::cmd("ZREM")
                    .arg(DIRTY_KEY)
                    .arg(&log)
                    .query_async(&mut self.conn)
                    .await?;
                continue;
            };
            self.copy(room, upto).await?;
            let _: i64 = clear
                .key(DIRTY_KEY)
                .arg(log_key(room))
                .arg(upto)
                .invoke_async(&mut self.conn)
                .await?;
        }
        Ok(())
    }

    /// Copy `(store head, upto]` of a room from the stream to the store.
    async fn copy(&self, room: &str, upto: u64) -> anyhow::Result<()> {
        let mut after = self.store.room_head(room, u64::MAX).await?.last_seq;
        let parties = shoal_proto::RoomName::parse(room)
            .ok()
            .and_then(|n| n.dm)
            .map(|(a, b)| (Arc::<str>::from(a), Arc::<str>::from(b)));
        while after < upto {
            let page = self.bus.replay(room, after, upto, BATCH).await?;
            if page.floor > after {
                tracing::warn!(
                    room,
                    from = after + 1,
                    to = page.floor,
                    "messages left the hot history before they were archived"
                );
                self.metrics.archive_missed.inc_by(page.floor - after);
            }
            let Some(last) = page.entries.last().map(|e| e.msg.seq) else {
                break;
            };
            let ops: Vec<WriteOp> = page
                .entries
                .into_iter()
                .map(|e| {
                    WriteOp::Msg(NewMsg {
                        room: room.into(),
                        seq: e.msg.seq,
                        from: e.msg.from.into(),
                        ts: e.msg.ts,
                        text: body_text(&e.msg.body).map(str::to_string),
                        body: body_to_storage(&e.msg.body),
                        cid: None,
                        parties: parties.clone(),
                        meta: e.meta,
                    })
                })
                .collect();
            let n = ops.len();
            let started = std::time::Instant::now();
            self.store.write_batch(ops).await?;
            self.metrics.store_batch_ops.observe(n as f64);
            self.metrics
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.archived.inc_by(n as u64);
            after = last;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn room_of_log_key() {
        assert_eq!(super::room_of("shoal:{dm:a:b}:log"), Some("dm:a:b"));
        assert_eq!(super::room_of("other"), None);
    }
}
