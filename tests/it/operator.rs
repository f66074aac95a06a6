//! The operator's view (issue 7), checked against a real gateway:
//!
//! - the Grafana dashboard (`deploy/grafana/dashboards/tollgate.json`) parses, is wired to the
//!   provisioned data source, and every metric its queries name is exported by tollgate, with
//!   samples, in a live `/metrics` scrape after a few requests of several kinds;
//! - the live scrape passes `promtool check metrics` (help text, naming, units); promtool is
//!   required when `CI` is set, skipped with a notice otherwise;
//! - no label grows without bound: 1000 chat requests (HTTP and gRPC) with random model,
//!   service type and purpose strings, plus random HTTP paths and gRPC methods, add a small,
//!   fixed set of series (only `unknown`-style values) and no random string reaches a label.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use crate::common::auth_servers::{good_jwt, jwt_table, JwksServer, Mode};
use crate::common::*;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tollgate::proto::{CompleteRequest, CompleteResponse};

const DASHBOARD: &str = include_str!("../../deploy/grafana/dashboards/tollgate.json");
const DATASOURCES: &str =
    include_str!("../../deploy/grafana/provisioning/datasources/prometheus.yml");
const DASHBOARD_PROVIDER: &str =
    include_str!("../../deploy/grafana/provisioning/dashboards/tollgate.yml");

/// Families the dashboard must show (the issue's list); a dashboard edit that drops one fails.
const REQUIRED_ON_DASHBOARD: &[&str] = &[
    "tollgate_chat_availability_total",
    "tollgate_requests_total",
    "tollgate_chat_completion_latency_seconds_bucket",
    "tollgate_chat_completion_ttft_seconds_bucket",
    "tollgate_chat_tokens_total",
    "tollgate_spend_usd_total",
    "tollgate_key_pool_state",
    "tollgate_key_pool_exhaustions_total",
    "tollgate_provider_healthy",
    "tollgate_fallback_total",
    "tollgate_signups_total",
    "tollgate_config_reloads_total",
];

// ---------------------------------------------------------------------------------------------
// dashboard parsing

/// Every PromQL text of the dashboard: panel targets (`expr`) and variable queries.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

/// Metric names (`tollgate_...`) in a PromQL expression; quoted strings are skipped, and
/// recording rules (`tollgate:...`) are not metric names.
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if ident(c) && !c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("tollgate_") {
                out.insert(word);
            }
            continue;
        }
        i += 1;
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    let mut names = BTreeSet::new();
    metric_names(
        r#"histogram_quantile(0.95, sum by (model, le) (rate(tollgate_chat_completion_ttft_seconds_bucket{job=~"$job", model!="tollgate_not_a_metric"}[$__rate_interval]))) / tollgate:slo_objective:ratio + on() tollgate_build_info"#,
        &mut names,
    );
    let names: Vec<_> = names.into_iter().collect();
    assert_eq!(
        names,
        [
            "tollgate_build_info",
            "tollgate_chat_completion_ttft_seconds_bucket"
        ]
    );
}

/// The dashboard's structure: panels with queries, unique ids, the provisioned data source.
fn check_dashboard_shape(dash: &Value) {
    assert!(
        dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "the dashboard needs a fixed uid (links, provisioning)"
    );
    assert!(dash["title"].is_string(), "dashboard title");
    let panels = dash["panels"].as_array().expect("dashboard.panels");
    assert!(
        panels.len() >= 20,
        "suspiciously few panels: {}",
        panels.len()
    );
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("panel {title} has no id"));
        assert!(ids.insert(id), "panel id {id} is used twice");
        let pos = &p["gridPos"];
        let (x, w) = (pos["x"].as_i64().unwrap(), pos["w"].as_i64().unwrap());
        assert!(
            x >= 0 && w > 0 && x + w <= 24,
            "panel {title}: gridPos {pos}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title} must use the datasource variable"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title}: targets"));
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "panel {title}: empty expr");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "panel {title}: unbalanced parentheses in {expr}"
            );
        }
    }
    // The datasource variable defaults to the provisioned data source.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    let uid = ds["current"]["value"].as_str().expect("datasource default");
    assert!(
        DATASOURCES.contains(&format!("uid: {uid}")),
        "datasource variable defaults to {uid}, which deploy/grafana/provisioning does not define"
    );
    let objective = vars
        .iter()
        .find(|v| v["name"] == "objective")
        .expect("an `objective` variable");
    assert_eq!(
        objective["current"]["value"], "0.995",
        "default objective 99.5%"
    );
    assert!(
        DASHBOARD_PROVIDER.contains("/etc/grafana/dashboards"),
        "the dashboard provider reads the directory docker-compose mounts"
    );
}

