//! What the real Messages API refuses with 400 `invalid_request_error`, with its wording, so a
//! translation mistake in tollgate cannot pass the fake unnoticed.

use serde_json::{json, Map, Value};

const TOP_LEVEL: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
    "inference_geo",
    "cache_control",
    "diagnostics",
    "speed",
];
const CUSTOM_TOOL: &[&str] = &[
    "type",
    "name",
    "description",
    "input_schema",
    "cache_control",
    "strict",
    "input_examples",
    "allowed_callers",
    "defer_loading",
    "eager_input_streaming",
];

/// A string that is there and not empty.
fn filled(s: Option<&str>) -> bool {
    s.is_some_and(|s| !s.is_empty())
}

fn extra_keys(obj: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("{at}{k}: Extra inputs are not permitted")),
        None => Ok(()),
    }
}

/// The 400 `invalid_request_error` message the real API gives `body`, if it refuses it.
pub fn validate(body: &Map<String, Value>) -> Result<(), String> {
    extra_keys(body, TOP_LEVEL, "")?;
    match body.get("model") {
        None => return Err("model: Field required".into()),
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(_) => return Err("model: Input should be a valid string".into()),
    }
    let max_tokens = match body.get("max_tokens") {
        None => return Err("max_tokens: Field required".into()),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or("max_tokens: Input should be a valid integer greater than or equal to 1")?,
    };
    let messages = match body.get("messages") {
        None => return Err("messages: Field required".into()),
        Some(Value::Array(m)) => m,
        Some(_) => return Err("messages: Input should be a valid list".into()),
    };
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    for (i, m) in messages.iter().enumerate() {
        validate_message(i, m, i + 1 == messages.len())?;
    }
    if messages[0]["role"] != "user" {
        return Err("messages: first message must use the \"user\" role".into());
    }
    validate_tool_pairs(messages)?;
    match body.get("system") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(blocks)) => {
            for (j, b) in blocks.iter().enumerate() {
                if b["type"] != "text" || !filled(b["text"].as_str()) {
                    return Err(format!(
                        "system.{j}: system blocks must be non-empty text blocks"
                    ));
                }
            }
        }
        Some(_) => {
            return Err("system: Input should be a valid string or a list of text blocks".into())
        }
    }
    if let Some(t) = body.get("temperature") {
        match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => {}
            Some(_) => return Err("temperature: Input should be less than or equal to 1".into()),
            None => return Err("temperature: Input should be a valid number".into()),
        }
    }
    if let Some(s) = body.get("stop_sequences") {
        if !s.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
            return Err("stop_sequences: Input should be a valid list of strings".into());
        }
    }
    if body.get("stream").is_some_and(|s| !s.is_boolean()) {
        return Err("stream: Input should be a valid boolean".into());
    }
    if let Some(m) = body.get("metadata") {
        let m = m
            .as_object()
            .ok_or("metadata: Input should be a valid dictionary")?;
        extra_keys(m, &["user_id"], "metadata.")?;
    }
    if let Some(tools) = body.get("tools") {
        let tools = tools
            .as_array()
            .ok_or("tools: Input should be a valid list")?;
        for (i, tool) in tools.iter().enumerate() {
            validate_tool(i, tool)?;
        }
    }
    if let Some(choice) = body.get("tool_choice") {
        let c = choice
            .as_object()
            .ok_or("tool_choice: Input should be a valid dictionary")?;
        extra_keys(
            c,
            &["type", "name", "disable_parallel_tool_use"],
            "tool_choice.",
        )?;
        match c.get("type").and_then(Value::as_str) {
            Some("auto" | "any" | "none") => {}
            Some("tool") if c.get("name").is_some_and(Value::is_string) => {}
            Some("tool") => return Err("tool_choice.tool.name: Field required".into()),
            _ => return Err("tool_choice: Input tag found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'".into()),
        }
    }
    if let Some(thinking) = body.get("thinking") {
        match thinking["type"].as_str() {
            Some("enabled") => {
                let budget = thinking["budget_tokens"].as_u64().unwrap_or(0);
                if budget < 1024 {
                    return Err("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024".into());
                }
                if budget >= max_tokens {
                    return Err("`max_tokens` must be greater than `thinking.budget_tokens`".into());
                }
            }
            Some("disabled" | "adaptive") => {}
            _ => return Err("thinking: Input tag found using 'type' does not match any of the expected tags: 'enabled', 'disabled', 'adaptive'".into()),
        }
    }
    Ok(())
}

fn validate_tool(i: usize, tool: &Value) -> Result<(), String> {
    let t = tool
        .as_object()
        .ok_or(format!("tools.{i}: Input should be a valid dictionary"))?;
    match t.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        // Server tools (`web_search_20250305`, ...) have shapes of their own.
        Some(ty) if is_server_tool(ty) => return Ok(()),
        Some(ty) => {
            return Err(format!(
                "tools.{i}: Input tag '{ty}' found using 'type' does not match any of the expected tags"
            ))
        }
    }
    extra_keys(t, CUSTOM_TOOL, &format!("tools.{i}.custom."))?;
    if !filled(t.get("name").and_then(Value::as_str)) {
        return Err(format!("tools.{i}.custom.name: Field required"));
    }
    match t.get("input_schema") {
        None => Err(format!("tools.{i}.custom.input_schema: Field required")),
        Some(s) if s.get("type") == Some(&json!("object")) => Ok(()),
        Some(_) => Err(format!(
            "tools.{i}.custom.input_schema.type: Input should be 'object'"
        )),
    }
}

