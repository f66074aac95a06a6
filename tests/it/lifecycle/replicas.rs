//! Two replicas as two processes on one fresh database.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::harness::*;
use crate::common::*;

/// Two processes started at the same moment on a fresh database (their migrations race);
/// 100 concurrent budgeted requests across both, room for exactly 10: 10 answers, 90
/// `budget_exceeded`, and the budget spent exactly what the ledger charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_race_migrations_and_share_one_budget_exactly() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let text = config_text(&db.url, &up, 2, "", "[budgets]\nlease_fraction = 0\n");
    let config = write_config(&text);
    let (a, b) = tokio::join!(spawn(&config), spawn(&config));
    let mut replicas = [a, b];
    let client = http_client();
    for p in &replicas {
        wait_ready(&client, p).await;
    }
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    let max = max_cost(20);
    put_budget(
        &client,
        &replicas[0],
        json!({"scope": "user", "id": alice, "limit_usd": (10 * max) as f64 / 1e6, "period": "total"}),
    )
    .await;
    let mut tasks = Vec::new();
    for n in 0..100 {
        let client = client.clone();
        let url = replicas[n % 2].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(ALICE_KEY)
                .header("x-request-id", format!("replica-budget-{n:03}"))
                .json(&fixed_body("p/slow", n, 20))
                .send()
                .await
                .expect("chat request");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }));
    }
    let mut seen: HashMap<(u16, String), usize> = HashMap::new();
    for t in tasks {
        *seen.entry(t.await.expect("task")).or_default() += 1;
    }
    assert_eq!(seen.get(&(200, String::new())), Some(&10), "{seen:?}");
    assert_eq!(
        seen.get(&(429, "budget_exceeded".into())),
        Some(&90),
        "{seen:?}"
    );
    for p in &mut replicas {
        p.signal("TERM");
    }
    for p in &mut replicas {
        assert!(wait_exit(p, SLOW).await.success(), "{}", p.log_text());
    }
    let (rows, cost) = ledger_count(&db.url).await;
    assert_eq!(rows, 100, "one row per request");
    let totals = budget_totals(&db.url).await;
    assert_eq!((totals.spent, totals.reserved), (cost, 0));
    assert!(totals.spent <= 10 * max);
}

/// A replica holding a lease is killed: its lease keeps that room from the other replica until
/// `lease_ttl_ms`, then the other replica gets the whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_of_a_killed_replica_is_reclaimed_after_its_ttl() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let leasing = config_text(
        &db.url,
        &up,
        2,
        "",
        "[budgets]\nlease_fraction = 0.5\nlease_min_remaining_fraction = 0.1\nlease_ttl_ms = 3000\n",
    );
    let exact = config_text(&db.url, &up, 2, "", "[budgets]\nlease_fraction = 0\n");
    let (c1, c2) = (write_config(&leasing), write_config(&exact));
    let (mut r1, mut r2) = tokio::join!(spawn(&c1), spawn(&c2));
    let client = http_client();
    wait_ready(&client, &r1).await;
    wait_ready(&client, &r2).await;
    let store = store_of(&db.url).await;
    let alice = store.find_user("alice").await.unwrap().expect("alice").id;
    // A request needing 70% of the limit: it fits only if the dead replica's lease (half of
    // the room) is back.
    let big = max_cost(200);
    let limit = big * 10 / 7;
    put_budget(
        &client,
        &r1,
        json!({"scope": "user", "id": alice, "limit_usd": limit as f64 / 1e6, "period": "total"}),
    )
    .await;
    let (status, v) = send_fixed(&client, &r1, &fixed_body("p/quick", 1, 1), "lease-warm").await;
    assert_eq!(status, 200, "{v}");
    let lease = held(&db.url).await;
    assert_eq!(lease.leases, 1, "{lease:?}");
    assert!(
        lease.amount > limit - big,
        "the lease holds what the big request needs: {lease:?}"
    );
    r1.signal("KILL");
    wait_exit(&mut r1, SLOW).await;
    let killed_at = Instant::now();
    let (status, v) = send_fixed(&client, &r2, &fixed_body("p/quick", 2, 200), "lease-early").await;
    if killed_at.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (429, Some("budget_exceeded")),
            "{v}"
        );
    }
    let reclaimed = eventually(
        SLOW,
        "the big request to fit after the lease TTL",
        || async {
            let (status, _) =
                send_fixed(&client, &r2, &fixed_body("p/quick", 3, 200), "lease-late").await;
            (status == 200).then(|| killed_at.elapsed())
        },
    )
    .await;
    eprintln!("lease figures: the killed replica's lease came back {reclaimed:?} after SIGKILL (lease_ttl_ms = 3000)");
    assert!(
        reclaimed >= Duration::from_millis(1500),
        "not before the TTL: {reclaimed:?}"
    );
    assert_eq!(held(&db.url).await.leases, 0);
    r2.signal("TERM");
    assert!(wait_exit(&mut r2, SLOW).await.success());
}

/// The signup cap on two processes started at the same moment on a fresh database:
/// `signup_cap_per_day = 20`, 80 concurrent first requests of 80 new JWT identities across both
/// replicas: exactly 20 answered, 60 `signup_cap_exceeded`, exactly 20 users created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_signup_cap() {
    use crate::common::auth_servers::{good_jwt, jwt_table, JwksServer, Mode};
    let jwks = JwksServer::start(Mode::Healthy).await;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let up = Paced::start().await;
    let extra = format!(
        "{}[service_types.capped]\nmodels = [\"*\"]\nsignup_cap_per_day = 20\n",
        jwt_table(&jwks.url(), "")
    );
    let config = write_config(&config_text(&db.url, &up, 2, "", &extra));
    let (a, b) = tokio::join!(spawn(&config), spawn(&config));
    let mut replicas = [a, b];
    let client = http_client();
    for p in &replicas {
        wait_ready(&client, p).await;
    }
    let mut tasks = Vec::new();
    for i in 0..80 {
        let client = client.clone();
        let url = replicas[i % 2].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(good_jwt(&format!("replica-cap-{i}")))
                .header("x-tollgate-service-type", "capped")
                .header("x-request-id", format!("replica-cap-{i}"))
                .json(&json!({"model": "p/quick", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .expect("chat request");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }));
    }
    let mut seen: HashMap<(u16, String), usize> = HashMap::new();
    for t in tasks {
        *seen.entry(t.await.expect("task")).or_default() += 1;
    }
    assert_eq!(seen.get(&(200, String::new())), Some(&20), "{seen:?}");
    assert_eq!(
        seen.get(&(403, "signup_cap_exceeded".into())),
        Some(&60),
        "{seen:?}"
    );
    use diesel_async::RunQueryDsl;
    let users: Count =
        diesel::sql_query("SELECT COUNT(*)::BIGINT AS n FROM users WHERE service_type = 'capped'")
            .get_result(&mut pg(&db.url).await)
            .await
            .expect("count users");
    assert_eq!(users.n, 20);
    for p in &mut replicas {
        p.signal("TERM");
    }
    for p in &mut replicas {
        assert!(wait_exit(p, SLOW).await.success(), "{}", p.log_text());
    }
    assert_eq!(ledger_count(&db.url).await.0, 80, "one row per request");
}
