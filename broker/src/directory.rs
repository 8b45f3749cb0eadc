//! Which user names exist, for direct messages: a DM to a name nobody
//! holds is refused (`error 404`), never kept for whoever registers that
//! name later.
//!
//! A name exists once it is registered here, or once anyone connected
//! with a valid token for it (an external issuer's users need no
//! registration; recording them also keeps their names from being
//! registered by someone else). Names are recorded where every node can
//! read them: the store (single node, or a cluster's shared PostgreSQL)
//! or, for a cluster whose nodes each have their own embedded store, the
//! bus.
//!
//! Bounds: names go to a background recorder through a queue of
//! [`QUEUE`] names (full: the name is recorded at its next connection)
//! and are written in batches of up to [`BATCH`]; a cache of names known
//! to exist (at most [`CACHE`], cleared when full) spares repeat lookups.

use std::{collections::HashSet, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{bus::Bus, store::Store, store::StoreError};

/// Names waiting to be recorded.
pub const QUEUE: usize = 65_536;
/// Most names per write.
pub const BATCH: usize = 1024;
/// Most names cached as existing.
pub const CACHE: usize = 262_144;

/// Where names live.
#[derive(Clone)]
pub enum Registry {
    /// The store every node shares (or the only node's).
    Store(Arc<dyn Store>),
    /// The cluster bus (nodes with their own embedded stores).
    Bus(Arc<dyn Bus>),
}

impl Registry {
    async fn record(&self, names: &[String]) -> Result<(), String> {
        match self {
            Registry::Store(s) => s.remember_users(names).await.map_err(|e| e.to_string()),
            Registry::Bus(b) => b.remember_users(names).await.map_err(|e| e.to_string()),
        }
    }

    async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        match self {
            Registry::Store(s) => s.user_exists(name).await,
            Registry::Bus(b) => b
                .user_known(name)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string())),
        }
    }
}

/// Known user names.
pub struct Directory {
    registry: Registry,
    known: Mutex<HashSet<Arc<str>>>,
    tx: mpsc::Sender<Arc<str>>,
}

impl Directory {
    /// A directory over `registry`, with its recorder task running until
    /// `stop`.
    pub fn start(registry: Registry, stop: CancellationToken) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(record(registry.clone(), rx, stop));
        Arc::new(Directory {
            registry,
            known: Mutex::new(HashSet::new()),
            tx,
        })
    }

    /// `user` holds a valid token or just registered: make sure the name
    /// is recorded. Never waits.
    pub fn seen(&self, user: &Arc<str>) {
        if self.known.lock().contains(user) {
            return;
        }
        if self.tx.try_send(user.clone()).is_ok() {
            self.cache(user.clone());
        }
    }

    /// Whether `user` exists (registered or seen), cluster-wide.
    pub async fn exists(&self, user: &str) -> Result<bool, StoreError> {
        if self.known.lock().contains(user) {
            return Ok(true);
        }
        let found = self.registry.exists(user).await?;
        if found {
            self.cache(user.into());
        }
        Ok(found)
    }

    fn cache(&self, user: Arc<str>) {
        let mut k = self.known.lock();
        if k.len() >= CACHE {
            k.clear();
        }
        k.insert(user);
    }
}

async fn record(registry: Registry, mut rx: mpsc::Receiver<Arc<str>>, stop: CancellationToken) {
    let mut batch: Vec<Arc<str>> = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = stop.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        let names: Vec<String> = batch.drain(..).map(|n| n.to_string()).collect();
        // A failed write is retried a few times; names that still fail
        // are recorded when their users next connect (after the cache
        // forgets them) or register.
        for attempt in 0..3u32 {
            match registry.record(&names).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, names = names.len(), attempt, "recording user names failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }
}
