//! The HTTP admin API names users by id or external id (as the CLI does), answers malformed
//! bodies, queries and ids in its own error shape, and answers 404 for every id that does not
//! exist (gRPC: NOT_FOUND), reads included.

use reqwest::Method;
use serde_json::{json, Value};
use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::{GetBudgetRequest, ListApiKeysRequest, QueryUsageRequest};
use tonic::Code;

use crate::common::*;

const TOKEN: &str = "tg-admin-admin-api-0123456789";

async fn server() -> TestServer {
    TestServer::sqlite(Opts {
        server: format!("admin_token = \"{TOKEN}\""),
        ..Opts::default()
    })
    .await
}

/// Sends an admin request; answers the status and the JSON body (every admin answer is JSON).
async fn call(s: &TestServer, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = s.client.request(method, s.url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    send(req, path).await
}

async fn send(req: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    assert!(
        ct.starts_with("application/json"),
        "{what}: {status} {ct}: {text}"
    );
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    (status, v)
}

/// The admin error shape with `code`, and a message in the API's words (no Rust type names,
/// no axum phrasing).
fn assert_admin_error(what: &str, status: u16, v: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{what}: {v}");
    assert_eq!(v["error"]["type"], "admin_error", "{what}: {v}");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    let message = v["error"]["message"].as_str().expect("a message");
    for raw in ["i64", "Failed to", "target type", "Cannot parse"] {
        assert!(!message.contains(raw), "{what}: raw message {message:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_by_external_id_and_unknown_ids_are_404() {
    let mut s = server().await;
    let (st, carol) = call(
        &s,
        Method::POST,
        "/admin/users",
        Some(json!({"external_id": "ext-carol"})),
    )
    .await;
    assert_eq!(st, 201, "{carol}");
    let id = carol["id"].as_i64().unwrap();

    // By external id wherever a user is named.
    for path in [
        "/admin/users/ext-carol".to_string(),
        format!("/admin/users/{id}"),
    ] {
        let (st, v) = call(&s, Method::GET, &path, None).await;
        assert_eq!((st, &v["id"]), (200, &json!(id)), "{path}: {v}");
    }
    let (st, v) = call(
        &s,
        Method::POST,
        "/admin/users/ext-carol/block",
        Some(json!({"reason": "test"})),
    )
    .await;
    assert_eq!((st, &v["blocked"]), (200, &json!(true)), "{v}");
    let (st, v) = call(&s, Method::POST, "/admin/users/ext-carol/unblock", None).await;
    assert_eq!((st, &v["blocked"]), (200, &json!(false)), "{v}");
    let (st, key) = call(
        &s,
        Method::POST,
        "/admin/keys",
        Some(json!({"user_id": "ext-carol", "name": "k"})),
    )
    .await;
    assert_eq!(st, 201, "{key}");
    let key_id = key["id"].as_i64().unwrap();
    let (st, v) = call(&s, Method::GET, "/admin/keys?user_id=ext-carol", None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"][0]["id"], key_id, "{v}");
    assert_eq!(v["data"][0]["user_id"], id, "{v}");
    let (st, v) = call(
        &s,
        Method::PUT,
        "/admin/budgets",
        Some(json!({"scope": "user", "id": "ext-carol", "limit_usd": 2, "period": "daily"})),
    )
    .await;
    assert_eq!((st, &v["id"]), (200, &json!(id)), "{v}");
    let (st, v) = call(
        &s,
        Method::GET,
        "/admin/budgets?scope=user&id=ext-carol",
        None,
    )
    .await;
    assert_eq!((st, &v["limit_usd"]), (200, &json!("2.000000")), "{v}");
    // A key with no budget of its own is found, and says so with nulls.
    let (st, v) = call(
        &s,
        Method::GET,
        &format!("/admin/budgets?scope=key&id={key_id}"),
        None,
    )
    .await;
    assert_eq!((st, &v["limit_usd"]), (200, &Value::Null), "{v}");
    let (st, v) = call(&s, Method::GET, "/admin/usage?user_id=ext-carol", None).await;
    assert_eq!((st, &v["user_id"]), (200, &json!(id)), "{v}");

    // Unknown ids: 404 everywhere, reads too.
    let unknown: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/admin/users/nobody", None),
        (Method::GET, "/admin/users/987654", None),
        (Method::GET, "/admin/users?external_id=nobody", None),
        (Method::POST, "/admin/users/nobody/block", None),
        (Method::POST, "/admin/users/987654/unblock", None),
        (
            Method::POST,
            "/admin/keys",
            Some(json!({"user_id": 987654})),
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(json!({"user_id": "nobody"})),
        ),
        (Method::GET, "/admin/keys?user_id=nobody", None),
        (Method::GET, "/admin/keys?user_id=987654", None),
        (Method::DELETE, "/admin/keys/987654", None),
        (Method::GET, "/admin/budgets?scope=user&id=987654", None),
        (Method::GET, "/admin/budgets?scope=user&id=nobody", None),
        (Method::GET, "/admin/budgets?scope=key&id=987654", None),
        (
            Method::PUT,
            "/admin/budgets",
            Some(json!({"scope": "user", "id": "nobody", "rpm": 5})),
        ),
        (Method::GET, "/admin/usage?user_id=nobody", None),
        (Method::GET, "/admin/usage?key_id=987654", None),
        (Method::POST, "/admin/providers/nope/keys/x/enable", None),
    ];
    for (method, path, body) in unknown {
        let what = format!("{method} {path} {body:?}");
        let (st, v) = call(&s, method, path, body).await;
        assert_admin_error(&what, st, &v, 404, "not_found");
    }

    // Malformed bodies, queries and ids: 400 in the admin shape, saying what is wrong.
    let url = s.url("/admin/users");
    let cases: Vec<(&str, reqwest::RequestBuilder, &str)> = vec![
        (
            "not JSON",
            s.client
                .post(&url)
                .header("content-type", "application/json")
                .body("{not json"),
            "not valid JSON",
        ),
        (
            "no content type",
            s.client.post(&url).body("{\"external_id\": \"x\"}"),
            "Content-Type",
        ),
        (
            "missing field",
            s.client.post(&url).json(&json!({"name": "x"})),
            "external_id",
        ),
        (
            "wrong type",
            s.client
                .post(s.url("/admin/keys"))
                .json(&json!({"user_id": true})),
            "user_id",
        ),
        (
            "unknown budget field",
            s.client
                .put(s.url("/admin/budgets"))
                .json(&json!({"scope": "user", "id": id, "limit": 1})),
            "limit",
        ),
        (
            "key id not a number",
            s.client.delete(s.url("/admin/keys/abc")),
            "abc",
        ),
        (
            "budget key id not a number",
            s.client.get(s.url("/admin/budgets?scope=key&id=abc")),
            "abc",
        ),
        (
            "limit",
            s.client.get(s.url("/admin/users?limit=ten")),
            "limit",
        ),
        (
            "usage key_id",
            s.client.get(s.url("/admin/usage?key_id=abc")),
            "key_id",
        ),
        (
            "missing user_id",
            s.client.get(s.url("/admin/keys")),
            "user_id",
        ),
    ];
    for (what, req, names) in cases {
        let (st, v) = send(req.bearer_auth(TOKEN), what).await;
        assert_admin_error(what, st, &v, 400, "invalid_request");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{what}: {message:?} names {names}");
    }

    // gRPC: the same reads of unknown ids are NOT_FOUND.
    let mut admin = AdminClient::connect(format!("http://{}", s.grpc_addr))
        .await
        .expect("gRPC connect");
    let authed = |msg| {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        r
    };
    for (scope, id) in [("user", 987654), ("key", 987654)] {
        let st = admin
            .get_budget(authed(GetBudgetRequest {
                scope: scope.into(),
                id,
            }))
            .await
            .expect_err("unknown id");
        assert_eq!(st.code(), Code::NotFound, "{scope} {id}: {st:?}");
    }
    let mut r = tonic::Request::new(ListApiKeysRequest { user_id: 987654 });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let st = admin.list_api_keys(r).await.expect_err("unknown user");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    let mut r = tonic::Request::new(QueryUsageRequest {
        user_id: Some(987654),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let st = admin.query_usage(r).await.expect_err("unknown user");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    // A known id still answers.
    let budget = admin
        .get_budget(authed(GetBudgetRequest {
            scope: "user".into(),
            id,
        }))
        .await
        .expect("carol's budget")
        .into_inner();
    assert_eq!(budget.limit_micros, Some(2_000_000));
    s.shutdown().await;
}
