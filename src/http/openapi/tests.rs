use std::collections::BTreeSet;

use serde_json::Value;

use super::super::admin::{key_json, user_json};
use super::super::budgets::{budget_json, usage_json};
use super::super::routes::{table, In};
use super::*;
use crate::core::admin::{UsageReport, UsageTotal};
use crate::core::policy::{BudgetView, ScopeKind};
use crate::store::{ApiKey, ModelUsage, UsageFilter, User};

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(s)) => out.push(s.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_route_of_the_table_is_an_operation_once() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut seen = BTreeSet::new();
    for r in table() {
        let method = r.method.as_str().to_ascii_lowercase();
        assert!(
            seen.insert((r.path, method.clone())),
            "{} {} twice in the table",
            r.method,
            r.path
        );
        let op = &doc["paths"][r.path][&method];
        assert_eq!(op["operationId"], r.doc.operation_id, "{method} {}", r.path);
    }
    let ops: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(ops, seen.len(), "no operation without a route");
    let ids: BTreeSet<_> = table().iter().map(|r| r.doc.operation_id).collect();
    assert_eq!(ids.len(), seen.len(), "operation ids are unique");
}

#[test]
fn path_parameters_are_declared_and_only_those() {
    for r in table() {
        let in_path: BTreeSet<&str> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let declared: BTreeSet<&str> = r
            .doc
            .params
            .iter()
            .filter(|p| p.location == In::Path)
            .map(|p| p.name)
            .collect();
        assert_eq!(in_path, declared, "{} {}", r.method, r.path);
    }
}

#[test]
fn every_reference_resolves() {
    let doc = document();
    let mut all = Vec::new();
    refs(doc, &mut all);
    assert!(all.len() > 20, "{all:?}");
    for r in all {
        let target = r.strip_prefix('#').expect("a local reference");
        assert!(doc.pointer(target).is_some(), "{r} does not resolve");
    }
}

fn properties(schema: &str) -> BTreeSet<String> {
    document()["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {schema}"))
        .keys()
        .cloned()
        .collect()
}

fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

#[test]
fn admin_schemas_are_the_handlers_json_field_for_field() {
    let user = User {
        id: 1,
        external_id: "x".into(),
        name: None,
        auth_method: "admin".into(),
        service_type: None,
        blocked: false,
        blocked_reason: None,
        blocked_at: None,
        created_at: 0,
    };
    assert_eq!(fields(&user_json(&user)), properties("User"));
    let key = ApiKey {
        id: 1,
        user_id: 1,
        name: None,
        key_hash: "h".into(),
        hint: "tg-...abcd".into(),
        source: "admin".into(),
        created_at: 0,
        expires_at: None,
        revoked_at: None,
    };
    assert_eq!(fields(&key_json(&key)), properties("ApiKeyInfo"));
    let budget = BudgetView {
        scope: ScopeKind::Key,
        id: 1,
        explicit: false,
        limit_micros: None,
        period: None,
        period_start: None,
        reset_at: None,
        spent_micros: 0,
        reserved_micros: 0,
        leased_micros: 0,
        remaining_micros: None,
        rpm: None,
        tpm: None,
    };
    assert_eq!(fields(&budget_json(&budget)), properties("Budget"));
    let report = UsageReport {
        models: vec![ModelUsage {
            model: "up/ok".into(),
            requests: 1,
            prompt_tokens: 2,
            completion_tokens: 3,
            cost_micros: 4,
        }],
        total: UsageTotal::default(),
    };
    let usage = usage_json(&UsageFilter::default(), &report);
    assert_eq!(fields(&usage), properties("Usage"));
    let usage_schema = &document()["components"]["schemas"]["Usage"]["properties"];
    let keys = |v: &Value| -> BTreeSet<String> {
        v["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        fields(&usage["models"][0]),
        keys(&usage_schema["models"]["items"])
    );
    assert_eq!(fields(&usage["total"]), keys(&usage_schema["total"]));
}

#[test]
fn admin_request_bodies_name_the_fields_the_handlers_read() {
    assert_eq!(
        properties("PutBudget"),
        ["scope", "id", "limit_usd", "period", "rpm", "tpm"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        properties("CreateKey"),
        ["user_id", "name", "expires_at"].map(String::from).into()
    );
    assert_eq!(
        properties("CreateUser"),
        ["external_id", "name"].map(String::from).into()
    );
}
