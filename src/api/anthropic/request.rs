//! A neutral chat request as a Messages API body.

use serde_json::{json, Value};

use super::TranslateError;
use crate::api::{
    ChatRequest, Content, ContentPart, JsonObject, Message, Reasoning, Role, Tool, ToolCall,
    ToolChoice,
};

/// Content block types the Messages API accepts in a message as they are: a part of one of these
/// types came from a caller speaking Anthropic's shapes, so it passes untouched.
const NATIVE_BLOCKS: &[&str] = &[
    "text",
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "container_upload",
    "mcp_tool_use",
    "mcp_tool_result",
];

/// `extra` keys the Messages API knows and takes as they are. The rest of `extra` is OpenAI's
/// (seed, response_format, logit_bias, ...) and would be rejected, so it is dropped.
const PASSED_EXTRA: &[&str] = &["top_k", "thinking", "container", "mcp_servers"];

/// `service_tier` values of the Messages API; OpenAI's (`default`, `flex`, ...) are dropped.
const SERVICE_TIERS: &[&str] = &["auto", "standard_only"];

/// Keys of an OpenAI function definition that the Messages API does not take on a tool.
const OPENAI_ONLY_TOOL_KEYS: &[&str] = &["strict"];

/// The Messages API body for a neutral request. `max_tokens_default` is used when the caller gave
/// none (the API requires max_tokens).
pub fn encode_request(
    req: &ChatRequest,
    model: &str,
    stream: bool,
    max_tokens_default: u64,
) -> Result<JsonObject, TranslateError> {
    if let Some(n) = req.extra.get("n").and_then(Value::as_f64) {
        if n > 1.0 {
            return Err(TranslateError::Unsupported(format!(
                "n = {n} (one choice per request)"
            )));
        }
    }
    let mut body = JsonObject::new();
    body.insert("model".into(), json!(model));
    body.insert(
        "max_tokens".into(),
        json!(req.max_tokens.unwrap_or(max_tokens_default)),
    );
    let instructions: Vec<&Message> = req
        .messages
        .iter()
        .filter(|m| m.role.is_instruction())
        .collect();
    if let Some(system) = encode_system(&instructions)? {
        body.insert("system".into(), system);
    }
    body.insert("messages".into(), encode_messages(&req.messages)?);
    if !req.tools.is_empty() {
        body.insert(
            "tools".into(),
            Value::Array(req.tools.iter().map(encode_tool).collect()),
        );
        if let Some(choice) = encode_tool_choice(req)? {
            body.insert("tool_choice".into(), choice);
        }
    }
    if let Some(t) = req.temperature {
        // OpenAI's range is 0..=2, Anthropic's 0..=1: the top of one is the top of the other.
        body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if !req.stop.is_empty() {
        body.insert("stop_sequences".into(), json!(req.stop));
    }
    if stream {
        body.insert("stream".into(), Value::Bool(true));
    }
    for key in PASSED_EXTRA {
        if let Some(v) = req.extra.get(*key) {
            body.insert((*key).into(), v.clone());
        }
    }
    if let Some(tier) = req.extra.get("service_tier").and_then(Value::as_str) {
        if SERVICE_TIERS.contains(&tier) {
            body.insert("service_tier".into(), json!(tier));
        }
    }
    if let Some(user_id) = metadata_user_id(&req.extra) {
        body.insert("metadata".into(), json!({ "user_id": user_id }));
    }
    Ok(body)
}

/// The end user to name in `metadata.user_id`: the caller's own `metadata.user_id`, else OpenAI's
/// `user`. Anthropic's metadata has no other field (OpenAI's free-form metadata would be rejected).
fn metadata_user_id(extra: &JsonObject) -> Option<&str> {
    extra
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .or_else(|| extra.get("user").and_then(Value::as_str))
}

/// The top-level `system`: one string when every instruction is plain text, else text blocks that
/// keep what the parts carried (`cache_control`, ...).
fn encode_system(instructions: &[&Message]) -> Result<Option<Value>, TranslateError> {
    let mut plain = true;
    let mut texts: Vec<String> = Vec::new();
    let mut blocks: Vec<Value> = Vec::new();
    for m in instructions {
        match &m.content {
            None => {}
            Some(Content::Text(t)) => {
                texts.push(t.clone());
                blocks.push(text_block(t, &JsonObject::new()));
            }
            Some(Content::Parts(parts)) => {
                let mut joined = String::new();
                for p in parts {
                    match p {
                        ContentPart::Text { text, extra } => {
                            plain &= extra.is_empty();
                            joined.push_str(text);
                            blocks.push(text_block(text, extra));
                        }
                        ContentPart::Image { .. } => {
                            return Err(TranslateError::Unsupported(
                                "an image in a system message".into(),
                            ))
                        }
                        ContentPart::Other(o) => {
                            return Err(TranslateError::Unsupported(format!(
                                "a `{}` part in a system message",
                                part_type(o)
                            )))
                        }
                    }
                }
                texts.push(joined);
            }
        }
    }
    // The API rejects empty text blocks, and an empty system says nothing.
    texts.retain(|t| !t.is_empty());
    blocks.retain(|b| b.get("text").and_then(Value::as_str) != Some(""));
    if texts.is_empty() {
        return Ok(None);
    }
    Ok(Some(if plain {
        Value::String(texts.join("\n\n"))
    } else {
        Value::Array(blocks)
    }))
}

/// A turn of the conversation on the wire.
struct Turn {
    role: &'static str,
    content: TurnContent,
}

/// A turn's content: the string shorthand or blocks.
enum TurnContent {
    Text(String),
    Blocks(Vec<Value>),
}

impl TurnContent {
    fn into_blocks(self) -> Vec<Value> {
        match self {
            TurnContent::Text(t) if t.is_empty() => Vec::new(),
            TurnContent::Text(t) => vec![text_block(&t, &JsonObject::new())],
            TurnContent::Blocks(b) => b,
        }
    }
}

/// Adds a turn, merged into the previous one when the role repeats: the API wants user and
/// assistant turns to alternate, and OpenAI sends one `tool` message per result.
fn push_turn(turns: &mut Vec<Turn>, role: &'static str, content: TurnContent) {
    match turns.last_mut() {
        Some(last) if last.role == role => {
            let prev = std::mem::replace(&mut last.content, TurnContent::Blocks(Vec::new()));
            let mut blocks = prev.into_blocks();
            blocks.extend(content.into_blocks());
            last.content = TurnContent::Blocks(blocks);
        }
        _ => turns.push(Turn { role, content }),
    }
}

/// The `messages` array: instructions left out (they went to `system`), tool results as user
/// turns, same-role neighbours merged.
fn encode_messages(messages: &[Message]) -> Result<Value, TranslateError> {
    let mut turns: Vec<Turn> = Vec::new();
    for m in messages {
        match &m.role {
            Role::System | Role::Developer => {}
            Role::User => match &m.content {
                None => {}
                Some(Content::Text(t)) => {
                    push_turn(&mut turns, "user", TurnContent::Text(t.clone()))
                }
                Some(Content::Parts(parts)) => {
                    let blocks = parts.iter().map(encode_part).collect::<Result<_, _>>()?;
                    push_turn(&mut turns, "user", TurnContent::Blocks(blocks));
                }
            },
            Role::Assistant => {
                if let Some(content) = encode_assistant(m)? {
                    push_turn(&mut turns, "assistant", content);
                }
            }
            Role::Tool => {
                let block = encode_tool_result(m)?;
                push_turn(&mut turns, "user", TurnContent::Blocks(vec![block]));
            }
            Role::Other(r) => {
                return Err(TranslateError::Unsupported(format!(
                    "the message role `{r}`"
                )))
            }
        }
    }
    Ok(Value::Array(
        turns
            .into_iter()
            .map(|t| {
                let content = match t.content {
                    TurnContent::Text(s) => Value::String(s),
                    TurnContent::Blocks(b) => Value::Array(b),
                };
                json!({ "role": t.role, "content": content })
            })
            .collect(),
    ))
}

/// An assistant turn: reasoning, then text, then tool calls, the order the API produced them in.
/// `None` when nothing is left to send (the API rejects empty text).
fn encode_assistant(m: &Message) -> Result<Option<TurnContent>, TranslateError> {
    let mut blocks: Vec<Value> = m.reasoning.iter().filter_map(encode_reasoning).collect();
    let reasoning_blocks = blocks.len();
    match &m.content {
        Some(Content::Text(t)) if !t.is_empty() => blocks.push(text_block(t, &JsonObject::new())),
        None | Some(Content::Text(_)) => {}
        Some(Content::Parts(parts)) => {
            for p in parts {
                match p {
                    ContentPart::Text { text, .. } if text.is_empty() => {}
                    // OpenAI keeps a refusal apart from the text; Anthropic has only text for it.
                    ContentPart::Other(o) if part_type(o) == "refusal" => {
                        let text = o.get("refusal").and_then(Value::as_str).unwrap_or_default();
                        if !text.is_empty() {
                            blocks.push(text_block(text, &JsonObject::new()));
                        }
                    }
                    _ => blocks.push(encode_part(p)?),
                }
            }
        }
    }
    let only_plain_text = reasoning_blocks == 0
        && m.tool_calls.is_empty()
        && matches!(&m.content, Some(Content::Text(_)));
    for call in &m.tool_calls {
        blocks.push(encode_tool_use(call)?);
    }
    if blocks.is_empty() {
        return Ok(None);
    }
    if only_plain_text {
        if let Some(Content::Text(t)) = &m.content {
            return Ok(Some(TurnContent::Text(t.clone())));
        }
    }
    Ok(Some(TurnContent::Blocks(blocks)))
}

/// A reasoning block to send back; reasoning without a signature cannot be (the API checks it),
/// so it is dropped.
fn encode_reasoning(r: &Reasoning) -> Option<Value> {
    if let Some(data) = &r.redacted {
        return Some(json!({ "type": "redacted_thinking", "data": data }));
    }
    let signature = r.signature.as_ref()?;
    Some(json!({ "type": "thinking", "thinking": r.text, "signature": signature }))
}

/// A `tool_use` block; `input` must be a JSON object, and an empty argument text means none.
fn encode_tool_use(call: &ToolCall) -> Result<Value, TranslateError> {
    let input = if call.arguments.trim().is_empty() {
        json!({})
    } else {
        let v: Value =
            serde_json::from_str(&call.arguments).map_err(|e| TranslateError::ToolArguments {
                call_id: call.id.clone(),
                reason: e.to_string(),
            })?;
        if !v.is_object() {
            return Err(TranslateError::ToolArguments {
                call_id: call.id.clone(),
                reason: "not an object".into(),
            });
        }
        v
    };
    Ok(json!({ "type": "tool_use", "id": call.id, "name": call.name, "input": input }))
}

/// A tool message as a `tool_result` block.
fn encode_tool_result(m: &Message) -> Result<Value, TranslateError> {
    let id = m
        .tool_call_id
        .as_ref()
        .ok_or(TranslateError::MissingToolCallId)?;
    let mut block = JsonObject::new();
    block.insert("type".into(), json!("tool_result"));
    block.insert("tool_use_id".into(), json!(id));
    match &m.content {
        None => {}
        Some(Content::Text(t)) => {
            block.insert("content".into(), json!(t));
        }
        Some(Content::Parts(parts)) => {
            let blocks = parts.iter().map(encode_part).collect::<Result<_, _>>()?;
            block.insert("content".into(), Value::Array(blocks));
        }
    }
    // Fields of Anthropic's tool_result a caller speaking Anthropic may have set.
    for key in ["is_error", "cache_control"] {
        if let Some(v) = m.extra.get(key) {
            block.insert(key.into(), v.clone());
        }
    }
    Ok(Value::Object(block))
}

/// One content part as a block.
fn encode_part(p: &ContentPart) -> Result<Value, TranslateError> {
    match p {
        ContentPart::Text { text, extra } => Ok(text_block(text, extra)),
        ContentPart::Image { url, extra, .. } => {
            let mut block = extra.clone();
            block.insert("type".into(), json!("image"));
            block.insert("source".into(), image_source(url)?);
            Ok(Value::Object(block))
        }
        ContentPart::Other(o) => {
            let ty = part_type(o);
            if NATIVE_BLOCKS.contains(&ty) {
                Ok(Value::Object(o.clone()))
            } else {
                Err(TranslateError::Unsupported(format!(
                    "the content part `{ty}`"
                )))
            }
        }
    }
}

/// An image's `source`: base64 bytes from a `data:` URL, else the URL for the API to fetch.
fn image_source(url: &str) -> Result<Value, TranslateError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let bad = || TranslateError::ImageUrl(truncate(url));
        let (header, data) = rest.split_once(',').ok_or_else(bad)?;
        let media_type = header.strip_suffix(";base64").ok_or_else(bad)?;
        if media_type.is_empty() {
            return Err(bad());
        }
        return Ok(json!({ "type": "base64", "media_type": media_type, "data": data }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "url", "url": url }));
    }
    Err(TranslateError::ImageUrl(truncate(url)))
}

