//! A room and its state. The rule this file exists for: a room's ordering
//! state (the last seq assigned, the last seq delivered, the commit epoch)
//! moves only through [`Order`]'s methods, which say what each move means
//! and are tested here without tokio, a store or a writer task.
//!
//! - `seq` is the last seq handed out; `committed` the last one delivered
//!   to members (after its commit, in a persistent room). `committed <=
//!   seq` always; a room with `seq == committed` has nothing in flight.
//! - Locally, seqs are [`Order::assign`]ed one at a time and
//!   [`Order::commit`]ted in order; a failed commit [`Order::abort`]s
//!   every seq not committed yet (a new epoch), so the room never shows a
//!   gap and never reuses a seq a member saw.
//! - In a cluster the bus assigns seqs; a node [`Order::accept`]s them in
//!   order, asks for the missing ones on a gap, ignores repeats, and
//!   [`Order::skip_to`]s past what nobody can deliver any more (announced
//!   to members as a `gap`).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use parking_lot::Mutex;

use super::MAX_CIDS_PER_ROOM;
use crate::{config::NamespaceOpts, outbound::ConnHandle};

/// A room.
pub struct Room {
    /// Full name.
    pub name: Arc<str>,
    /// Namespace options.
    pub opts: NamespaceOpts,
    /// For DM rooms, the two users.
    pub dm: Option<(Arc<str>, Arc<str>)>,
    pub(super) state: Mutex<RoomState>,
}

/// A room's ordering state (see the module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Order {
    seq: u64,
    committed: u64,
    epoch: u64,
}

/// What a seq from the bus means for a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Accept {
    /// The next seq: deliver it (already counted as delivered).
    Deliver,
    /// Seqs after `committed` are missing: fetch them first.
    Gap {
        /// The last seq delivered.
        committed: u64,
    },
    /// Delivered already (a repeat, or older than what was skipped).
    Stale,
}

impl Order {
    /// A room loaded at `head`: everything up to it is delivered.
    pub(super) fn at(head: u64) -> Self {
        Order {
            seq: head,
            committed: head,
            epoch: 0,
        }
    }

    /// The last seq delivered to members.
    pub(super) fn committed(&self) -> u64 {
        self.committed
    }

    /// The current commit epoch (messages of an older one are failed).
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Nothing assigned and not yet delivered.
    pub(super) fn idle(&self) -> bool {
        self.seq == self.committed
    }

    /// Hand out the next seq.
    pub(super) fn assign(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Take back the seq just assigned (it was never handed to anyone).
    pub(super) fn unassign(&mut self, seq: u64) {
        debug_assert_eq!(self.seq, seq, "only the last seq can be taken back");
        if self.seq == seq {
            self.seq -= 1;
        }
    }

    /// `seq` is delivered (committed first, in a persistent room). Commits
    /// come in seq order.
    pub(super) fn commit(&mut self, seq: u64) {
        debug_assert_eq!(
            self.committed + 1,
            seq,
            "commits are delivered in seq order"
        );
        self.committed = self.committed.max(seq);
        self.seq = self.seq.max(seq);
    }

    /// A commit of `epoch` failed: every seq not committed yet is taken
    /// back, and a new epoch fails what is still queued. Returns the last
    /// committed seq, or None if `epoch` was already aborted.
    pub(super) fn abort(&mut self, epoch: u64) -> Option<u64> {
        if self.epoch != epoch {
            return None;
        }
        self.epoch += 1;
        self.seq = self.committed;
        Some(self.committed)
    }

    /// A seq the bus assigned arrived.
    pub(super) fn accept(&mut self, seq: u64) -> Accept {
        if seq <= self.committed {
            return Accept::Stale;
        }
        if seq > self.committed + 1 {
            return Accept::Gap {
                committed: self.committed,
            };
        }
        self.committed = seq;
        self.seq = self.seq.max(seq);
        Accept::Deliver
    }

    /// Members cannot get seqs up to `to`: move past them. Returns the
    /// range skipped, or None if there is nothing to skip.
    pub(super) fn skip_to(&mut self, to: u64) -> Option<(u64, u64)> {
        if self.committed >= to {
            return None;
        }
        let from = self.committed + 1;
        self.committed = to;
        self.seq = self.seq.max(to);
        Some((from, to))
    }
}

/// Everything about a room that its lock guards.
#[derive(Default)]
pub(super) struct RoomState {
    /// Ordering (see [`Order`]).
    pub(super) order: Order,
    /// Removed from the registry; callers holding it must look it up again.
    pub(super) evicted: bool,
    pub(super) members: HashMap<u64, ConnHandle>,
    /// Connections per user, for presence.
    pub(super) users: HashMap<Arc<str>, u32>,
    /// `user \0 cid` -> (seq, ts), with insertion order for expiry.
    pub(super) cids: HashMap<String, (u64, u64)>,
    cid_order: VecDeque<(String, u64)>,
    /// Who may do what (changed by the room's moderation entries, applied
    /// as they are delivered).
    pub(super) acl: super::acl::Acl,
}

impl RoomState {
    /// Remember a publish's client id for the idempotency window (at most
    /// [`MAX_CIDS_PER_ROOM`], oldest forgotten first).
    pub(super) fn remember_cid(&mut self, key: String, seq: u64, ts: u64, window_ms: u64) {
        let cutoff = ts.saturating_sub(window_ms);
        while let Some((k, t)) = self.cid_order.front() {
            if *t >= cutoff && self.cid_order.len() < MAX_CIDS_PER_ROOM {
                break;
            }
            self.cids.remove(k);
            self.cid_order.pop_front();
        }
        self.cids.insert(key.clone(), (seq, ts));
        self.cid_order.push_back((key, ts));
    }

