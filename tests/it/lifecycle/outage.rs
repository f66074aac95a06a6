//! The database goes away (or is locked) while serving.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::harness::*;
use crate::common::*;

/// PostgreSQL unreachable for 4 s (a proxy between tollgate and the database drops every
/// connection and refuses new ones) under steady traffic from a budgeted and an unbudgeted
/// user: callers get 503 with a failure reason (never a 500, never a hang past the timeouts),
/// `/readyz` goes 503 and back, tollgate recovers without a restart, the availability counter
/// counts every 503 as a failure, and once the database is back every request has exactly one
/// ledger row and the budget's settlements are all written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_under_load_fails_cleanly_and_loses_nothing() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let rest = db.url.split_once("://").expect("url").1;
    let host_port = rest
        .split_once('@')
        .map_or(rest, |(_, h)| h)
        .split('/')
        .next()
        .expect("host")
        .to_string();
    let proxy = crate::faults::CuttableProxy::start(host_port.clone()).await;
    let via_proxy = db.url.replacen(&host_port, &proxy.addr.to_string(), 1);
    let up = Paced::start().await;
    let text = config_text(
        &via_proxy,
        &up,
        4,
        "",
        &format!("[budgets]\nlease_fraction = 0\n\n{BOB}"),
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

    let traffic = SteadyTraffic::start(&client, &p, "outage");
    let base = up.calls();
    eventually(SLOW, "traffic before the outage", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    proxy.cut();
    eventually(SLOW, "/readyz to answer 503 during the outage", || async {
        (readyz(&client, &p).await == Some(503)).then_some(())
    })
    .await;
    // The outage lasts a few seconds of steady traffic.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    let restored_at = Instant::now();
    let recovered = eventually(
        SLOW,
        "a budgeted request to succeed after the outage",
        || async {
            let (status, _) = send_fixed(
                &client,
                &p,
                &fixed_body("p/quick", 1, 5),
                &format!("outage-probe-{}", now_ms()),
            )
            .await;
            (status == 200).then(|| restored_at.elapsed())
        },
    )
    .await;
    eventually(SLOW, "/readyz to answer 200 again", || async {
        (readyz(&client, &p).await == Some(200)).then_some(())
    })
    .await;
    let base = up.calls();
    eventually(SLOW, "traffic after the outage", || async {
        (up.calls() >= base + 20).then_some(())
    })
    .await;
    let seen = traffic.stop().await;
    let metrics = client
        .get(p.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    p.signal("TERM");
    assert!(wait_exit(&mut p, SLOW).await.success(), "{}", p.log_text());

    let refused: Vec<_> = seen.iter().filter(|(_, (s, _), _)| *s != 200).collect();
    let bad: Vec<_> = refused
        .iter()
        .filter(|(_, (s, code), _)| {
            *s != 503
                || ![
                    "policy_unavailable",
                    "provisioning_failure",
                    "auth_system_failure",
                ]
                .contains(&code.as_str())
        })
        .collect();
    assert!(bad.is_empty(), "not a clean 503: {bad:?}");
    let slowest = seen.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
    let mut reasons: HashMap<&str, usize> = HashMap::new();
    for (_, (_, code), _) in &refused {
        *reasons.entry(code.as_str()).or_default() += 1;
    }
    eprintln!(
        "outage figures: {} requests, {} refused during the outage {reasons:?}, slowest answer \
         {slowest:?}, recovered {recovered:?} after the database returned",
        seen.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "the outage was seen by callers");
    assert!(
        slowest < Duration::from_secs(15),
        "a request hung: {slowest:?}"
    );
    let failures = metric_value(&metrics, AVAILABILITY, &[("outcome", "failure")]);
    assert_eq!(
        failures as usize,
        refused.len(),
        "every refusal counted as a failure"
    );

    let ids: Vec<String> = seen.iter().map(|(id, _, _)| id.clone()).collect();
    let rows = ledger_reasons(&store, &ids).await;
    let wrong: Vec<_> = rows.iter().filter(|(_, r)| r.len() != 1).collect();
    assert!(
        wrong.is_empty(),
        "requests without exactly one row: {wrong:?}"
    );
    let totals = budget_totals(&db.url).await;
    assert_eq!(totals.reserved, 0, "every settlement written: {totals:?}");
    assert_eq!(held(&db.url).await.rows, 0);
}

/// SQLite busy: another connection holds an exclusive lock on the database file for 3 s under
/// steady budgeted traffic. Requests wait for the lock (`busy_timeout`) or are refused with a
/// 503 failure reason, never a 500 and never past the timeouts; once the lock is gone every
/// request has exactly one ledger row and nothing stays reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_process_fails_cleanly_and_loses_nothing() {
    let db = TestDb::sqlite();
    let file = db.dir().unwrap().join("tollgate-test.db");
    let up = Paced::start().await;
    let text = config_text(
        &db.url,
        &up,
        4,
        "",
        &format!("[budgets]\nlease_fraction = 0\n\n{BOB}"),
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
    let traffic = SteadyTraffic::start(&client, &p, "locked");
    let base = up.calls();
    eventually(SLOW, "traffic before the lock", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let lock = std::thread::spawn(move || {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = diesel::SqliteConnection::establish(file.to_str().unwrap()).expect("open");
        conn.batch_execute("PRAGMA busy_timeout = 10000; BEGIN EXCLUSIVE;")
            .expect("exclusive lock");
        let _ = locked_tx.send(());
        // The outage: the lock is held this long.
        std::thread::sleep(Duration::from_secs(3));
        conn.batch_execute("COMMIT;").expect("unlock");
    });
    locked_rx.await.expect("locked");
    blocking(move || lock.join().expect("lock thread")).await;
    let base = up.calls();
    eventually(SLOW, "traffic after the lock", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    let seen = traffic.stop().await;
    p.signal("TERM");
    assert!(wait_exit(&mut p, SLOW).await.success(), "{}", p.log_text());
    let refused: Vec<_> = seen.iter().filter(|(_, (s, _), _)| *s != 200).collect();
    let bad: Vec<_> = refused
        .iter()
        .filter(|(_, (s, code), _)| {
            *s != 503
                || ![
                    "policy_unavailable",
                    "provisioning_failure",
                    "auth_system_failure",
                ]
                .contains(&code.as_str())
        })
        .collect();
    let slowest = seen.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
    eprintln!(
        "SQLite lock figures: {} requests, {} refused, slowest answer {slowest:?}",
        seen.len(),
        refused.len()
    );
    assert!(bad.is_empty(), "not a clean 503: {bad:?}");
    assert!(
        slowest < Duration::from_secs(15),
        "a request hung: {slowest:?}"
    );
    assert!(
        slowest > Duration::from_secs(1),
        "the lock was felt: {slowest:?}"
    );
    let ids: Vec<String> = seen.iter().map(|(id, _, _)| id.clone()).collect();
    let rows = ledger_reasons(&store, &ids).await;
    let wrong: Vec<_> = rows.iter().filter(|(_, r)| r.len() != 1).collect();
    assert!(
        wrong.is_empty(),
        "requests without exactly one row: {wrong:?}"
    );
    let budget = store
        .budget_get("user", alice)
        .await
        .expect("budget row")
        .expect("alice's budget");
    assert_eq!(
        budget.reserved_micros, 0,
        "every settlement written: {budget:?}"
    );
    assert_eq!(
        store
            .budget_reservation_count(budget.id)
            .await
            .expect("count"),
        0
    );
}

/// What one request of the steady traffic saw: its id, (status, error code; 0 and the client
/// error when it got no answer), and how long it took.
type Seen = (String, (u16, String), Duration);

/// Four workers sending budgeted (alice) and unbudgeted (bob) requests, 20 ms apart each:
/// steady, not flooding, so that an outage does not fill the machine.
struct SteadyTraffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Seen>>>,
}

impl SteadyTraffic {
    fn start(
        client: &reqwest::Client,
        p: &crate::common::process::Process,
        prefix: &'static str,
    ) -> SteadyTraffic {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..4usize)
            .map(|w| {
                let (client, url, stop) =
                    (client.clone(), p.url("/v1/chat/completions"), stop.clone());
                let key = if w % 2 == 0 { ALICE_KEY } else { BOB_KEY };
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let id = format!("{prefix}-{w}-{i}");
                        i += 1;
                        let start = Instant::now();
                        let resp = client
                            .post(&url)
                            .bearer_auth(key)
                            .header("x-request-id", &id)
                            .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
                            .timeout(Duration::from_secs(30))
                            .send()
                            .await;
                        let seen = match resp {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let v: Value = r.json().await.unwrap_or(Value::Null);
                                (status, v["error"]["code"].as_str().unwrap_or("").to_string())
                            }
                            Err(e) => (0, format!("{e:?}")),
                        };
                        out.push((id, seen, start.elapsed()));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    out
                })
            })
            .collect();
        SteadyTraffic { stop, workers }
    }

    /// Stops the workers; every request they sent.
    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        let mut seen = Vec::new();
        for w in self.workers {
            seen.extend(w.await.expect("worker"));
        }
        seen
    }
}