/// The start of a URL for an error message (a data URL can be megabytes).
fn truncate(url: &str) -> String {
    const MAX: usize = 64;
    match url.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &url[..i]),
        None => url.to_string(),
    }
}

/// A text block; `extra` (cache_control, citations, ...) rides along.
fn text_block(text: &str, extra: &JsonObject) -> Value {
    let mut block = extra.clone();
    block.insert("type".into(), json!("text"));
    block.insert("text".into(), json!(text));
    Value::Object(block)
}

/// A wire part's `type`.
fn part_type(o: &JsonObject) -> &str {
    o.get("type").and_then(Value::as_str).unwrap_or("")
}

/// A tool definition: a function gets `input_schema`; other kinds (server tools) have their own
/// `type` and pass as they are.
fn encode_tool(t: &Tool) -> Value {
    match t {
        Tool::Function(f) => {
            let mut o: JsonObject = f
                .extra
                .iter()
                .filter(|(k, _)| !OPENAI_ONLY_TOOL_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            o.insert("name".into(), json!(f.name));
            if let Some(d) = &f.description {
                o.insert("description".into(), json!(d));
            }
            o.insert(
                "input_schema".into(),
                f.parameters
                    .clone()
                    .unwrap_or_else(|| json!({ "type": "object", "properties": {} })),
            );
            Value::Object(o)
        }
        Tool::Other(o) => Value::Object(o.clone()),
    }
}

/// `tool_choice`, with OpenAI's `parallel_tool_calls: false` as `disable_parallel_tool_use`.
fn encode_tool_choice(req: &ChatRequest) -> Result<Option<Value>, TranslateError> {
    let serial = req.extra.get("parallel_tool_calls") == Some(&Value::Bool(false));
    let mut choice = match &req.tool_choice {
        None if serial => json!({ "type": "auto" }),
        None => return Ok(None),
        Some(ToolChoice::Auto) => json!({ "type": "auto" }),
        Some(ToolChoice::Required) => json!({ "type": "any" }),
        Some(ToolChoice::Function(name)) => json!({ "type": "tool", "name": name }),
        Some(ToolChoice::None) => json!({ "type": "none" }),
        Some(ToolChoice::Other(v)) if v.is_object() => v.clone(),
        Some(ToolChoice::Other(v)) => {
            return Err(TranslateError::Unsupported(format!("tool_choice {v}")))
        }
    };
    // `none` has no such field: nothing runs in parallel when nothing runs.
    if serial && choice.get("type").and_then(Value::as_str) != Some("none") {
        if let Some(o) = choice.as_object_mut() {
            o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    Ok(Some(choice))
}
