//! Conversions between protobuf messages and core types, and rejections as `tonic::Status`.

use serde_json::Value;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::api::{
    openai_chat, ChatDelta, ChatRequest, Content, ContentPart, FunctionTool, JsonObject,
    MaxTokensField, Message, Reasoning, Tool, ToolCall, ToolChoice, Usage,
};
use crate::core::{ChatCompletion, GrpcCode, ModelEntry, Principal, Rejection};
use crate::proto;

/// The `domain` of every `ErrorInfo`.
const ERROR_DOMAIN: &str = "tollgate";

/// The rate-limit and budget headers as gRPC metadata, under the same names.
pub(super) fn set_policy_metadata(map: &mut MetadataMap, policy: &[crate::error::PolicyHeader]) {
    for (name, value) in policy {
        if let Ok(v) = MetadataValue::try_from(value.as_str()) {
            map.insert(name.text, v);
        }
    }
}

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
    set_policy_metadata(status.metadata_mut(), &r.headers);
    if let Some(after) = r.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = MetadataValue::try_from(secs.max(1).to_string()) {
            status.metadata_mut().insert("retry-after", v);
        }
    }
    status
}

/// A JSON text field that must hold an object.
pub(super) fn parse_object(json: &str, field: &str) -> Result<JsonObject, Rejection> {
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

/// A `CompleteRequest` as a neutral request; `stream` comes from the RPC. Typed fields win over
/// the same fields in `extra_json`, which is read with OpenAI's meaning.
pub fn chat_request(req: proto::CompleteRequest, stream: bool) -> Result<ChatRequest, Rejection> {
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        messages.push(message(m, i)?);
    }
    let mut out = ChatRequest::new(req.model, messages);
    if let Some(json) = req.extra_json.as_deref().filter(|s| !s.trim().is_empty()) {
        let mut extra = parse_object(json, "extra_json")?;
        // The RPC decides these.
        for key in ["model", "messages", "stream", "stream_options"] {
            extra.remove(key);
        }
        openai_chat::apply_top_level(&mut out, extra)?;
    }
    if let Some(n) = req.max_tokens {
        out.max_tokens = Some(u64::from(n));
        out.max_tokens_field = MaxTokensField::MaxTokens;
    }
    if req.temperature.is_some() {
        out.temperature = req.temperature;
    }
    if req.top_p.is_some() {
        out.top_p = req.top_p;
    }
    if !req.stop.is_empty() {
        out.stop = req.stop;
    }
    if let Some(u) = req.user {
        out.extra.insert("user".into(), Value::String(u));
    }
    for (i, t) in req.tools.into_iter().enumerate() {
        out.tools.push(tool(t, i)?);
    }
    if let Some(choice) = req.tool_choice.and_then(|c| c.choice) {
        out.tool_choice = Some(match choice {
            proto::tool_choice::Choice::Mode(m) => match m.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                _ => {
                    return Err(Rejection::invalid(
                        "tool_choice.mode",
                        "`tool_choice.mode` must be \"auto\", \"none\" or \"required\"",
                    ))
                }
            },
            proto::tool_choice::Choice::Function(f) => ToolChoice::Function(f),
        });
    }
    out.stream = stream;
    // The last CompleteChunk always carries usage.
    out.include_usage = stream;
    out.check_required()?;
    Ok(out)
}

/// One message: the typed fields, with `content_json` and `extra_json` read as OpenAI JSON.
fn message(m: proto::ChatMessage, i: usize) -> Result<Message, Rejection> {
    let mut obj = match m.extra_json.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(json) => parse_object(json, &format!("messages[{i}].extra_json"))?,
        None => JsonObject::new(),
    };
    obj.insert("role".into(), Value::String(m.role));
    if let Some(json) = m.content_json.as_deref() {
        let content: Value = serde_json::from_str(json).map_err(|e| {
            Rejection::invalid(
                &format!("messages[{i}].content_json"),
                format!("`messages[{i}].content_json` is not valid JSON: {e}"),
            )
        })?;
        obj.insert("content".into(), content);
    }
    if let Some(name) = m.name {
        obj.insert("name".into(), Value::String(name));
    }
    let mut msg = openai_chat::message_from_object(obj, i)?;
    if m.content_json.is_none() {
        msg.content = if m.parts.is_empty() {
            Some(Content::Text(m.content))
        } else {
            let mut parts = Vec::with_capacity(m.parts.len());
            for (j, p) in m.parts.into_iter().enumerate() {
                parts.push(match p.part {
                    Some(proto::content_part::Part::Text(text)) => ContentPart::Text {
                        text,
                        extra: JsonObject::new(),
                    },
                    Some(proto::content_part::Part::Image(img)) => ContentPart::Image {
                        url: img.url,
                        detail: img.detail,
                        extra: JsonObject::new(),
                    },
                    None => {
                        return Err(Rejection::invalid(
                            &format!("messages[{i}].parts[{j}]"),
                            format!("`messages[{i}].parts[{j}]` is empty"),
                        ))
                    }
                });
            }
            Some(Content::Parts(parts))
        };
    }
    for c in m.tool_calls {
        msg.tool_calls.push(ToolCall {
            id: c.id,
            name: c.name,
            arguments: c.arguments,
            extra: JsonObject::new(),
        });
    }
    if m.tool_call_id.is_some() {
        msg.tool_call_id = m.tool_call_id;
    }
    if let Some(text) = m.reasoning {
        msg.reasoning.push(Reasoning {
            text,
            ..Reasoning::default()
        });
    }
    Ok(msg)
}

