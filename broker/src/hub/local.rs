//! Single-node sequencing: the hub assigns a room's seqs under the room's
//! lock and, in a persistent namespace, hands each message to the
//! group-commit writer (`persist`) in the same critical section, so the
//! writer sees each room's messages in seq order. The writer calls back
//! here: [`Hub::deliver_committed`] after a batch commits (members get the
//! message, the sender its ack), [`Hub::abort`] when it fails (every seq
//! not committed yet is taken back). In a non-persistent namespace
//! delivery happens at once.

use std::{sync::Arc, time::Instant};

use tokio::sync::oneshot;

use shoal_proto::{entry::ModAction, Body, ErrorCode, EventKind, Meta, ServerFrame};

use super::{
    check_publish, cid_key, cid_owner, now_ms, Hub, HubError, Item, Job, JobPermit, Pending, Post,
    Published, Reply, Room, RoomState,
};

impl Hub {
    /// The writer slot a publish in `room` needs: one in a persistent
    /// room (waiting while the writer's queue is full), none otherwise.
    pub(super) async fn permit_for(&self, room: &Room) -> Result<Option<JobPermit>, HubError> {
        if room.opts.persist {
            self.reserve().await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reserve a slot in the writer's queue (waits while it is full).
    pub async fn reserve(&self) -> Result<JobPermit, HubError> {
        self.jobs
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| HubError::new(ErrorCode::Unavailable, "shutting down"))
    }

    /// Queue a non-message job (membership, receipt, delete).
    pub async fn enqueue(&self, room: &Arc<Room>, op: Pending, reply: Reply) {
        match self.reserve().await {
            Ok(permit) => {
                let epoch = room.state.lock().order.epoch();
                permit.send(Job::Item(Item {
                    room: room.clone(),
                    epoch,
                    op,
                    reply,
                }));
            }
            Err(e) => reply.fail(e),
        }
    }

    /// Wait until everything queued so far has committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Publish to a room. The outcome goes to `reply` (after commit, in a
    /// persistent room). `permit` is required in persistent rooms. Returns
    /// the reply back if the room was evicted meanwhile (look it up again).
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &self,
        room: &Arc<Room>,
        from: &Arc<str>,
        post: Post,
        cid: Option<String>,
        via_api: bool,
        reply: Reply,
        permit: Option<JobPermit>,
    ) -> Result<(), Reply> {
        let Post { body, meta } = post;
        if let Err(e) = check_publish(&room.opts, cid.as_deref(), via_api, &body, self.max_body) {
            reply.fail(e);
            return Ok(());
        }
        let started = Instant::now();
        let mut st = room.state.lock();
        if st.evicted {
            return Err(reply);
        }
        let key = cid.as_deref().map(|c| cid_key(cid_owner(from, via_api), c));
        if let Some(&(seq, ts)) = key.as_ref().and_then(|k| st.cids.get(k)) {
            self.metrics.idempotent_retries.inc();
            let p = Published {
                room: room.name.clone(),
                seq,
                ts,
                recipients: 0,
            };
            if seq <= st.order.committed() {
                drop(st);
                reply.ack(p);
            } else if let Some(permit) = permit {
                permit.send(Job::Item(Item {
                    room: room.clone(),
                    epoch: st.order.epoch(),
                    op: Pending::AckOnly { seq, ts },
                    reply,
                }));
            } else {
                drop(st);
                reply.ack(p);
            }
            return Ok(());
        }
        let seq = st.order.assign();
        let ts = now_ms();
        if let Some(k) = key {
            st.remember_cid(k, seq, ts, self.cid_window.as_millis() as u64);
        }
        if room.opts.persist {
            let Some(permit) = permit else {
                st.order.unassign(seq);
                drop(st);
                reply.fail((ErrorCode::Internal, "internal error".into()));
                return Ok(());
            };
            permit.send(Job::Item(Item {
                room: room.clone(),
                epoch: st.order.epoch(),
                op: Pending::Msg {
                    seq,
                    ts,
                    from: from.clone(),
                    body,
                    meta,
                    cid,
                    started,
                },
                reply,
            }));
            return Ok(());
        }
        st.order.commit(seq);
        let recipients = self.deliver_locked(room, &mut st, seq, ts, from, body, meta);
        drop(st);
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        reply.ack(Published {
            room: room.name.clone(),
            seq,
            ts,
            recipients,
        });
        Ok(())
    }

    /// Deliver entry `seq` to the room's audience; a moderation entry also
    /// changes the room's access rules, and a kick or ban then removes the
    /// user's connections here (they are told `left {reason}` after the
    /// entry itself).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver_locked(
        &self,
        room: &Room,
        st: &mut RoomState,
        seq: u64,
        ts: u64,
        from: &str,
        body: Body,
        meta: Meta,
    ) -> usize {
        let started = Instant::now();
        let moderation = meta
            .kind
            .filter(|k| k.is_moderation())
            .map(|k| (k, ModAction::from_body(&body)));
        let f = ServerFrame::entry(room.name.to_string(), seq, from.to_string(), ts, body, meta);
        let n = self.send_to_room(room, st, &f, |_| true);
        if let Some((kind, what)) = moderation {
            st.acl.apply(kind, from, &what);
            if let (EventKind::Kick | EventKind::Ban, Some(user)) = (kind, what.user.as_deref()) {
                if st.acl.role(user) != Some(shoal_proto::entry::Role::Owner) {
                    self.remove_user(room, st, user, kind.name());
                }
            }
        }
        self.metrics.deliveries.inc_by(n as u64);
        self.metrics
            .fanout_seconds
            .observe(started.elapsed().as_secs_f64());
        n
    }

    /// Group-commit side: is `epoch` still the room's epoch?
    pub fn is_current(&self, room: &Room, epoch: u64) -> bool {
        room.state.lock().order.epoch() == epoch
    }

    /// Group-commit side: a message committed; deliver it. Returns recipients.
    pub fn deliver_committed(
        &self,
        room: &Room,
        seq: u64,
        ts: u64,
        from: &str,
        body: Body,
        meta: Meta,
    ) -> usize {
        let mut st = room.state.lock();
        st.order.commit(seq);
        self.deliver_locked(room, &mut st, seq, ts, from, body, meta)
    }

    /// Group-commit side: a commit failed; take back every seq not committed yet
    /// so the room has no gap. Pending messages of this epoch will fail.
    pub fn abort(&self, room: &Room, epoch: u64) {
        let mut st = room.state.lock();
        if let Some(committed) = st.order.abort(epoch) {
            st.forget_cids_after(committed);
        }
    }
}
