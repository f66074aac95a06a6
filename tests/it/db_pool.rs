//! The database pool gives back what a burst opened: connections unused past
//! `database.idle_connection_timeout_secs` are closed, all but one, on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use tollgate::clock::Clock;
use tollgate::store::Store;

use crate::common::{Backend, TestDb};

async fn burst_then_close_idle(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let store = Store::connect(&db.url, 6, Clock::system())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    // Concurrent reads, each taking a connection: the pool opens several. On a loaded host a
    // read's blocking steps can each finish before its task is polled again, so that every read
    // ends before the next starts and one connection serves them all: burst again until the
    // pool has opened more than one, within a deadline.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reads = (0..6).map(|i| {
            let store = store.clone();
            async move { store.ledger_by_request_id(&format!("none-{i}")).await }
        });
        for r in futures_util::future::join_all(reads).await {
            assert!(r.expect("read").is_empty());
        }
        if store.open_connections() >= 2 || Instant::now() > deadline {
            break;
        }
    }
    let opened = store.open_connections();
    assert!(
        opened >= 2,
        "{backend:?}: the bursts opened {opened} connection(s)"
    );

    // None has been unused for a minute: none closes.
    assert_eq!(
        store.close_idle_connections(Duration::from_secs(60)).await,
        0
    );
    assert_eq!(store.open_connections(), opened);

    // Every one is unused for at least no time: all but one close, and the store still works.
    assert_eq!(
        store.close_idle_connections(Duration::ZERO).await,
        opened - 1,
        "{backend:?}"
    );
    assert_eq!(store.open_connections(), 1);
    assert!(store
        .ledger_by_request_id("after")
        .await
        .expect("read after")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_pool_closes_idle_connections_but_one() {
    burst_then_close_idle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pool_closes_idle_connections_but_one() {
    burst_then_close_idle(Backend::Postgres).await;
}