fn tool(t: proto::Tool, i: usize) -> Result<Tool, Rejection> {
    if t.name.is_empty() {
        return Err(Rejection::invalid(
            &format!("tools[{i}].name"),
            format!("`tools[{i}].name` is required"),
        ));
    }
    let parameters = match t.parameters_json.as_deref() {
        Some(json) => Some(Value::Object(parse_object(
            json,
            &format!("tools[{i}].parameters_json"),
        )?)),
        None => None,
    };
    Ok(Tool::Function(FunctionTool {
        name: t.name,
        description: t.description,
        parameters,
        extra: JsonObject::new(),
    }))
}

fn saturate(n: u64) -> u32 {
    n.min(u64::from(u32::MAX)) as u32
}

impl From<Usage> for proto::Usage {
    fn from(u: Usage) -> Self {
        proto::Usage {
            prompt_tokens: saturate(u.prompt_tokens),
            completion_tokens: saturate(u.completion_tokens),
            total_tokens: saturate(u.total_tokens()),
            cached_prompt_tokens: saturate(u.cached_prompt_tokens),
            cache_creation_tokens: saturate(u.cache_creation_tokens),
        }
    }
}

fn tool_call(c: &ToolCall) -> proto::ToolCall {
    proto::ToolCall {
        id: c.id.clone(),
        name: c.name.clone(),
        arguments: c.arguments.clone(),
    }
}

/// A finished completion as a response message.
pub fn complete_response(c: ChatCompletion, request_id: &str) -> proto::CompleteResponse {
    let first = c.response.choices.first();
    let reasoning: String = first
        .map(|f| {
            f.message
                .reasoning
                .iter()
                .map(|r| r.text.as_str())
                .collect()
        })
        .unwrap_or_default();
    proto::CompleteResponse {
        id: c.response.id.clone(),
        resolved_model: c.resolved_model,
        content: c.response.first_text(),
        finish_reason: first
            .and_then(|f| f.finish_reason.as_ref())
            .map(|f| f.as_openai().to_string())
            .unwrap_or_default(),
        usage: Some(c.usage.into()),
        request_id: request_id.to_string(),
        tool_calls: first
            .map(|f| f.message.tool_calls.iter().map(tool_call).collect())
            .unwrap_or_default(),
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        response_json: openai_chat::encode_response(&c.response),
    }
}

/// A streamed delta as a message.
pub fn complete_chunk(delta: ChatDelta, resolved: &str) -> proto::CompleteChunk {
    let first = delta.choices.first();
    proto::CompleteChunk {
        id: delta.id.clone(),
        resolved_model: resolved.to_string(),
        delta_content: delta.content().to_string(),
        finish_reason: delta
            .finish_reason()
            .map(|f| f.as_openai().to_string())
            .unwrap_or_default(),
        usage: delta.usage.map(Into::into),
        tool_calls: first
            .map(|c| {
                c.tool_calls
                    .iter()
                    .map(|t| proto::ToolCallDelta {
                        index: t.index,
                        id: t.id.clone(),
                        name: t.name.clone(),
                        arguments: t.arguments.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        delta_reasoning: first.and_then(|c| c.reasoning.clone()).unwrap_or_default(),
        chunk_json: openai_chat::encode_chunk(&delta),
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
            apis: m.apis.iter().map(|a| a.as_str().to_string()).collect(),
        }
    }
}

impl From<Principal> for proto::Principal {
    fn from(p: Principal) -> Self {
        proto::Principal {
            user_id: p.identity.user_id,
            external_id: p.identity.external_id.to_string(),
            auth_method: p.identity.method.as_str().into(),
            service_type: p.service_type,
            purpose: p.purpose,
            allowed_models: p.allowed_models.to_vec(),
            key_id: p.identity.key_id,
            remaining_budget_micros: p.remaining_budget_micros,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::policy::{budget, rate_limit};
    use crate::short_text::ShortText;

    /// A name that is not a valid metadata key would make `MetadataMap::insert` panic, and the
    /// two spellings of a name must agree.
    #[test]
    fn every_policy_header_reaches_grpc_metadata() {
        let names = [
            &budget::headers::LIMIT,
            &budget::headers::REMAINING,
            &budget::headers::RESET,
            &budget::headers::SCOPE,
            &rate_limit::headers::LIMIT_REQUESTS,
            &rate_limit::headers::REMAINING_REQUESTS,
            &rate_limit::headers::RESET_REQUESTS,
            &rate_limit::headers::LIMIT_TOKENS,
            &rate_limit::headers::REMAINING_TOKENS,
            &rate_limit::headers::RESET_TOKENS,
        ];
        let policy: Vec<_> = names.iter().map(|n| (*n, ShortText::from("1"))).collect();
        let mut map = tonic::metadata::MetadataMap::new();
        super::set_policy_metadata(&mut map, &policy);
        for name in names {
            assert_eq!(name.header.as_str(), name.text);
            let got = map.get(name.text).map(|v| v.to_str().ok());
            assert_eq!(got, Some(Some("1")), "{}", name.text);
        }
    }
}
