//! Ledger batches round-trip whole: every row of a batch is stored once, in order, with each
//! field as written, whatever the batch's size (SQLite writes whole chunks of rows a statement
//! and the rest a row at a time; PostgreSQL one statement of arrays).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::clock::Clock;
use tollgate::core::ledger::Ledger;
use tollgate::store::{NewLedgerRow, Store};

use crate::common::{Backend, TestDb};

fn row(batch: usize, i: usize) -> NewLedgerRow {
    NewLedgerRow {
        request_id: format!("b{batch}-r{i}"),
        user_id: (!i.is_multiple_of(3)).then_some(i as i64),
        key_id: (i.is_multiple_of(2)).then_some(1000 + i as i64),
        protocol: if i.is_multiple_of(2) { "http" } else { "grpc" },
        requested_model: format!("model-{i}"),
        resolved_model: (i % 4 != 1).then(|| format!("up/model-{i}")),
        service_type: (!i.is_multiple_of(5)).then(|| "default".to_string()),
        purpose: (i.is_multiple_of(7)).then(|| format!("purpose \"{i}\"")),
        stream: i % 3 == 1,
        outcome: "success",
        reason: "",
        prompt_tokens: i as i64,
        completion_tokens: 2 * i as i64,
        cost_micros: 17 * i as i64,
        started_at: 1_700_000_000_000 + i as i64,
        finished_at: 1_700_000_000_500 + i as i64,
        api: "chat_completions",
    }
}

async fn batches_round_trip(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let store = Store::connect(&db.url, 2, Clock::system())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    // Empty, one row, under a chunk, exactly a chunk, chunks and a rest, many chunks.
    for (batch, size) in [0usize, 1, 15, 16, 37, 160].into_iter().enumerate() {
        let rows: Arc<[NewLedgerRow]> = (0..size).map(|i| row(batch, i)).collect();
        store.insert_ledger_rows(&rows).await.expect("insert");
        let mut last_id = i64::MIN;
        for want in rows.iter() {
            let got = store
                .ledger_by_request_id(&want.request_id)
                .await
                .expect("read");
            assert_eq!(
                got.len(),
                1,
                "{backend:?}: batch of {size}, {}",
                want.request_id
            );
            let got = &got[0];
            assert!(got.id > last_id, "{backend:?}: rows stored in batch order");
            last_id = got.id;
            assert_eq!(
                (
                    got.user_id,
                    got.key_id,
                    got.protocol.as_str(),
                    got.requested_model.as_str(),
                    got.resolved_model.as_deref(),
                    got.service_type.as_deref(),
                    got.purpose.as_deref(),
                    got.stream,
                    got.outcome.as_str(),
                    got.reason.as_str(),
                ),
                (
                    want.user_id,
                    want.key_id,
                    want.protocol,
                    want.requested_model.as_str(),
                    want.resolved_model.as_deref(),
                    want.service_type.as_deref(),
                    want.purpose.as_deref(),
                    want.stream,
                    want.outcome,
                    want.reason,
                ),
                "{backend:?}: batch of {size}"
            );
            assert_eq!(
                (
                    got.prompt_tokens,
                    got.completion_tokens,
                    got.cost_micros,
                    got.started_at_ms,
                    got.finished_at_ms,
                    got.api.as_str(),
                ),
                (
                    want.prompt_tokens,
                    want.completion_tokens,
                    want.cost_micros,
                    want.started_at,
                    want.finished_at,
                    want.api,
                ),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_batches_round_trip() {
    batches_round_trip(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledger_batches_round_trip() {
    batches_round_trip(Backend::Postgres).await;
}

/// Polls until every row of `ids` is stored, within `within`.
async fn all_stored(store: &Store, ids: &[String], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let mut stored = 0;
        for id in ids {
            stored += store.ledger_by_request_id(id).await.expect("read").len();
        }
        if stored == ids.len() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The ledger writer writes a batch when it is full, when its linger is up, when a flush asks
/// and when the last handle goes; rows that come faster than batches go in several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_writer_writes_on_each_trigger() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let store = Store::connect(&db.url, 2, Clock::system())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let ids = |batch: usize, n: usize| (0..n).map(|i| format!("b{batch}-r{i}")).collect::<Vec<_>>();

    // A full batch goes at once: the linger is an hour.
    let ledger = Ledger::start(store.clone(), 8, Duration::from_secs(3600));
    for i in 0..8 {
        ledger.record(row(100, i));
    }
    assert!(
        all_stored(&store, &ids(100, 8), Duration::from_secs(20)).await,
        "full batch"
    );
    // Under a batch: a flush writes it.
    for i in 0..3 {
        ledger.record(row(101, i));
    }
    ledger.flush().await;
    assert!(
        all_stored(&store, &ids(101, 3), Duration::ZERO).await,
        "flushed"
    );
    // Many batches' worth at once, then the last handle goes: every row is written.
    let clone = ledger.clone();
    for i in 0..45 {
        clone.record(row(102, i));
    }
    drop(ledger);
    drop(clone);
    assert!(
        all_stored(&store, &ids(102, 45), Duration::from_secs(20)).await,
        "closed"
    );

    // Under a batch with no flush: written once the linger is up.
    let ledger = Ledger::start(store.clone(), 1000, Duration::from_millis(50));
    for i in 0..5 {
        ledger.record(row(103, i));
    }
    assert!(
        all_stored(&store, &ids(103, 5), Duration::from_secs(20)).await,
        "lingered"
    );
}
