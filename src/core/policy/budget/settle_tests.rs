//! The settlement writer's batching, on a paused clock: how long a batch is gathered depends
//! on whether anything in it gives budget back.

use std::time::Duration;

use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use super::{Settler, WriteCounter};
use crate::clock::Clock;
use crate::config::BudgetsConfig;
use crate::core::policy::budget::ScopeKind;
use crate::metrics::BudgetWriteLabels;
use crate::store::{Settlement, Store};

const GIVING_BACK: Duration = Duration::from_millis(10);
const CHARGES: Duration = Duration::from_millis(50);

/// A writer on a fresh SQLite file, with settle_batch_ms 10 and charge_batch_ms 50, and the
/// family its batch writes are counted in.
async fn writer(
    dir: &tempfile::TempDir,
) -> (
    Settler,
    Family<BudgetWriteLabels, prometheus_client::metrics::counter::Counter>,
) {
    let url = format!("sqlite://{}", dir.path().join("settle.db").display());
    let store = Store::connect(&url, 2, Clock::system())
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate");
    let config = BudgetsConfig {
        settle_batch_ms: GIVING_BACK.as_millis() as u64,
        charge_batch_ms: CHARGES.as_millis() as u64,
        sweep_interval_secs: 3600,
        ..BudgetsConfig::default()
    };
    let writes = Family::default();
    let settler = Settler::start(
        store,
        Clock::system(),
        &config,
        WriteCounter(writes.clone()),
    );
    (settler, writes)
}

/// What a request admitted on a lease settles: a cost and nothing given back.
fn settlement(reservation_id: &str) -> Settlement {
    Settlement {
        reservation_id: reservation_id.to_string(),
        parts: Vec::new(),
        cost_micros: 0,
        leases: Vec::new(),
        ledger: None,
    }
}

fn batches(
    writes: &Family<BudgetWriteLabels, prometheus_client::metrics::counter::Counter>,
) -> u64 {
    writes
        .get_or_create(&BudgetWriteLabels { kind: "settle" })
        .get()
}

/// Waits for the writer's next batch to be written; returns when, counted from `start`.
async fn next_batch(settler: &Settler, start: Instant) -> Duration {
    let notified = settler.shared.settled.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    notified.await;
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_batch_of_charges_only_is_gathered_for_charge_batch_ms() {
    let dir = tempfile::tempdir().unwrap();
    let (settler, writes) = writer(&dir).await;
    let start = Instant::now();
    let written = {
        let wait = next_batch(&settler, start);
        settler.enqueue(settlement(""), Vec::new());
        settler.enqueue(settlement(""), Vec::new());
        wait.await
    };
    assert_eq!(written, CHARGES, "a batch of charges waits charge_batch_ms");
    assert_eq!(batches(&writes), 1, "both charges went in one batch");
}

#[tokio::test(start_paused = true)]
async fn a_settlement_that_gives_back_cuts_the_batch_to_settle_batch_ms() {
    let dir = tempfile::tempdir().unwrap();
    let (settler, writes) = writer(&dir).await;
    let key = (ScopeKind::User, 7);
    let start = Instant::now();
    let wait = next_batch(&settler, start);
    tokio::pin!(wait);
    settler.enqueue(settlement(""), Vec::new());
    // 5 ms into the charge's batch a reservation's settlement arrives: the batch now goes at
    // 10 ms from its start, not 50, and takes both.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        _ = &mut wait => panic!("the charge was written before its batch was up"),
    }
    settler.enqueue(settlement("r-1"), vec![key]);
    assert_eq!(
        settler.pending(key),
        1,
        "a give-back counts as pending for its scope"
    );
    assert_eq!(wait.await, GIVING_BACK);
    assert_eq!(
        batches(&writes),
        1,
        "the charge and the give-back went in one batch"
    );
    assert_eq!(settler.pending(key), 0);
}

#[tokio::test(start_paused = true)]
async fn a_charge_is_not_pending_for_any_scope() {
    let dir = tempfile::tempdir().unwrap();
    let (settler, _) = writer(&dir).await;
    let key = (ScopeKind::User, 7);
    settler.enqueue(settlement(""), Vec::new());
    assert_eq!(settler.pending(key), 0);
    // So a request that finds no room does not wait for it.
    let start = Instant::now();
    settler.wait_settled(key, Duration::from_secs(2)).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}
