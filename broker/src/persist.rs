//! The group-commit writer: the one task that writes messages, memberships,
//! receipts and deletions to the store, and the only place that delivers
//! stored messages.
//!
//! Publishers queue jobs (bounded by `--store-queue`; a full queue makes
//! publishers wait, nothing is dropped). The writer takes everything queued,
//! up to `--store-batch` operations, writes it in one transaction, and only
//! then delivers each message to its room and acks its sender, in queue
//! order, which is seq order per room. An acked message is therefore
//! committed and survives a crash of the broker process.
//!
//! If a commit fails (disk full, database unavailable), nothing in the
//! batch is acked or delivered: each sender gets `error 503`, the rooms
//! take back their uncommitted seqs (see `Hub::abort`), and the store is
//! reported down on `/health` until a write succeeds again.

use std::{sync::Arc, time::Instant};

use shoal_proto::{
    codec::{body_text, body_to_storage},
    ErrorCode, ServerFrame,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    hub::{Hub, HubError, Item, Job, Pending, Published},
    metrics::Metrics,
    store::{NewMsg, OpOutcome, Store, WriteOp},
    webhook::{preview, Offline, Webhook},
};

/// What the writer needs.
pub struct GroupCommit {
    /// Room registry, for delivery after commit.
    pub hub: Arc<Hub>,
    /// Where batches go.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Most operations per transaction.
    pub batch: usize,
    /// Offline notifications for direct messages.
    pub webhook: Option<Webhook>,
    /// Most rooms a user may be a durable member of.
    pub max_memberships: u64,
}

fn unavailable() -> HubError {
    HubError::new(
        ErrorCode::Unavailable,
        "storage unavailable; message not stored, retry",
    )
}

fn write_op(item: &Item, max_memberships: u64) -> Option<WriteOp> {
    let room = item.room.name.clone();
    Some(match &item.op {
        Pending::Msg {
            seq,
            ts,
            from,
            body,
            meta,
            cid,
            ..
        } => WriteOp::Msg(NewMsg {
            room,
            seq: *seq,
            from: from.clone(),
            ts: *ts,
            body: body_to_storage(body),
            text: body_text(body).map(str::to_string),
            cid: cid.clone(),
            parties: item.room.dm.clone(),
            meta: meta.clone(),
        }),
        Pending::AckOnly { .. } => return None,
        Pending::Join(user) => WriteOp::Join {
            room,
            user: user.clone(),
            max: max_memberships,
        },
        Pending::Leave(user) => WriteOp::Leave {
            room,
            user: user.clone(),
        },
        Pending::Mark { user, seq, state } => WriteOp::Mark {
            room,
            user: user.clone(),
            seq: *seq,
            state: *state,
        },
    })
}

