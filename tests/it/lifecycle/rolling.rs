//! A rolling restart of one of two replicas.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::harness::*;
use crate::common::*;

/// Steady traffic across two replicas while one is restarted (SIGTERM, wait for its exit,
/// start it again): every request either gets its answer or a connection refusal before
/// anything reached the gateway (then it is sent to the other replica), and every answered
/// request has exactly one ledger row, no more rows than answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_no_accepted_request_and_no_row() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(&db.url, &up, 4, "shutdown_delay_ms = 500", "");
    let config = write_config(&text);
    let (a, b) = tokio::join!(spawn(&config), spawn(&config));
    let check = http_client();
    wait_ready(&check, &a).await;
    wait_ready(&check, &b).await;
    let urls = Arc::new(std::sync::Mutex::new([
        a.url("/v1/chat/completions"),
        b.url("/v1/chat/completions"),
    ]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A new connection per request, as behind a load balancer that spreads connections: a
    // refused connection is then the only way a request can miss a stopping replica.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
        let model = if w < 2 { "p/quick" } else { "p/slow" };
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("roll-{w}-{i}");
                let mut refusals = 0;
                let seen = loop {
                    let url = urls.lock().unwrap()[(i + refusals) % 2].clone();
                    let seen =
                        http_call(client.clone(), url, model.into(), false, id.clone()).await;
                    if seen != Seen::NotConnected || refusals >= 20 {
                        break seen;
                    }
                    refusals += 1;
                };
                out.push((id, seen));
                i += 1;
            }
            out
        }));
    }
    let base = up.calls();
    eventually(SLOW, "traffic before the restart", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    let mut a = a;
    a.signal("TERM");
    let status = wait_exit(&mut a, SLOW).await;
    assert!(status.success(), "{}", a.log_text());
    let a2 = spawn(&config).await;
    wait_ready(&check, &a2).await;
    urls.lock().unwrap()[0] = a2.url("/v1/chat/completions");
    let base = up.calls();
    eventually(SLOW, "traffic after the restart", || async {
        (up.calls() >= base + 40).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("worker"));
    }
    let mut replicas = [a2, b];
    for p in &mut replicas {
        p.signal("TERM");
    }
    for p in &mut replicas {
        assert!(wait_exit(p, SLOW).await.success(), "{}", p.log_text());
    }
    let bad: Vec<_> = seen.iter().filter(|(_, s)| *s != Seen::Answered).collect();
    assert!(bad.is_empty(), "requests not answered: {bad:?}");
    let ids: Vec<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    let rows = ledger_reasons(&store_of(&db.url).await, &ids).await;
    let wrong: Vec<_> = rows.iter().filter(|(_, r)| r.len() != 1).collect();
    eprintln!(
        "rolling restart figures: {} requests answered, {} with other than one ledger row",
        ids.len(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(ledger_count(&db.url).await.0 as usize, ids.len());
}
