//! The two kinds of span and their attributes, named after the OpenTelemetry GenAI semantic
//! conventions (`gen_ai.*`), the HTTP and RPC conventions, and `tollgate.*` for the rest.

use std::time::Instant;

use super::otlp::{self, KeyValue, Span};
use super::{Attempt, ServerTrace};
use crate::api::Api;
use crate::core::outcome::ChatRecord;
use crate::core::{GrpcCode, Outcome, Protocol, Reason};
use crate::providers::Usage;

/// How an upstream attempt ended.
pub(crate) enum AttemptEnd {
    /// It answered; the usage when known.
    Success {
        response_model: Option<String>,
        usage: Option<Usage>,
    },
    /// It failed: `error_type` is the upstream status class (`5xx`, `timeout`, ...).
    Failure {
        error_type: &'static str,
        http_status: Option<u16>,
    },
}

impl AttemptEnd {
    pub(crate) fn is_success(&self) -> bool {
        matches!(self, AttemptEnd::Success { .. })
    }
}

/// `gen_ai.operation.name` of a request on `api`.
pub fn operation(api: Api) -> &'static str {
    match api {
        Api::Embeddings => "embeddings",
        Api::ChatCompletions | Api::Messages | Api::Responses => "chat",
    }
}

fn usage_attributes(attributes: &mut Vec<KeyValue>, usage: &Usage) {
    attributes.push(KeyValue::int(
        "gen_ai.usage.input_tokens",
        i64::try_from(usage.prompt_tokens).unwrap_or(i64::MAX),
    ));
    attributes.push(KeyValue::int(
        "gen_ai.usage.output_tokens",
        i64::try_from(usage.completion_tokens).unwrap_or(i64::MAX),
    ));
}

/// The client span of a finished attempt. Its error carries the status class only: an
/// upstream's error text may quote what it was sent.
pub(super) fn client_span(
    trace: &ServerTrace,
    attempt: Attempt,
    end: AttemptEnd,
    now: Instant,
) -> Span {
    let mut attributes = attempt.attributes;
    // A key-pool walk inside the attempt: each key the upstream turned away is an event.
    let rejected = attempt
        .headers
        .as_ref()
        .map(|h| h.rejected_keys())
        .unwrap_or_default();
    if !rejected.is_empty() {
        attributes.push(KeyValue::int(
            "tollgate.keys_rejected",
            i64::try_from(rejected.len()).unwrap_or(i64::MAX),
        ));
    }
    let events = rejected
        .iter()
        .map(|k| otlp::Event {
            time_unix_nano: trace.unix_ns(k.at),
            name: "tollgate.key_rejected".into(),
            attributes: vec![
                KeyValue::int(
                    "tollgate.key_index",
                    i64::try_from(k.index).unwrap_or(i64::MAX),
                ),
                KeyValue::int("http.response.status_code", i64::from(k.status)),
            ],
        })
        .collect();
    let status = match end {
        AttemptEnd::Success {
            response_model,
            usage,
        } => {
            if let Some(model) = response_model {
                attributes.push(KeyValue::string("gen_ai.response.model", model));
            }
            if let Some(usage) = usage {
                usage_attributes(&mut attributes, &usage);
            }
            if !trace.finish_reasons.is_empty() {
                attributes.push(KeyValue::strings(
                    "gen_ai.response.finish_reasons",
                    &trace.finish_reasons,
                ));
            }
            None
        }
        AttemptEnd::Failure {
            error_type,
            http_status,
        } => {
            attributes.push(KeyValue::string("error.type", error_type));
            if let Some(s) = http_status {
                attributes.push(KeyValue::int("http.response.status_code", i64::from(s)));
            }
            Some(otlp::Status {
                message: error_type.to_string(),
                code: otlp::STATUS_CODE_ERROR,
            })
        }
    };
    Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: attempt.span_id.to_vec(),
        trace_state: trace.trace_state.clone().unwrap_or_default(),
        parent_span_id: trace.span_id.to_vec(),
        name: attempt.name,
        kind: otlp::SPAN_KIND_CLIENT,
        start_time_unix_nano: trace.unix_ns(attempt.started),
        end_time_unix_nano: trace.unix_ns(now),
        attributes,
        events,
        status,
        flags: u32::from(trace.flags),
    }
}

