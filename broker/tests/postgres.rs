//! The PostgreSQL store against a real PostgreSQL server: the same
//! conformance checks as the embedded store, idempotent message inserts,
//! and migrations that run once when several nodes start together.

mod common;

use std::sync::Arc;

use common::*;
use shoal_broker::store::{conformance, postgres::PgStore, Store};

async fn fresh(pg: &Postgres, db: &str) -> PgStore {
    let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    let url = pg.url().replace("/postgres", &format!("/{db}"));
    PgStore::connect(&url, 4).await.expect("store")
}

#[tokio::test]
async fn postgres_store_behaves_like_the_embedded_one() {
    let pg = Postgres::start().await;
    conformance::users(&fresh(&pg, "users").await).await;
    conformance::messages(&fresh(&pg, "messages").await).await;
    conformance::files(&fresh(&pg, "files").await).await;

    // Archiving the same message twice (two nodes, a retry) stores it once.
    let s = fresh(&pg, "idem").await;
    let op = conformance::msg("r", 1, "alice", "hello");
    s.write_batch(vec![op.clone(), op.clone()]).await.expect("batch");
    s.write_batch(vec![op]).await.expect("again");
    let r = s.replay("r", 0, 10, 10).await.expect("replay");
    assert_eq!(r.entries.len(), 1);

    // Migrations: nodes starting together migrate once, under a lock.
    let url = pg.url();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url, 2).await.map(Arc::new) })
        })
        .collect();
    for s in starts {
        let s = s.await.expect("join").expect("connect and migrate");
        s.list_users().await.expect("schema in place");
    }
}
