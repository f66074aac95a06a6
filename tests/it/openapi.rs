//! `GET /openapi.json` and `tollgate openapi`: the document parses, validates (with
//! `openapi-spec-validator` where the test Python has it; required in CI), lists every route the
//! router serves, and the router serves every method it lists and no other on those paths.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The routes the HTTP API is known to serve; the document must list each (a route dropped
/// from the route table fails here).
const KNOWN: &[(&str, &str)] = &[
    ("post", "/v1/chat/completions"),
    ("post", "/v1/messages"),
    ("post", "/v1/messages/count_tokens"),
    ("post", "/v1/responses"),
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
    ("post", "/v1/authorize"),
    ("get", "/v1/health"),
    ("get", "/v1/aliases"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("post", "/admin/users"),
    ("get", "/admin/users"),
    ("get", "/admin/users/{id}"),
    ("post", "/admin/users/{id}/block"),
    ("post", "/admin/users/{id}/unblock"),
    ("get", "/admin/signup-cap"),
    ("post", "/admin/keys"),
    ("get", "/admin/keys"),
    ("delete", "/admin/keys/{id}"),
    ("get", "/admin/upstream-keys"),
    ("post", "/admin/reload"),
    ("post", "/admin/providers/{provider}/keys/{hint}/enable"),
    ("get", "/admin/budgets"),
    ("put", "/admin/budgets"),
    ("get", "/admin/usage"),
];

const METHODS: &[&str] = &["get", "post", "put", "delete", "patch"];

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            out.insert((method.clone(), path.clone()));
        }
    }
    out
}

/// A concrete URL path for a templated one.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "1" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// Validates with `openapi-spec-validator` under `TOLLGATE_PYTHON`; `false` when that Python
/// lacks it (allowed outside CI).
fn validate_with_python(doc: &Value) -> bool {
    let Ok(python) = std::env::var("TOLLGATE_PYTHON") else {
        assert!(std::env::var("CI").is_err(), "CI sets TOLLGATE_PYTHON");
        return false;
    };
    let has = Command::new(&python)
        .args(["-c", "import openapi_spec_validator"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        assert!(
            std::env::var("CI").is_err(),
            "CI installs openapi-spec-validator into {python}"
        );
        return false;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).expect("write");
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file)
        .output()
        .expect("run openapi_spec_validator");
    assert!(
        out.status.success(),
        "openapi-spec-validator rejects the document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_documents_exactly_the_served_routes() {
    let mut s = TestServer::sqlite(Opts {
        server: "admin_token = \"tg-admin-openapi-0123456789\"".into(),
        ..Opts::default()
    })
    .await;
    let resp = s.client.get(s.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        resp.headers()
    );
    let doc: Value = resp.json().await.expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let ops = operations(&doc);
    for (method, path) in KNOWN {
        assert!(
            ops.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is served but missing from /openapi.json"
        );
    }

    // On every documented path, the documented methods reach a handler (or the admin-token
    // check in front of it), and every other method is 405: nothing is routed beside the table.
    for path in doc["paths"].as_object().unwrap().keys() {
        for method in METHODS {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = s
                .client
                .request(m, s.url(&concrete(path)))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            if ops.contains(&(method.to_string(), path.clone())) {
                assert_ne!(status, 405, "{method} {path} is documented: {body}");
                assert!(
                    !(status == 404 && body.contains("no such route")),
                    "{method} {path} is documented but not routed: {body}"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is served undocumented: {body}"
                );
            }
        }
    }
    // A path nobody serves still falls through to the 404, so the check above can tell.
    let resp = s.client.get(s.url("/v1/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("no such route"));

    // `tollgate openapi` prints the same document.
    let out = blocking(|| Command::new(BIN).arg("openapi").output().expect("run")).await;
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).expect("tollgate openapi prints JSON");
    assert_eq!(printed, doc, "the CLI and the server document differ");

    validate_with_python(&doc);
    s.shutdown().await;
}