/// The server span of a request that finished with `reason`.
pub(crate) fn server_span(trace: &ServerTrace, r: &ChatRecord, reason: Reason) -> Span {
    let op = operation(r.api);
    let name = if r.requested_model.is_empty() {
        op.to_string()
    } else {
        format!("{op} {}", r.requested_model)
    };
    let outcome = reason.outcome();
    let mut attributes = vec![
        KeyValue::string("gen_ai.operation.name", op),
        KeyValue::string("tollgate.request_id", r.request_id.clone()),
        KeyValue::string("tollgate.protocol", r.protocol.as_str()),
        KeyValue::string("tollgate.api", r.api.as_str()),
        KeyValue::string("tollgate.reason", reason.as_str()),
        KeyValue::string("tollgate.outcome", outcome.as_str()),
        KeyValue::string("tollgate.stream", if r.stream { "true" } else { "false" }),
    ];
    if !r.requested_model.is_empty() {
        attributes.push(KeyValue::string(
            "gen_ai.request.model",
            r.requested_model.clone(),
        ));
    }
    if let Some(provider) = trace.provider {
        attributes.push(KeyValue::string("gen_ai.provider.name", provider));
    }
    if let Some(resolved) = &r.resolved_model {
        attributes.push(KeyValue::string("gen_ai.response.model", resolved.clone()));
    }
    if r.usage.prompt_tokens > 0 || r.usage.completion_tokens > 0 {
        usage_attributes(&mut attributes, &r.usage);
    }
    if !trace.finish_reasons.is_empty() {
        attributes.push(KeyValue::strings(
            "gen_ai.response.finish_reasons",
            &trace.finish_reasons,
        ));
    }
    if let Some(user) = r.user_id {
        attributes.push(KeyValue::int("tollgate.user_id", user));
    }
    if let Some(key) = r.key_id {
        attributes.push(KeyValue::int("tollgate.key_id", key));
    }
    if r.cost_micros > 0 {
        attributes.push(KeyValue::int("tollgate.cost_micros", r.cost_micros));
    }
    match r.protocol {
        Protocol::Http => attributes.push(KeyValue::int(
            "http.response.status_code",
            i64::from(reason.http_status()),
        )),
        Protocol::Grpc => {
            attributes.push(KeyValue::string("rpc.system", "grpc"));
            attributes.push(KeyValue::int(
                "rpc.grpc.status_code",
                grpc_number(reason.grpc_code()),
            ));
        }
    }
    if let Some(input) = &trace.input {
        attributes.push(KeyValue::string("gen_ai.input.messages", input.clone()));
    }
    if let Some(output) = &trace.output {
        attributes.push(KeyValue::string("gen_ai.output.messages", output.clone()));
    }
    // A caller's mistake is not the server's error (as for HTTP 4xx on server spans).
    let status = (outcome == Outcome::Failure).then(|| otlp::Status {
        message: reason.as_str().to_string(),
        code: otlp::STATUS_CODE_ERROR,
    });
    Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: trace.span_id.to_vec(),
        trace_state: trace.trace_state.clone().unwrap_or_default(),
        parent_span_id: trace.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        name,
        kind: otlp::SPAN_KIND_SERVER,
        start_time_unix_nano: trace.start_unix_ns,
        end_time_unix_nano: trace.unix_ns(Instant::now()),
        attributes,
        events: Vec::new(),
        status,
        flags: u32::from(trace.flags),
    }
}

/// The wire number of a gRPC status code.
fn grpc_number(code: GrpcCode) -> i64 {
    match code {
        GrpcCode::Ok => 0,
        GrpcCode::Cancelled => 1,
        GrpcCode::InvalidArgument => 3,
        GrpcCode::DeadlineExceeded => 4,
        GrpcCode::NotFound => 5,
        GrpcCode::PermissionDenied => 7,
        GrpcCode::ResourceExhausted => 8,
        GrpcCode::Internal => 13,
        GrpcCode::Unavailable => 14,
        GrpcCode::Unauthenticated => 16,
    }
}
