//! Leasing on a real SQLite file, called step by step where the request path would race.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Knobs;
use crate::clock::Clock;
use crate::config::{BudgetsConfig, RateLimitsConfig};
use crate::core::policy::budget::{Applied, Period, ScopeKind};
use crate::core::policy::Budgets;
use crate::store::Store;

const LIMIT: i64 = 4_000_000;

/// Budgets over a fresh SQLite file holding a user's default budget of `LIMIT` micros in
/// total, and the scope as admission would apply it.
async fn budgets(dir: &tempfile::TempDir) -> (std::sync::Arc<Budgets>, Store, Applied) {
    let url = format!("sqlite://{}", dir.path().join("lease.db").display());
    let clock = Clock::manual();
    let store = Store::connect(&url, 2, clock.clone())
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate");
    store
        .budget_insert_default("user", 1, LIMIT, "total", 0, clock.now_ms())
        .await
        .expect("budget row");
    let budgets = Budgets::start(
        store.clone(),
        clock,
        &BudgetsConfig::default(),
        Family::default(),
        &RateLimitsConfig::default(),
        Counter::default(),
    );
    let applied = Applied {
        key: (ScopeKind::User, 1),
        explicit: false,
        default_limit: Some(LIMIT),
        period: Period::Total,
    };
    (budgets, store, applied)
}

fn knobs() -> Knobs {
    Knobs::of(&BudgetsConfig {
        lease_fraction: 0.5,
        lease_ttl_ms: 60_000,
        ..BudgetsConfig::default()
    })
    .expect("leases on")
}

/// A background refill that runs after its lease was retired (a request found the scope near
/// its limit meanwhile) takes no new lease: that room stays for the requests reserving exactly.
#[tokio::test]
async fn a_refill_after_its_lease_was_retired_leases_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (budgets, store, ap) = budgets(&dir).await;
    assert!(budgets.grant(&ap, 1, knobs()).await.expect("lease"));
    let row = store.budget_get("user", 1).await.unwrap().unwrap();
    assert_eq!(row.reserved_micros, LIMIT / 2, "the first lease: {row:?}");

    budgets.retire(ap.key);
    budgets
        .settler
        .wait_settled(ap.key, std::time::Duration::from_secs(10))
        .await;
    let refilled = budgets.grant(&ap, 0, knobs()).await.expect("refill");

    assert!(!refilled, "a refill with no lease to grow");
    assert_eq!(budgets.leases.unused(&ap.key, row.id, 0), 0);
    let row = store.budget_get("user", 1).await.unwrap().unwrap();
    assert_eq!(row.reserved_micros, 0, "{row:?}");
    assert_eq!(store.budget_reservation_count(row.id).await.unwrap(), 0);
}

/// A live lease mostly held by a request in flight is still refilled in the background.
#[tokio::test]
async fn a_lease_in_use_is_refilled() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (budgets, store, ap) = budgets(&dir).await;
    let admitted = budgets
        .admit_leased(std::slice::from_ref(&ap), LIMIT * 3 / 8, knobs())
        .await;
    assert!(admitted.is_some(), "admitted on a lease");
    // The first lease is half the limit; the refill, half of what is left outside it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let row = store.budget_get("user", 1).await.unwrap().unwrap();
        if row.reserved_micros == LIMIT / 2 + LIMIT / 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not refilled: {row:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let row = store.budget_get("user", 1).await.unwrap().unwrap();
    assert_eq!(store.budget_reservation_count(row.id).await.unwrap(), 1);
}
