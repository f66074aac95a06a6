//! The OpenAPI 3.1 document of the HTTP API, built from the route table (`super::routes`) that
//! the router is built from, with each schema written once (`schemas`). Served at
//! `GET /openapi.json` and printed by `tollgate openapi`.

mod schemas;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::routes::{table, Answer, Auth, Doc, ErrorShape, In};

/// The document, as JSON.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    Json(document()).into_response()
}

fn build() -> Value {
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for r in table() {
        paths
            .entry(r.path)
            .or_default()
            .insert(r.method.as_str().to_ascii_lowercase(), operation(&r.doc));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tollgate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "An LLM gateway: OpenAI- and Anthropic-compatible model APIs with \
                budgets, rate limits and a usage ledger; an admin API behind the admin token; \
                operational routes. Every response carries `x-request-id`.",
        },
        "tags": [
            {"name": "models", "description": "The model APIs, called with a caller credential"},
            {"name": "admin", "description": "Users, API keys, budgets and usage, behind the admin token"},
            {"name": "operations", "description": "Probes, metrics, health and this document"},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas::all(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tollgate API key (`tg-...`) or a token the configured authenticators accept",
                },
                "apiKeyHeader": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same credential, as Anthropic's clients send it",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The configured `server.admin_token`",
                },
            },
            "headers": {
                "RequestId": {
                    "description": "The request id: the caller's `x-request-id` or a new one",
                    "schema": {"type": "string"},
                },
            },
        },
    })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn operation(doc: &Doc) -> Value {
    let mut op = json!({
        "operationId": doc.operation_id,
        "summary": doc.summary,
        "tags": [doc.tag.as_str()],
        "responses": responses(doc),
    });
    let params: Vec<Value> = doc
        .params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "in": match p.location { In::Path => "path", In::Query => "query" },
                "required": p.required,
                "description": p.description,
                "schema": {"type": p.ty},
            })
        })
        .collect();
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    if let Some((schema, optional)) = doc.body {
        op["requestBody"] = json!({
            "required": !optional,
            "content": {"application/json": {"schema": schema_ref(schema)}},
        });
    }
    match doc.auth {
        Auth::Public => op["security"] = json!([]),
        Auth::Caller if doc.errors == ErrorShape::Anthropic => {
            op["security"] = json!([{"bearer": []}, {"apiKeyHeader": []}])
        }
        Auth::Caller => op["security"] = json!([{"bearer": []}]),
        Auth::Admin => op["security"] = json!([{"adminToken": []}]),
    }
    op
}

fn responses(doc: &Doc) -> Value {
    let headers = json!({"x-request-id": {"$ref": "#/components/headers/RequestId"}});
    let (status, answer) = doc.ok;
    let content = match answer {
        Answer::Json(s) => json!({"application/json": {"schema": schema_ref(s)}}),
        Answer::JsonOrEvents(s) => json!({
            "application/json": {"schema": schema_ref(s)},
            "text/event-stream": {
                "schema": {"type": "string", "description": "Server-sent events in the API's own stream format (`\"stream\": true`)"},
            },
        }),
        Answer::Text => json!({"text/plain": {"schema": {"type": "string"}}}),
        Answer::OpenMetrics => json!({
            "application/openmetrics-text": {"schema": {"type": "string"}},
        }),
    };
    let mut out = Map::new();
    out.insert(
        status.to_string(),
        json!({"description": "Success", "headers": headers, "content": content}),
    );
    let error = |schema: &str, description: &str| {
        json!({
            "description": description,
            "headers": headers,
            "content": {"application/json": {"schema": schema_ref(schema)}},
        })
    };
    match doc.errors {
        ErrorShape::OpenAi | ErrorShape::Anthropic => {
            let schema = if doc.errors == ErrorShape::OpenAi {
                "OpenAIError"
            } else {
                "AnthropicError"
            };
            out.insert(
                "default".into(),
                error(
                    schema,
                    "A refusal or failure, its `code` (OpenAI) or `type` (Anthropic) naming the reason",
                ),
            );
        }
        ErrorShape::Admin => {
            for (status, description) in [
                ("400", "Malformed body, query or id (`invalid_request`)"),
                ("401", "Admin token missing or wrong (`auth_rejected`)"),
                (
                    "403",
                    "The admin API is off: no admin token configured (`admin_disabled`)",
                ),
                (
                    "404",
                    "The user, key, provider or key hint does not exist (`not_found`)",
                ),
                (
                    "409",
                    "Contradicts what exists, e.g. a taken external id (`conflict`)",
                ),
                ("503", "The store could not answer (`store_unavailable`)"),
            ] {
                out.insert(status.into(), error("AdminError", description));
            }
        }
        ErrorShape::None => {
            if doc.operation_id == "readyz" {
                out.insert(
                    "503".into(),
                    json!({
                        "description": "Not ready: the store does not answer",
                        "headers": headers,
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }),
                );
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests;