impl GroupCommit {
    /// Run until `stop` is cancelled and the queue is empty, or every
    /// sender is gone.
    pub async fn run(self, mut rx: mpsc::Receiver<Job>, stop: CancellationToken) {
        let mut jobs = Vec::with_capacity(self.batch);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut jobs, self.batch) => n,
                _ = stop.cancelled() => {
                    // Finish what is queued, then stop.
                    while let Ok(j) = rx.try_recv() {
                        jobs.push(j);
                    }
                    if jobs.is_empty() {
                        break;
                    }
                    jobs.len()
                }
            };
            if n == 0 {
                break;
            }
            self.batch(std::mem::take(&mut jobs)).await;
            jobs.reserve(self.batch);
        }
        tracing::debug!("group-commit writer stopped");
    }

    async fn batch(&self, jobs: Vec<Job>) {
        let mut items = Vec::with_capacity(jobs.len());
        let mut flushes = Vec::new();
        for j in jobs {
            match j {
                Job::Item(i) => items.push(i),
                Job::Flush(tx) => flushes.push(tx),
            }
        }
        // Messages queued before a failed commit took their seqs back.
        let mut live = Vec::with_capacity(items.len());
        for it in items {
            let sequenced = matches!(it.op, Pending::Msg { .. } | Pending::AckOnly { .. });
            if sequenced && !self.hub.is_current(&it.room, it.epoch) {
                it.reply.fail(unavailable());
            } else {
                live.push(it);
            }
        }
        let ops: Vec<WriteOp> = live
            .iter()
            .filter_map(|it| write_op(it, self.max_memberships))
            .collect();
        let n_ops = ops.len();
        let result = if ops.is_empty() {
            Ok(vec![])
        } else {
            let started = Instant::now();
            let r = self.store.write_batch(ops).await;
            self.metrics
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.store_batch_ops.observe(n_ops as f64);
            r
        };
        match result {
            Ok(outcomes) => {
                self.metrics.store_up.set(1);
                let mut outcomes = outcomes.into_iter();
                for it in live {
                    let outcome = if matches!(it.op, Pending::AckOnly { .. }) {
                        OpOutcome::Done
                    } else {
                        outcomes.next().unwrap_or(OpOutcome::Done)
                    };
                    self.committed(it, outcome);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = n_ops, "group commit failed");
                self.metrics.store_errors.inc();
                self.metrics.store_up.set(0);
                for it in live {
                    if matches!(it.op, Pending::Msg { .. }) {
                        self.hub.abort(&it.room, it.epoch);
                    }
                    it.reply.fail(unavailable());
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }

    fn committed(&self, it: Item, outcome: OpOutcome) {
        let room = &it.room;
        match it.op {
            Pending::Msg {
                seq,
                ts,
                from,
                body,
                meta,
                started,
                ..
            } => {
                if let Some(w) = &self.webhook {
                    // The other party of a DM, and mentioned members, who
                    // have no connection here hear of it by webhook.
                    let dm = room.dm.iter().flat_map(|(a, b)| [&**a, &**b]);
                    let mentioned = meta.mentions.iter().map(String::as_str);
                    let mut told: Vec<&str> = Vec::new();
                    for u in dm.chain(mentioned) {
                        if meta.kind.is_none()
                            && u != &*from
                            && !told.contains(&u)
                            && !self.hub.is_online(u)
                        {
                            told.push(u);
                            w.notify(Offline {
                                user: u.to_string(),
                                room: room.name.to_string(),
                                seq,
                                from: from.to_string(),
                                preview: preview(body_text(&body)),
                            });
                        }
                    }
                }
                let recipients = self.hub.deliver_committed(room, seq, ts, &from, body, meta);
                self.metrics
                    .publish_seconds
                    .observe(started.elapsed().as_secs_f64());
                it.reply.ack(Published {
                    room: room.name.clone(),
                    seq,
                    ts,
                    recipients,
                });
                self.hub.maybe_evict(room);
            }
            Pending::AckOnly { seq, ts } => it.reply.ack(Published {
                room: room.name.clone(),
                seq,
                ts,
                recipients: 0,
            }),
            // A joiner waits for its membership to be durable (Reply::Chan).
            Pending::Join(_) if outcome == OpOutcome::NotFound => it.reply.fail((
                ErrorCode::Conflict,
                "member of too many rooms; leave some first".into(),
            )),
            Pending::Join(_) | Pending::Leave(_) => it.reply.ack(Published {
                room: room.name.clone(),
                seq: 0,
                ts: 0,
                recipients: 0,
            }),
            Pending::Mark { user, seq, state } => {
                if outcome == OpOutcome::Done {
                    let f = ServerFrame::Mark {
                        room: room.name.to_string(),
                        user: user.to_string(),
                        seq,
                        state,
                    };
                    self.hub.notify(room, &f, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use shoal_proto::{names::RoomName, Encoding, MarkState, Receipt, StoredMsg};
    use tokio::sync::oneshot;

    use super::*;
    use crate::{
        config::NamespaceTable,
        hub::{Attach, HubError, Reply},
        outbound::Inbox,
        store::{
            sqlite::SqliteStore, AclRecord, AdminEntry, Replay, ReplayEntry, RetentionPolicy,
            RoomHead, RoomSummary, StoreError, TargetInfo, UserRecord,
        },
    };
    use shoal_proto::entry::Version;

    /// The embedded store, with writes that fail while `down` is set (a full
    /// disk, a lost database).
    struct Flaky {
        inner: SqliteStore,
        down: AtomicBool,
    }

    #[async_trait]
    impl Store for Flaky {
        async fn create_user(&self, n: &str, h: &str) -> Result<(), StoreError> {
            self.inner.create_user(n, h).await
        }
        async fn password_hash(&self, n: &str) -> Result<Option<(String, String)>, StoreError> {
            self.inner.password_hash(n).await
        }
        async fn remember_users(&self, n: &[String]) -> Result<(), StoreError> {
            self.inner.remember_users(n).await
        }
        async fn user_exists(&self, n: &str) -> Result<bool, StoreError> {
            self.inner.user_exists(n).await
        }
        async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
            self.inner.list_users().await
        }
        async fn revoke(&self, j: &str, e: u64) -> Result<(), StoreError> {
            self.inner.revoke(j, e).await
        }
        async fn revoked(&self, n: u64) -> Result<Vec<(String, u64)>, StoreError> {
            self.inner.revoked(n).await
        }
        async fn room_head(&self, r: &str, s: u64) -> Result<RoomHead, StoreError> {
            self.inner.room_head(r, s).await
        }
        async fn write_batch(&self, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("database or disk is full".into()));
            }
            self.inner.write_batch(ops).await
        }
        async fn replay(&self, r: &str, a: u64, u: u64, l: usize) -> Result<Replay, StoreError> {
            self.inner.replay(r, a, u, l).await
        }
        async fn history(
            &self,
            r: &str,
            b: Option<u64>,
            l: usize,
            v: &str,
        ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
            self.inner.history(r, b, l, v).await
        }
        async fn thread(
            &self,
            r: &str,
            s: u64,
            b: Option<u64>,
            l: usize,
            v: &str,
        ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
            self.inner.thread(r, s, b, l, v).await
        }
        async fn edits(&self, r: &str, s: u64) -> Result<Vec<Version>, StoreError> {
            self.inner.edits(r, s).await
        }
        async fn room_acl(&self, r: &str) -> Result<Option<AclRecord>, StoreError> {
            self.inner.room_acl(r).await
        }
        async fn unrevoke(&self, j: &str) -> Result<(), StoreError> {
            self.inner.unrevoke(j).await
        }
        async fn admin_record(&self, e: AdminEntry) -> Result<(), StoreError> {
            self.inner.admin_record(e).await
        }
        async fn admin_audit(&self, l: usize) -> Result<Vec<AdminEntry>, StoreError> {
            self.inner.admin_audit(l).await
        }
        async fn audit(
            &self,
            r: &str,
            b: Option<u64>,
            l: usize,
        ) -> Result<Vec<ReplayEntry>, StoreError> {
            self.inner.audit(r, b, l).await
        }
        async fn target(&self, r: &str, s: u64, v: &str) -> Result<Option<TargetInfo>, StoreError> {
            self.inner.target(r, s, v).await
        }
        async fn search(
            &self,
            r: &str,
            q: &str,
            l: usize,
            o: usize,
        ) -> Result<Vec<StoredMsg>, StoreError> {
            self.inner.search(r, q, l, o).await
        }
        async fn receipts(&self, r: &str) -> Result<Vec<Receipt>, StoreError> {
            self.inner.receipts(r).await
        }
        async fn user_rooms(&self, u: &str) -> Result<Vec<RoomSummary>, StoreError> {
            self.inner.user_rooms(u).await
        }
        async fn is_member(&self, r: &str, u: &str) -> Result<bool, StoreError> {
            self.inner.is_member(r, u).await
        }
        async fn put_file(&self, f: crate::store::FileRecord) -> Result<(), StoreError> {
            self.inner.put_file(f).await
        }
        async fn get_file(&self, id: &str) -> Result<Option<crate::store::FileRecord>, StoreError> {
            self.inner.get_file(id).await
        }
        async fn apply_retention(&self, p: RetentionPolicy) -> Result<u64, StoreError> {
            self.inner.apply_retention(p).await
        }
        async fn file_usage(&self, owner: &str) -> Result<u64, StoreError> {
            self.inner.file_usage(owner).await
        }
        async fn expire_files(&self, p: RetentionPolicy) -> Result<u64, StoreError> {
            self.inner.expire_files(p).await
        }
    }

    async fn publish(hub: &Hub, body: &str) -> Result<Published, HubError> {
        let (tx, rx) = oneshot::channel();
        let name = RoomName::parse("r").expect("name");
        hub.publish_async(
            &name,
            &Arc::from("alice"),
            shoal_proto::Body::from(body).into(),
            None,
            false,
            Reply::Chan(tx),
        )
        .await;
        rx.await.expect("reply")
    }

    #[tokio::test]
    async fn failed_commit_answers_503_takes_seqs_back_and_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Flaky {
            inner: SqliteStore::open(dir.path(), false).expect("open"),
            down: AtomicBool::new(false),
        });
        let metrics = Arc::new(Metrics::new("t"));
        let (tx, rx) = mpsc::channel(64);
        let hub = Arc::new(Hub::new(
            crate::hub::HubSettings {
                shards: 4,
                namespaces: NamespaceTable::default(),
                cid_window: std::time::Duration::from_secs(60),
                max_body: 64 * 1024,
            },
            metrics.clone(),
            store.clone(),
            tx,
            None,
        ));
        let stop = CancellationToken::new();
        tokio::spawn(
            GroupCommit {
                hub: hub.clone(),
                store: store.clone(),
                metrics: metrics.clone(),
                batch: 8,
                webhook: None,
                max_memberships: 1000,
            }
            .run(rx, stop.clone()),
        );
        let (member, mut inbox) = Inbox::pair("bob", Encoding::Json, 64, metrics.clone());
        let room = hub
            .ensure_room(&RoomName::parse("r").expect("name"))
            .await
            .expect("room");
        assert!(matches!(
            hub.attach(&member, &room, None, None),
            Ok(Attach::Joined(0))
        ));
        assert_eq!(publish(&hub, "one").await.map(|p| p.seq), Ok(1));

        store.down.store(true, Ordering::SeqCst);
        let failed = publish(&hub, "lost").await;
        assert_eq!(failed.map_err(|e| e.code), Err(ErrorCode::Unavailable));
        assert_eq!(metrics.store_up.get(), 0);
        hub.enqueue(
            &room,
            Pending::Mark {
                user: "bob".into(),
                seq: 1,
                state: MarkState::Read,
            },
            Reply::None,
        )
        .await;

        store.down.store(false, Ordering::SeqCst);
        // The failed seq was taken back: the next message gets 2, no gap.
        assert_eq!(publish(&hub, "two").await.map(|p| p.seq), Ok(2));
        assert_eq!(metrics.store_up.get(), 1);
        let mut got = vec![];
        while let Ok(b) = inbox.try_recv() {
            if let Ok(ServerFrame::Msg { seq, body, .. }) = Encoding::Json.decode_server(&b[2..]) {
                got.push((seq, body));
            }
        }
        assert_eq!(got, vec![(1, "one".into()), (2, "two".into())]);
        let (page, _) = store
            .history("r", None, 10, "alice")
            .await
            .expect("history");
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 1]);
        stop.cancel();
    }
}
