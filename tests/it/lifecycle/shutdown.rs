//! SIGTERM under load.

use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::*;
use crate::common::*;

/// SIGTERM while non-streamed requests and streams are in flight on both protocols, with a
/// budget leased by the replica: `/readyz` turns 503 at once, requests and streams that fit in
/// the grace period finish, streams that do not end with an error event (a gRPC status) and are
/// recorded, the process exits 0, every request has exactly one ledger row, the lease is back
/// in the budget (no reservation row left, nothing reserved, spent = the ledger's cost), and a
/// restart on the same database duplicates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_records_and_returns_leases() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(
        &db.url,
        &up,
        4,
        "shutdown_delay_ms = 1000",
        "[budgets]\nlease_fraction = 0.1\nlease_ttl_ms = 30000\n",
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
    // One request first, so that the replica holds a lease when the load comes.
    let warm = http_call(
        client.clone(),
        p.url("/v1/chat/completions"),
        "p/quick".into(),
        false,
        "life-warm".into(),
    )
    .await;
    assert_eq!(warm, Seen::Answered);
    let before = held(&db.url).await;
    assert!(
        before.leases >= 1 && before.amount > 0,
        "a lease is held: {before:?}"
    );

    // (protocol, model, stream, how many)
    let mix: [(&str, &str, bool, usize); 6] = [
        ("http", "p/slow", false, 24),
        ("http", "p/short", true, 6),
        ("http", "p/long", true, 4),
        ("grpc", "p/slow", false, 10),
        ("grpc", "p/short", true, 3),
        ("grpc", "p/long", true, 3),
    ];
    let mut tasks = Vec::new();
    let mut ids = vec!["life-warm".to_string()];
    for (proto, model, stream, n) in mix {
        for i in 0..n {
            let id = format!("life-{proto}-{}-{i}", model.trim_start_matches("p/"));
            ids.push(id.clone());
            let (client, url, grpc) = (client.clone(), p.url("/v1/chat/completions"), p.grpc);
            let model = model.to_string();
            tasks.push(tokio::spawn(async move {
                let seen = match proto {
                    "http" => http_call(client, url, model.clone(), stream, id.clone()).await,
                    _ => grpc_call(grpc, model.clone(), stream, id.clone()).await,
                };
                (id, model, seen)
            }));
        }
    }
    let sent = ids.len();
    // Every request has reached the upstream: all of them are in flight.
    eventually(SLOW, "every request to reach the upstream", || async {
        (up.calls() >= sent).then_some(())
    })
    .await;
    p.signal("TERM");
    let term_at = Instant::now();
    eventually(
        Duration::from_secs(1),
        "/readyz to answer 503 after SIGTERM",
        || async { (readyz(&client, &p).await == Some(503)).then_some(()) },
    )
    .await;
    let status = wait_exit(&mut p, SLOW).await;
    let exit_after = term_at.elapsed();
    assert!(status.success(), "exit status {status:?}\n{}", p.log_text());
    let mut answered = 0;
    for t in tasks {
        let (id, model, seen) = t.await.expect("request task");
        if model == "p/long" {
            assert_eq!(seen, Seen::StreamError("internal_error".into()), "{id}");
        } else {
            assert_eq!(
                seen,
                Seen::Answered,
                "{id} finishes within the grace period"
            );
            answered += 1;
        }
    }
    let rows = ledger_reasons(&store, &ids).await;
    let lost: Vec<_> = rows
        .iter()
        .filter(|(_, r)| r.is_empty())
        .map(|(id, _)| id)
        .collect();
    let doubled: Vec<_> = rows.iter().filter(|(_, r)| r.len() > 1).collect();
    eprintln!(
        "SIGTERM figures: {} requests in flight at SIGTERM ({answered} answered, {} streams \
         cut), exit after {exit_after:?}, ledger rows lost: {}",
        sent - 1,
        sent - 1 - answered,
        lost.len()
    );
    assert!(lost.is_empty(), "requests without a ledger row: {lost:?}");
    assert!(
        doubled.is_empty(),
        "requests with more than one row: {doubled:?}"
    );
    for (id, reasons) in &rows {
        let want = if id.contains("-long-") {
            "internal_error"
        } else {
            "success"
        };
        assert_eq!(reasons, &vec![want.to_string()], "{id}");
    }
    // The lease went back: no reservation row is left and nothing is reserved; what was spent
    // is exactly what the ledger charged.
    assert_eq!(
        held(&db.url).await,
        Held {
            rows: 0,
            leases: 0,
            amount: 0
        }
    );
    let totals = budget_totals(&db.url).await;
    let (ledger_rows, ledger_cost) = ledger_count(&db.url).await;
    assert_eq!(ledger_rows as usize, sent);
    assert_eq!(totals.reserved, 0, "{totals:?}");
    assert_eq!(totals.spent, ledger_cost, "{totals:?}");

    // A restart on the same database duplicates nothing.
    let mut again = spawn(&config).await;
    wait_ready(&client, &again).await;
    again.signal("TERM");
    let status = wait_exit(&mut again, SLOW).await;
    assert!(status.success(), "{}", again.log_text());
    assert_eq!(ledger_count(&db.url).await, (ledger_rows, ledger_cost));
    assert_eq!(ledger_reasons(&store, &ids).await, rows);
}

/// SIGTERM the moment the server says it is listening, before anything has asked whether it is
/// ready (an orchestrator replacing a replica that has only just started), is a graceful stop,
/// not the signal's default action: the handlers are installed before the server serves. They
/// were installed after it, and on a loaded machine the restart in the test above, signalled
/// as soon as it was ready, was killed (2 runs in 6 beside three CPU hogs); on an idle one that
/// window is too short to hit reliably, so this guards the order rather than reproducing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_start_is_a_graceful_stop() {
    let db = TestDb::sqlite();
    let up = Paced::start().await;
    let config = write_config(&config_text(&db.url, &up, 2, "", ""));
    for attempt in 0..10 {
        // `spawn` returns as soon as the "listening" line is logged.
        let mut p = spawn(&config).await;
        p.signal("TERM");
        let status = wait_exit(&mut p, SLOW).await;
        let log = p.log_text();
        assert!(status.success(), "attempt {attempt}: {status:?}\n{log}");
        assert!(
            log.contains("shutdown signal received") && log.contains("tollgate stopped"),
            "attempt {attempt}: {log}"
        );
    }
}