// ---------------------------------------------------------------------------------------------
// scrape parsing

/// `# TYPE` declarations of a scrape: family name -> type.
fn declared_families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut it = rest.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// Checks that `name` (as a query names it) belongs to an exported family of the right type;
/// returns a complaint otherwise.
fn exported(name: &str, families: &BTreeMap<String, String>) -> Result<(), String> {
    let family_of = |suffix: &str, ty: &str| -> Option<bool> {
        let base = name.strip_suffix(suffix)?;
        Some(families.get(base).is_some_and(|t| t == ty))
    };
    let ok = family_of("_bucket", "histogram") == Some(true)
        || family_of("_sum", "histogram") == Some(true)
        || family_of("_count", "histogram") == Some(true)
        || family_of("_total", "counter") == Some(true)
        // Prometheus text format names counters as their samples.
        || families.get(name).is_some_and(|t| t == "counter" && name.ends_with("_total"))
        || families
            .get(name)
            .is_some_and(|t| t == "gauge" || t == "unknown" || t == "untyped");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name}: no such family of that type in /metrics (declared: {:?})",
            families
                .keys()
                .filter(|f| name.starts_with(f.as_str()))
                .collect::<Vec<_>>()
        ))
    }
}

/// Distinct series per sample name (`le` and `quantile` ignored, so a histogram's label set
/// counts once per `_bucket`, `_sum` and `_count`).
fn series_per_name(scrape: &str) -> BTreeMap<String, BTreeSet<Vec<(String, String)>>> {
    let mut out: BTreeMap<String, BTreeSet<Vec<(String, String)>>> = BTreeMap::new();
    for s in parse_metrics(scrape) {
        let mut labels: Vec<(String, String)> = s
            .labels
            .into_iter()
            .filter(|(k, _)| k != "le" && k != "quantile")
            .collect();
        labels.sort();
        out.entry(s.name).or_default().insert(labels);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// promtool

/// promtool, when it is on PATH. Missing: a panic when `CI` is set, else `None` after a notice.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!(
            "promtool is not on PATH but CI is set: `promtool check metrics` must run in CI \
             (.ci/run installs it from the Debian package `prometheus`)"
        );
    }
    eprintln!(
        "SKIPPED: promtool not on PATH; `promtool check metrics` not run \
         (apt-get install prometheus, or run through .ci/run)"
    );
    None
}

/// tollgate answers OpenMetrics text, whose counter families are named without `_total` (the
/// samples carry it); promtool's linter reads the Prometheus text format, where the family is
/// named like its samples. Renames counter families accordingly and drops the OpenMetrics-only
/// `# UNIT` and `# EOF` lines; samples are left untouched.
fn openmetrics_to_prometheus_text(scrape: &str) -> String {
    let counters: BTreeSet<String> = declared_families(scrape)
        .into_iter()
        .filter(|(_, t)| t == "counter")
        .map(|(f, _)| f)
        .collect();
    let mut out = String::with_capacity(scrape.len());
    for line in scrape.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let mut rewritten = None;
        for kw in ["# HELP ", "# TYPE "] {
            if let Some(rest) = line.strip_prefix(kw) {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) && !name.ends_with("_total") {
                    rewritten = Some(format!("{kw}{name}_total {tail}"));
                }
            }
        }
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[test]
fn openmetrics_counters_become_prometheus_text_counters() {
    let om = "# HELP tollgate_x Things.\n# TYPE tollgate_x counter\ntollgate_x_total{a=\"b\"} 1\n\
              # HELP tollgate_y_seconds Time.\n# TYPE tollgate_y_seconds histogram\n\
              tollgate_y_seconds_count 1\n# EOF\n";
    assert_eq!(
        openmetrics_to_prometheus_text(om),
        "# HELP tollgate_x_total Things.\n# TYPE tollgate_x_total counter\n\
         tollgate_x_total{a=\"b\"} 1\n# HELP tollgate_y_seconds Time.\n\
         # TYPE tollgate_y_seconds histogram\ntollgate_y_seconds_count 1\n"
    );
}

/// `promtool check metrics` on a scrape: its complaints, or `None` when it is happy.
fn promtool_check_metrics(promtool: &str, scrape: &str) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    let text = openmetrics_to_prometheus_text(scrape);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        None
    } else {
        Some(format!("exit {:?}:\n{said}", out.status.code()))
    }
}

