//! Conversions between protobuf messages and core types, and rejections as `tonic::Status`.

use serde_json::{Map, Value};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::core::chat::ChatRequest;
use crate::core::{ChatChunk, ChatCompletion, GrpcCode, ModelEntry, Principal, Rejection};
use crate::proto;
use crate::providers::{JsonObject, Usage};

/// The `domain` of every `ErrorInfo`.
const ERROR_DOMAIN: &str = "tollgate";

/// A rejection as a status with the reason's code and an `ErrorInfo` naming the reason.
pub fn rejection_status(r: &Rejection, request_id: &str) -> Status {
    let code = match r.reason.grpc_code() {
        GrpcCode::Ok => Code::Ok,
        GrpcCode::Cancelled => Code::Cancelled,
        GrpcCode::InvalidArgument => Code::InvalidArgument,
        GrpcCode::DeadlineExceeded => Code::DeadlineExceeded,
        GrpcCode::NotFound => Code::NotFound,
        GrpcCode::PermissionDenied => Code::PermissionDenied,
        GrpcCode::ResourceExhausted => Code::ResourceExhausted,
        GrpcCode::Internal => Code::Internal,
        GrpcCode::Unavailable => Code::Unavailable,
        GrpcCode::Unauthenticated => Code::Unauthenticated,
    };
    let mut metadata = std::collections::HashMap::new();
    if let Some(p) = &r.param {
        metadata.insert("param".to_string(), p.clone());
    }
    let mut details = ErrorDetails::with_error_info(r.reason.as_str(), ERROR_DOMAIN, metadata);
    if let Some(after) = r.retry_after {
        details.set_retry_info(Some(after));
    }
    let mut status = Status::with_error_details(code, r.message.clone(), details);
    if let Ok(v) = MetadataValue::try_from(request_id) {
        status.metadata_mut().insert("x-request-id", v);
    }
    for (name, value) in &r.headers {
        if let Ok(v) = MetadataValue::try_from(value.as_str()) {
            status.metadata_mut().insert(*name, v);
        }
    }
    if let Some(after) = r.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = MetadataValue::try_from(secs.max(1).to_string()) {
            status.metadata_mut().insert("retry-after", v);
        }
    }
    status
}

fn parse_object(json: &str, field: &str) -> Result<JsonObject, Rejection> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Rejection::invalid(
            field,
            format!("`{field}` must be a JSON object"),
        )),
        Err(e) => Err(Rejection::invalid(
            field,
            format!("`{field}` is not valid JSON: {e}"),
        )),
    }
}

/// A `CompleteRequest` as the OpenAI body the core validates; `stream` comes from the RPC.
pub fn chat_request(req: proto::CompleteRequest, stream: bool) -> Result<ChatRequest, Rejection> {
    let mut body = match req.extra_json.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(json) => parse_object(json, "extra_json")?,
        None => Map::new(),
    };
    body.insert("model".into(), Value::String(req.model));
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let mut msg = match m.extra_json.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(json) => parse_object(json, &format!("messages[{i}].extra_json"))?,
            None => Map::new(),
        };
        msg.insert("role".into(), Value::String(m.role));
        let content = match m.content_json.as_deref() {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                Rejection::invalid(
                    &format!("messages[{i}].content_json"),
                    format!("`messages[{i}].content_json` is not valid JSON: {e}"),
                )
            })?,
            None => Value::String(m.content),
        };
        msg.insert("content".into(), content);
        if let Some(name) = m.name {
            msg.insert("name".into(), Value::String(name));
        }
        messages.push(Value::Object(msg));
    }
    body.insert("messages".into(), Value::Array(messages));
    if let Some(n) = req.max_tokens {
        body.insert("max_tokens".into(), n.into());
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), t.into());
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), p.into());
    }
    if !req.stop.is_empty() {
        body.insert("stop".into(), req.stop.into());
    }
    if let Some(u) = req.user {
        body.insert("user".into(), Value::String(u));
    }
    body.insert("stream".into(), Value::Bool(stream));
    if stream {
        // The last CompleteChunk always carries usage.
        body.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
    }
    ChatRequest::from_body(body)
}

impl From<Usage> for proto::Usage {
    fn from(u: Usage) -> Self {
        proto::Usage {
            prompt_tokens: u.prompt_tokens.min(u32::MAX as u64) as u32,
            completion_tokens: u.completion_tokens.min(u32::MAX as u64) as u32,
            total_tokens: (u.prompt_tokens + u.completion_tokens).min(u32::MAX as u64) as u32,
        }
    }
}

/// A finished completion as a response message.
pub fn complete_response(c: ChatCompletion, request_id: &str) -> proto::CompleteResponse {
    let first = c
        .body
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|a| a.first());
    let content = first
        .and_then(|f| f.pointer("/message/content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let finish_reason = first
        .and_then(|f| f.get("finish_reason"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    proto::CompleteResponse {
        id: c
            .body
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        resolved_model: c.resolved_model,
        content,
        finish_reason,
        usage: Some(c.usage.into()),
        request_id: request_id.to_string(),
        response_json: Value::Object(c.body).to_string(),
    }
}

/// A streamed chunk as a message.
pub fn complete_chunk(chunk: ChatChunk, resolved: &str) -> proto::CompleteChunk {
    proto::CompleteChunk {
        id: chunk
            .value
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        resolved_model: resolved.to_string(),
        delta_content: chunk.delta_content().to_string(),
        finish_reason: chunk.finish_reason().unwrap_or_default().to_string(),
        usage: chunk.usage().map(Into::into),
        chunk_json: Value::Object(chunk.value).to_string(),
    }
}

impl From<ModelEntry> for proto::ModelInfo {
    fn from(m: ModelEntry) -> Self {
        proto::ModelInfo {
            id: m.id,
            kind: if m.alias { "alias" } else { "model" }.into(),
            owned_by: m.owned_by,
            description: m.description,
            chain: m.chain,
        }
    }
}

impl From<Principal> for proto::Principal {
    fn from(p: Principal) -> Self {
        proto::Principal {
            user_id: p.identity.user_id,
            external_id: p.identity.external_id,
            auth_method: p.identity.method.as_str().into(),
            service_type: p.service_type,
            purpose: p.purpose,
            allowed_models: p.allowed_models,
            key_id: p.identity.key_id,
            remaining_budget_micros: p.remaining_budget_micros,
        }
    }
}
