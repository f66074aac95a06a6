//! SIGKILL and restart.

use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::*;
use crate::common::*;

/// Sends `p/quick` requests as bob from `workers` loops until one fails (the process died);
/// the id of every answered request, and when its answer came.
async fn steady_load(url: String, workers: usize, prefix: String) -> Vec<(String, Instant)> {
    let client = http_client();
    let mut loops = Vec::new();
    for w in 0..workers {
        let (client, url, prefix) = (client.clone(), url.clone(), prefix.clone());
        loops.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0.. {
                let id = format!("{prefix}-{w}-{i}");
                let resp = client
                    .post(&url)
                    .bearer_auth(BOB_KEY)
                    .header("x-request-id", &id)
                    .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}]}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let Ok(r) = resp else { break };
                if r.status() != 200 || r.bytes().await.is_err() {
                    break;
                }
                answered.push((id, Instant::now()));
                // Steady, not flooding: a writer that cannot keep up would widen the window.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answered
        }));
    }
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.expect("load loop"));
    }
    all
}

/// SIGKILL with budgeted requests in flight and steady unbudgeted traffic, then a restart:
/// the dead process's reservations expire after `reservation_ttl_secs` and are released or
/// (`expired_reservations = "charge"`) charged at their reserved maximum; the answered requests
/// that have no ledger row are bounded by the ledger's flush window.
async fn sigkill_then_restart(policy: &str) {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(
        &db.url,
        &up,
        2,
        "",
        &format!(
            "[budgets]\nlease_fraction = 0\nreservation_ttl_secs = 3\nsweep_interval_secs = 1\n\
             expired_reservations = \"{policy}\"\n\n{BOB}"
        ),
    );
    let config = write_config(&text);
    let mut p = spawn(&config).await;
    let client = http_client();
    wait_ready(&client, &p).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    put_budget(
        &client,
        &p,
        json!({"scope": "user", "id": alice, "limit_usd": 1000, "period": "total"}),
    )
    .await;
    let url = p.url("/v1/chat/completions");
    let slow: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(http_call(
                client,
                url,
                "p/slow".into(),
                false,
                format!("kill-slow-{policy}-{i}"),
            ))
        })
        .collect();
    eventually(
        SLOW,
        "the budgeted requests to reach the upstream",
        || async { (up.calls() >= slow.len()).then_some(()) },
    )
    .await;
    let reserved = held(&db.url).await;
    assert_eq!((reserved.rows, reserved.leases), (6, 0), "{reserved:?}");
    assert!(reserved.amount > 0);

    let load = tokio::spawn(steady_load(url, 4, format!("kill-{policy}")));
    // Let the load run for a while (answers keep coming: the process is healthy).
    let base = up.calls();
    eventually(SLOW, "steady traffic", || async {
        (up.calls() >= base + 100).then_some(())
    })
    .await;
    // ... for several flush windows, so that most rows have been written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.signal("KILL");
    let killed_at = Instant::now();
    let status = wait_exit(&mut p, SLOW).await;
    assert!(!status.success(), "SIGKILL ends the process: {status:?}");
    let answered = load.await.expect("load");
    for s in slow {
        let seen = s.await.expect("slow request");
        assert!(matches!(seen, Seen::Broken(_)), "{seen:?}");
    }

    let mut again = spawn(&config).await;
    wait_ready(&client, &again).await;
    let ids: Vec<String> = answered.iter().map(|(id, _)| id.clone()).collect();
    let rows = ledger_reasons(&store, &ids).await;
    let lost: Vec<&(String, Instant)> = answered
        .iter()
        .filter(|(id, _)| rows[id].is_empty())
        .collect();
    assert!(rows.values().all(|r| r.len() <= 1), "a row written twice");
    let window = Duration::from_millis(200);
    let last_window = answered
        .iter()
        .filter(|(_, at)| {
            killed_at.saturating_duration_since(*at) <= window + Duration::from_millis(2000)
        })
        .count();
    let oldest_lost = lost
        .iter()
        .map(|(_, at)| killed_at.saturating_duration_since(*at))
        .max()
        .unwrap_or_default();
    eprintln!(
        "SIGKILL figures ({policy}): {} answered, {} without a ledger row (the oldest answered \
         {oldest_lost:?} before the kill; {last_window} answered in the last 2.2 s)",
        answered.len(),
        lost.len()
    );
    assert!(answered.len() >= 100, "steady traffic was answered");
    // Only rows still waiting for their flush (at most `ledger_flush_ms` old, plus the write
    // under way; generous for a loaded CI machine) can be lost.
    assert!(
        oldest_lost <= window + Duration::from_millis(2000),
        "a row older than the flush window was lost ({oldest_lost:?})"
    );

    // The reservations of the dead process expire and are swept by the new one.
    eventually(
        SLOW,
        "the dead process's reservations to be swept",
        || async { (held(&db.url).await.rows == 0).then_some(()) },
    )
    .await;
    let totals = budget_totals(&db.url).await;
    assert_eq!(totals.reserved, 0, "{totals:?}");
    let want_spent = if policy == "charge" {
        reserved.amount
    } else {
        0
    };
    assert_eq!(totals.spent, want_spent, "{policy}: {totals:?}");
    again.signal("TERM");
    assert!(wait_exit(&mut again, SLOW).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_expired_reservations_are_released() {
    sigkill_then_restart("release").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_expired_reservations_are_charged_when_configured() {
    sigkill_then_restart("charge").await;
}