/// The pipe to promtool works: a bad exposition is rejected, a good one accepted.
#[test]
fn promtool_rejects_a_bad_exposition() {
    let Some(promtool) = promtool() else { return };
    let bad = "# TYPE tollgate_thing_milliseconds counter\ntollgate_thing_milliseconds 1\n";
    let complaints = promtool_check_metrics(promtool, bad).expect("promtool must complain");
    assert!(
        complaints.contains("tollgate_thing_milliseconds"),
        "promtool said: {complaints}"
    );
    let good = "# HELP tollgate_things Things done.\n# TYPE tollgate_things counter\n\
                tollgate_things_total 1\n# EOF\n";
    assert_eq!(promtool_check_metrics(promtool, good), None);
}

// ---------------------------------------------------------------------------------------------
// traffic

async fn http_chat(
    s: &TestServer,
    body: &Value,
    auth: &str,
    service_type: Option<&str>,
    purpose: Option<&str>,
) -> u16 {
    let mut rb = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(auth)
        .json(body);
    if let Some(st) = service_type {
        rb = rb.header("x-tollgate-service-type", st);
    }
    if let Some(p) = purpose {
        rb = rb.header("x-tollgate-purpose", p);
    }
    let resp = rb.send().await.expect("chat request");
    let status = resp.status().as_u16();
    let _ = resp.bytes().await; // the whole body, streams included
    status
}

fn with_meta(
    msg: CompleteRequest,
    service_type: Option<&str>,
    purpose: Option<&str>,
) -> tonic::Request<CompleteRequest> {
    let mut req = grpc_request(msg, Some(ALICE_KEY), None);
    if let Some(st) = service_type {
        req.metadata_mut()
            .insert("x-tollgate-service-type", st.parse().unwrap());
    }
    if let Some(p) = purpose {
        req.metadata_mut()
            .insert("x-tollgate-purpose", p.parse().unwrap());
    }
    req
}

/// A gRPC chat request; streams are read to their end.
async fn grpc_chat(
    s: &TestServer,
    model: &str,
    stream: bool,
    service_type: Option<&str>,
    purpose: Option<&str>,
) -> tonic::Code {
    let mut client = s.grpc().await;
    let req = with_meta(complete_request(model, "op"), service_type, purpose);
    if stream {
        match client.stream_complete(req).await {
            Ok(resp) => {
                let mut st = resp.into_inner();
                loop {
                    match st.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return tonic::Code::Ok,
                        Err(e) => return e.code(),
                    }
                }
            }
            Err(e) => e.code(),
        }
    } else {
        match client.complete(req).await {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        }
    }
}