/// `name_YYYYMMDD` (a versioned server tool) or `mcp_toolset`.
fn is_server_tool(ty: &str) -> bool {
    ty == "mcp_toolset"
        || ty.rsplit_once('_').is_some_and(|(name, date)| {
            !name.is_empty() && date.len() == 8 && date.bytes().all(|c| c.is_ascii_digit())
        })
}

fn validate_message(i: usize, m: &Value, last: bool) -> Result<(), String> {
    let obj = m
        .as_object()
        .ok_or(format!("messages.{i}: Input should be a valid dictionary"))?;
    extra_keys(obj, &["role", "content"], &format!("messages.{i}."))?;
    let role = match obj.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        _ => {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ))
        }
    };
    let empty = || {
        format!("messages.{i}: all messages must have non-empty content except for the optional final assistant message")
    };
    match obj.get("content") {
        None => Err(format!("messages.{i}.content: Field required")),
        Some(Value::String(s)) if s.is_empty() && !(last && role == "assistant") => Err(empty()),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(blocks)) if blocks.is_empty() && !(last && role == "assistant") => {
            Err(empty())
        }
        Some(Value::Array(blocks)) => blocks
            .iter()
            .enumerate()
            .try_for_each(|(j, b)| validate_block(i, j, role, b)),
        Some(_) => Err(format!(
            "messages.{i}.content: Input should be a valid string or list"
        )),
    }
}

fn validate_block(i: usize, j: usize, role: &str, b: &Value) -> Result<(), String> {
    let at = format!("messages.{i}.content.{j}");
    let obj = b
        .as_object()
        .ok_or(format!("{at}: Input should be a valid dictionary"))?;
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or(format!("{at}.type: Field required"))?;
    let string = |k: &str| obj.get(k).and_then(Value::as_str);
    match ty {
        "text" => {
            extra_keys(obj, &["type", "text", "cache_control", "citations"], &format!("{at}.text."))?;
            if !filled(string("text")) {
                return Err("messages: text content blocks must be non-empty".into());
            }
        }
        "image" | "document" => {
            if !obj.get("source").is_some_and(Value::is_object) {
                return Err(format!("{at}.{ty}.source: Field required"));
            }
        }
        "tool_use" => {
            extra_keys(obj, &["type", "id", "name", "input", "cache_control", "caller", "toolset_name"], &format!("{at}.tool_use."))?;
            if role != "assistant" {
                return Err(format!("{at}: tool_use blocks can only appear in assistant messages"));
            }
            if !filled(string("id")) || !filled(string("name")) {
                return Err(format!("{at}.tool_use: `id` and `name` are required"));
            }
            if !obj.get("input").is_some_and(Value::is_object) {
                return Err(format!("{at}.tool_use.input: Input should be a valid dictionary"));
            }
        }
        "tool_result" => {
            extra_keys(obj, &["type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"], &format!("{at}.tool_result."))?;
            if role != "user" {
                return Err(format!("{at}: tool_result blocks can only appear in user messages"));
            }
            if string("tool_use_id").is_none() {
                return Err(format!("{at}.tool_result.tool_use_id: Field required"));
            }
            match obj.get("content") {
                None | Some(Value::String(_)) => {}
                Some(Value::Array(parts)) if parts.iter().all(|p| p["type"] == "text" || p["type"] == "image") => {}
                Some(_) => return Err(format!("{at}.tool_result.content: Input should be a valid string or list of text or image blocks")),
            }
        }
        "thinking" => {
            extra_keys(obj, &["type", "thinking", "signature"], &format!("{at}.thinking."))?;
            if string("thinking").is_none() || string("signature").is_none() {
                return Err(format!("{at}.thinking: `thinking` and `signature` are required"));
            }
        }
        "redacted_thinking" => {
            extra_keys(obj, &["type", "data"], &format!("{at}.redacted_thinking."))?;
        }
        other => {
            return Err(format!(
                "{at}: Input tag '{other}' found using 'type' does not match any of the expected tags: 'text', 'image', 'document', 'tool_use', 'tool_result', 'thinking', 'redacted_thinking'"
            ))
        }
    }
    Ok(())
}

fn blocks_of<'a>(m: &'a Value, ty: &'a str) -> impl Iterator<Item = (usize, &'a Value)> + 'a {
    m["content"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(move |(_, b)| b["type"] == ty)
}

/// Every `tool_result` answers a `tool_use` of the turn just before it, and every `tool_use`
/// (but in the last turn) is answered in the turn just after it.
fn validate_tool_pairs(messages: &[Value]) -> Result<(), String> {
    for (i, m) in messages.iter().enumerate() {
        let prev_ids: Vec<&str> = match i.checked_sub(1) {
            Some(p) if messages[p]["role"] == "assistant" => blocks_of(&messages[p], "tool_use")
                .filter_map(|(_, b)| b["id"].as_str())
                .collect(),
            _ => Vec::new(),
        };
        for (j, b) in blocks_of(m, "tool_result") {
            let id = b["tool_use_id"].as_str().unwrap_or_default();
            if !prev_ids.contains(&id) {
                return Err(format!(
                    "messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. \
                     Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                ));
            }
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if let Some(next) = messages.get(i + 1) {
            let answered: Vec<&str> = blocks_of(next, "tool_result")
                .filter_map(|(_, b)| b["tool_use_id"].as_str())
                .collect();
            let missing: Vec<&str> = blocks_of(m, "tool_use")
                .filter_map(|(_, b)| b["id"].as_str())
                .filter(|id| !answered.contains(id))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. \
                     Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
                    missing.join(", ")
                ));
            }
        }
    }
    Ok(())
}