    /// Forget the client ids of seqs after `committed` (taken back).
    pub(super) fn forget_cids_after(&mut self, committed: u64) {
        self.cids.retain(|_, (s, _)| *s <= committed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_sequencing_commits_in_order_and_abort_takes_back_the_rest() {
        let mut o = Order::at(5);
        assert!(o.idle());
        let (a, b) = (o.assign(), o.assign());
        assert_eq!((a, b), (6, 7));
        assert!(!o.idle());
        o.commit(6);
        assert_eq!(o.committed(), 6);
        // The commit of 7 fails: 7 is taken back, the epoch moves on.
        assert_eq!(o.abort(0), Some(6));
        assert!(o.idle());
        assert_eq!(o.epoch(), 1);
        assert_eq!(o.abort(0), None, "an old epoch aborts once");
        // The next message gets 7 again: nobody saw the first 7.
        assert_eq!(o.assign(), 7);
        o.unassign(7);
        assert_eq!(o.assign(), 7);
    }

    #[test]
    fn bus_seqs_deliver_in_order_gap_or_repeat() {
        let mut o = Order::at(3);
        assert_eq!(o.accept(4), Accept::Deliver);
        assert_eq!(o.accept(4), Accept::Stale);
        assert_eq!(o.accept(2), Accept::Stale);
        assert_eq!(o.accept(7), Accept::Gap { committed: 4 });
        assert_eq!(o.committed(), 4, "a gap moves nothing");
        assert_eq!(o.skip_to(5), Some((5, 5)));
        assert_eq!(o.skip_to(5), None);
        assert_eq!(o.accept(6), Accept::Deliver);
        assert_eq!(o.accept(7), Accept::Deliver);
        assert!(o.idle());
    }

    #[test]
    fn cids_expire_by_age_and_count_and_abort_forgets_taken_back_ones() {
        let mut st = RoomState::default();
        st.remember_cid("a".into(), 1, 1_000, 500);
        st.remember_cid("b".into(), 2, 1_400, 500);
        st.remember_cid("c".into(), 3, 1_600, 500);
        assert!(!st.cids.contains_key("a"), "older than the window");
        st.forget_cids_after(2);
        assert_eq!(st.cids.keys().collect::<Vec<_>>(), vec!["b"]);
        for i in 0..(MAX_CIDS_PER_ROOM as u64 + 10) {
            st.remember_cid(format!("k{i}"), i, 2_000, 1_000_000);
        }
        assert!(st.cids.len() <= MAX_CIDS_PER_ROOM + 1);
    }
}