/// A unary call to an arbitrary gRPC method path.
async fn grpc_raw(s: &TestServer, path: &str) -> tonic::Code {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("gRPC connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("gRPC ready");
    let codec: tonic_prost::ProstCodec<CompleteRequest, CompleteResponse> = Default::default();
    let path = http::uri::PathAndQuery::try_from(path.to_string()).expect("method path");
    match grpc
        .unary(
            grpc_request(complete_request("fast", "raw"), Some(ALICE_KEY), None),
            path,
            codec,
        )
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

fn stream_body(model: &str) -> Value {
    let mut b = chat_body(model, "op");
    b["stream"] = json!(true);
    b
}

// ---------------------------------------------------------------------------------------------
// (a) + (b): the dashboard against a live scrape, and promtool on that scrape

/// Parses the dashboard, drives requests of several kinds (success, stream, upstream failure,
/// fallback, key-pool exhaustion, unknown model, rejected credential, a JWT caller's signup, a
/// config reload, gRPC), then requires every metric the dashboard's queries name to be exported
/// with samples, and the scrape to pass `promtool check metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_name_exported_metrics_and_promtool_accepts_the_scrape() {
    let dash: Value = serde_json::from_str(DASHBOARD).expect("the dashboard JSON parses");
    check_dashboard_shape(&dash);
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    let mut names = BTreeSet::new();
    for q in &queries {
        metric_names(q, &mut names);
    }
    for required in REQUIRED_ON_DASHBOARD {
        assert!(
            names.contains(*required),
            "the dashboard no longer queries {required}"
        );
    }

    let jwks = JwksServer::start(Mode::Healthy).await;
    let opts = Opts {
        server: "admin_token = \"op-admin-token\"".into(),
        extra: jwt_table(&jwks.url(), ""),
        ..Opts::default()
    };
    let mut s = TestServer::sqlite(opts).await;

    // success (non-streamed and streamed), tokens, spend, alias resolution
    assert_eq!(
        http_chat(&s, &chat_body("fast", "a"), ALICE_KEY, None, None).await,
        200
    );
    assert_eq!(
        http_chat(&s, &stream_body("chatty"), ALICE_KEY, None, None).await,
        200
    );
    assert_eq!(
        grpc_chat(&s, "fast", false, None, None).await,
        tonic::Code::Ok
    );
    assert_eq!(
        grpc_chat(&s, "chatty", true, None, None).await,
        tonic::Code::Ok
    );
    // a pool of one rate-limited key: exhaustion, key transition, fallback to up2/ok
    assert_eq!(
        http_chat(&s, &chat_body("pooled", "p"), ALICE_KEY, None, None).await,
        200
    );
    // excluded: unknown model, rejected credential
    http_chat(&s, &chat_body("no-such-model", "n"), ALICE_KEY, None, None).await;
    http_chat(&s, &chat_body("fast", "x"), "tg-not-a-key", None, None).await;
    // a JWT caller seen for the first time: provisioning, signups_total
    assert_eq!(
        http_chat(
            &s,
            &chat_body("fast", "j"),
            &good_jwt("operator-sub"),
            None,
            None
        )
        .await,
        200
    );
    // failures: an upstream 500 (twice: the provider is marked unhealthy)
    http_chat(&s, &chat_body("broken", "b"), ALICE_KEY, None, None).await;
    http_chat(&s, &chat_body("broken", "b"), ALICE_KEY, None, None).await;
    // Authorize over HTTP (gRPC Authorize shares the core call and the metric)
    let resp = s
        .client
        .post(s.url("/v1/authorize"))
        .bearer_auth(ALICE_KEY)
        .json(&json!({"model": "fast"}))
        .send()
        .await
        .expect("POST /v1/authorize");
    assert_eq!(resp.status(), 200, "POST /v1/authorize");
    // a reload (this server has no file to reload from: a counted failure)
    let _ = s
        .client
        .post(s.url("/admin/reload"))
        .bearer_auth("op-admin-token")
        .send()
        .await
        .expect("POST /admin/reload");

    let scrape = s.metrics().await;
    let families = declared_families(&scrape);
    let samples: BTreeSet<String> = parse_metrics(&scrape).into_iter().map(|s| s.name).collect();
    let mut problems = Vec::new();
    for name in &names {
        if let Err(e) = exported(name, &families) {
            problems.push(e);
        } else if !samples.contains(name) {
            problems.push(format!(
                "{name}: exported but no sample after the test's traffic"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "the dashboard queries metrics tollgate does not export:\n  {}\n--- /metrics ---\n{scrape}",
        problems.join("\n  ")
    );

    // Every family has help text.
    for family in families.keys() {
        assert!(
            scrape.lines().any(|l| l
                .strip_prefix("# HELP ")
                .and_then(|r| r.strip_prefix(family.as_str()))
                .is_some_and(|r| r.starts_with(' ') && r.trim().len() > 3)),
            "{family} has no help text"
        );
    }

    if let Some(promtool) = promtool() {
        let complaints = promtool_check_metrics(promtool, &scrape);
        assert!(
            complaints.is_none(),
            "promtool check metrics rejects the /metrics scrape: {}\n--- /metrics ---\n{scrape}",
            complaints.unwrap()
        );
    }
    s.shutdown().await;
}

/// TTFT and completion latency histograms span 50 ms to several minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_buckets_span_50ms_to_minutes() {
    let mut s = TestServer::sqlite(Opts::default()).await;
    assert_eq!(
        http_chat(&s, &stream_body("chatty"), ALICE_KEY, None, None).await,
        200
    );
    let scrape = s.metrics().await;
    for family in [
        "tollgate_chat_completion_ttft_seconds",
        "tollgate_chat_completion_latency_seconds",
    ] {
        let bucket = format!("{family}_bucket");
        let les: BTreeSet<u64> = parse_metrics(&scrape)
            .into_iter()
            .filter(|x| x.name == bucket)
            .filter_map(|x| x.labels.into_iter().find(|(k, _)| k == "le"))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .map(|v| (v * 1000.0).round() as u64)
            .collect();
        assert!(!les.is_empty(), "no {bucket} samples:\n{scrape}");
        let (lo, hi) = (*les.first().unwrap(), *les.last().unwrap());
        assert!(lo <= 50, "{family}: smallest bucket {lo} ms, want <= 50 ms");
        assert!(
            hi >= 180_000,
            "{family}: largest bucket {hi} ms, want >= 3 min"
        );
        assert!(les.len() >= 10, "{family}: only {} buckets", les.len());
    }
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// (c) cardinality

/// A random token with a marker no configuration or label ever contains.
fn random_token(rng: &mut impl rand::Rng) -> String {
    format!("zzrnd{:016x}", rng.random::<u64>())
}

#[derive(Clone, Debug)]
enum Call {
    Http {
        body: Value,
        service_type: Option<String>,
        purpose: Option<String>,
    },
    Grpc {
        model: String,
        stream: bool,
        service_type: Option<String>,
        purpose: Option<String>,
    },
}

/// Chat request number `i`: random strings in the model, the service type or the purpose, on
/// HTTP (even) or gRPC (odd), streamed or not.
fn random_call(i: usize, rng: &mut impl rand::Rng) -> Call {
    let r = random_token(rng);
    let (model, service_type, purpose) = match (i / 2) % 8 {
        // not a configured model or alias: model_not_found
        0 => (r.clone(), None, None),
        // a provider without a model allow-list whose upstream refuses the name
        1 => (format!("up/{r}"), None, None),
        // a provider without a model allow-list that answers any name (mock)
        2 => (format!("open/{r}"), None, None),
        // a provider with an allow-list
        3 => (format!("mock/{r}"), None, None),
        // a configured model with an unknown purpose (the default service type accepts any)
        4 => ("fast".to_string(), None, Some(r.clone())),
        // an unknown service type
        5 => ("fast".to_string(), Some(r.clone()), None),
        // a service type that lists its purposes, with an unknown one
        6 => (
            "fast".to_string(),
            Some("batch".to_string()),
            Some(r.clone()),
        ),
        // everything random
        _ => (r.clone(), Some(r.clone()), Some(format!("{r}-p"))),
    };
    let stream = (i / 16) % 2 == 1;
    if i.is_multiple_of(2) {
        let mut body = chat_body(&model, &r);
        if stream {
            body["stream"] = json!(true);
        }
        Call::Http {
            body,
            service_type,
            purpose,
        }
    } else {
        Call::Grpc {
            model,
            stream,
            service_type,
            purpose,
        }
    }
}

async fn run_calls(s: &TestServer, calls: Vec<Call>) {
    stream::iter(calls)
        .for_each_concurrent(8, |call| async move {
            match call {
                Call::Http {
                    body,
                    service_type,
                    purpose,
                } => {
                    http_chat(
                        s,
                        &body,
                        ALICE_KEY,
                        service_type.as_deref(),
                        purpose.as_deref(),
                    )
                    .await;
                }
                Call::Grpc {
                    model,
                    stream,
                    service_type,
                    purpose,
                } => {
                    grpc_chat(
                        s,
                        &model,
                        stream,
                        service_type.as_deref(),
                        purpose.as_deref(),
                    )
                    .await;
                }
            }
        })
        .await;
}

/// Random HTTP paths and gRPC methods (request metrics are labelled by endpoint).
async fn random_endpoints(s: &TestServer, n: usize, rng: &mut impl rand::Rng) {
    let tokens: Vec<String> = (0..n).map(|_| random_token(rng)).collect();
    stream::iter(tokens)
        .for_each_concurrent(8, |r| async move {
            let _ = s.client.get(s.url(&format!("/v1/{r}"))).send().await;
            let _ = s
                .client
                .post(s.url(&format!("/{r}/chat/completions")))
                .send()
                .await;
            grpc_raw(s, &format!("/tollgate.v1.Gateway/{r}")).await;
            grpc_raw(s, &format!("/{r}.v1.Gateway/Complete")).await;
        })
        .await;
}

/// Series added between two scrapes, per sample name.
fn growth(before: &str, after: &str) -> BTreeMap<String, usize> {
    let b = series_per_name(before);
    series_per_name(after)
        .into_iter()
        .filter_map(|(name, series)| {
            let old = b.get(&name).map(|s| s.len()).unwrap_or(0);
            (series.len() > old).then(|| (name, series.len() - old))
        })
        .collect()
}

fn random_lines(scrape: &str) -> Vec<&str> {
    scrape.lines().filter(|l| l.contains("zzrnd")).collect()
}

/// Leaked lines by sample name: how many, and one example each.
fn leak_summary(lines: &[&str]) -> String {
    let mut by_name: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for l in lines {
        let name = l.split(['{', ' ']).next().unwrap_or(l);
        let e = by_name.entry(name).or_insert((0, l));
        e.0 += 1;
    }
    by_name
        .into_iter()
        .map(|(name, (n, example))| format!("  {name}: {n} lines, e.g. {example}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1000 chat requests with random model, service type and purpose strings (500 HTTP, 500
/// gRPC, streamed and not; models unknown, under a provider whose upstream refuses them, under a
/// mock provider that answers any name, under a provider with an allow-list): no random string
/// reaches the scrape, the first half adds a small set of series (the `unknown` values), and the
/// second half, the same kinds of requests with other random strings, adds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_models_service_types_and_purposes_do_not_grow_series() {
    let opts = Opts {
        // A mock provider without a model allow-list: it answers any model name.
        extra: "[providers.open]\nkind = \"mock\"\ntokens = 2\n".into(),
        ..Opts::default()
    };
    let mut s = TestServer::sqlite(opts).await;
    let mut rng = rand::rng();

    // Baseline: the configured names, so every family has its usual series.
    assert_eq!(
        http_chat(&s, &chat_body("fast", "base"), ALICE_KEY, None, None).await,
        200
    );
    assert_eq!(
        http_chat(&s, &stream_body("chatty"), ALICE_KEY, None, None).await,
        200
    );
    assert_eq!(
        grpc_chat(&s, "fast", false, None, None).await,
        tonic::Code::Ok
    );
    assert_eq!(
        grpc_chat(&s, "chatty", true, None, None).await,
        tonic::Code::Ok
    );
    let before = s.metrics().await;

    const HALF: usize = 500;
    let first: Vec<Call> = (0..HALF).map(|i| random_call(i, &mut rng)).collect();
    run_calls(&s, first).await;
    let middle = s.metrics().await;

    let second: Vec<Call> = (0..HALF).map(|i| random_call(i, &mut rng)).collect();
    run_calls(&s, second).await;
    let after = s.metrics().await;

    // Every chat request was counted (and so went through the whole path).
    let counted = |text: &str| metric_value(text, AVAILABILITY, &[]);
    assert_eq!(
        counted(&after) - counted(&before),
        (2 * HALF) as f64,
        "every chat request is counted once"
    );

    let leaked = random_lines(&after);
    assert!(
        leaked.is_empty(),
        "random strings from requests reached /metrics labels ({} lines); by sample name:\n{}",
        leaked.len(),
        leak_summary(&leaked)
    );

    let first_growth = growth(&before, &middle);
    let second_growth = growth(&middle, &after);
    eprintln!("series added by the first {HALF} random requests: {first_growth:#?}");
    assert!(
        second_growth.is_empty(),
        "the second {HALF} random requests added series (growth must stop once the `unknown` \
         values exist): {second_growth:#?}"
    );
    let total: usize = first_growth.values().sum();
    assert!(
        total <= 100 && first_growth.values().all(|&n| n <= 24),
        "the first {HALF} random requests added {total} series: {first_growth:#?}"
    );
    s.shutdown().await;
}

/// Request metrics are labelled by endpoint (HTTP route template, gRPC method): 2 x 100 random
/// HTTP paths and 2 x 100 random gRPC methods (under a served service and under an unknown one)
/// leave no random string in the scrape and add a fixed handful of series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_http_paths_and_grpc_methods_do_not_grow_series() {
    let mut s = TestServer::sqlite(Opts::default()).await;
    let mut rng = rand::rng();
    assert_eq!(
        http_chat(&s, &chat_body("fast", "base"), ALICE_KEY, None, None).await,
        200
    );
    assert_eq!(
        grpc_chat(&s, "fast", false, None, None).await,
        tonic::Code::Ok
    );
    let before = s.metrics().await;
    random_endpoints(&s, 50, &mut rng).await;
    let middle = s.metrics().await;
    random_endpoints(&s, 50, &mut rng).await;
    let after = s.metrics().await;

    let leaked = random_lines(&after);
    assert!(
        leaked.is_empty(),
        "random paths or gRPC methods reached /metrics labels ({} lines); by sample name:\n{}",
        leaked.len(),
        leak_summary(&leaked)
    );
    let second_growth = growth(&middle, &after);
    assert!(
        second_growth.is_empty(),
        "more random endpoints added series: {second_growth:#?}"
    );
    let first_growth = growth(&before, &middle);
    let total: usize = first_growth.values().sum();
    assert!(
        total <= 40,
        "random endpoints added {total} series: {first_growth:#?}"
    );
    s.shutdown().await;
}
