//! A caller's Responses body validated into a neutral [`ChatRequest`], the body itself kept as
//! its [`NativeBody`] for an OpenAI upstream (which receives it untouched but for `model`). What
//! only an upstream that keeps state or runs built-in tools can serve (`previous_response_id`,
//! `conversation`, stored prompts, `web_search`, ...) is allowed here and marked
//! `untranslatable`, so that dispatch refuses it for a target that would need a translation.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::{
    Api, ChatRequest, Content, ContentPart, FunctionTool, JsonObject, Message, NativeBody,
    Reasoning, Role, Tool, ToolCall, ToolChoice,
};
use crate::error::{Reason, Rejection};

/// The request fields a Response object echoes back (translated answers only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Echo {
    /// The model as the caller named it.
    pub model: String,
    /// `instructions`, `tools`, `tool_choice`, `temperature`, ... as sent (or their defaults).
    pub fields: JsonObject,
}

/// Validates a Responses body into a neutral request that carries the body natively too, and
/// what its answer echoes.
pub fn parse_request(bytes: bytes::Bytes) -> Result<(ChatRequest, Echo), Rejection> {
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Rejection::new(
            Reason::InvalidRequest,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(body) = value else {
        return Err(Rejection::new(
            Reason::InvalidRequest,
            "the body must be a JSON object",
        ));
    };
    let mut untranslatable = stateful(&body);
    let (mut req, tool_refusal) = request_from_object(&body, untranslatable.is_some())?;
    untranslatable = untranslatable.or(tool_refusal);
    let echo = echo(&body, &req.model);
    req.native = Some(Arc::new(NativeBody {
        api: Api::Responses,
        body: bytes,
        anthropic_version: None,
        anthropic_beta: Vec::new(),
        hide_usage: false,
        untranslatable,
    }));
    Ok((req, echo))
}

fn bad(param: &str, message: impl Into<String>) -> Rejection {
    Rejection::invalid(param, message)
}

fn present<'a>(body: &'a JsonObject, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

/// Why the body needs state only an upstream keeps.
fn stateful(body: &JsonObject) -> Option<String> {
    let why = |field: &str| {
        format!(
            "tollgate keeps no conversation state, so `{field}` works only with a model that \
             speaks the Responses API natively (an openai provider); send the whole \
             conversation in `input` instead"
        )
    };
    for field in ["previous_response_id", "conversation", "prompt"] {
        if present(body, field).is_some() {
            return Some(why(field));
        }
    }
    if body.get("background") == Some(&Value::Bool(true)) {
        return Some(why("background"));
    }
    None
}

/// The neutral request of a Responses body, and why its tools or items cannot be translated.
fn request_from_object(
    body: &JsonObject,
    stateful: bool,
) -> Result<(ChatRequest, Option<String>), Rejection> {
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => return Err(bad("model", "`model` is required and must be a string")),
    };
    let mut refusal = None;
    let mut messages = Vec::new();
    match present(body, "instructions") {
        None => {}
        Some(Value::String(s)) => messages.push(Message::text(Role::System, s.clone())),
        Some(_) => return Err(bad("instructions", "`instructions` must be a string")),
    }
    match present(body, "input") {
        None if stateful => {}
        None => return Err(bad("input", "`input` is required")),
        Some(Value::String(s)) => messages.push(Message::text(Role::User, s.clone())),
        Some(Value::Array(items)) => {
            if items.is_empty() && !stateful {
                return Err(bad("input", "`input` must not be empty"));
            }
            let mut pending = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(why) = input_item(i, item, &mut messages, &mut pending)? {
                    refusal.get_or_insert(why);
                }
            }
        }
        Some(_) => return Err(bad("input", "`input` must be a string or a list of items")),
    }
    let mut req = ChatRequest::new(model, messages);
    req.api = Api::Responses;
    req.stream = match present(body, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "`stream` must be a boolean")),
    };
    // Every Responses stream ends with `response.completed`, which carries usage.
    req.include_usage = true;
    req.max_tokens = match present(body, "max_output_tokens") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(bad(
                    "max_output_tokens",
                    "`max_output_tokens` must be an integer of at least 1",
                ))
            }
        },
    };
    req.temperature = number(body, "temperature")?;
    req.top_p = number(body, "top_p")?;
    match present(body, "tools") {
        None => {}
        Some(Value::Array(tools)) => {
            for (i, t) in tools.iter().enumerate() {
                let (tool, why) = tool(i, t)?;
                req.tools.push(tool);
                if let Some(why) = why {
                    refusal.get_or_insert(why);
                }
            }
        }
        Some(_) => return Err(bad("tools", "`tools` must be a list")),
    }
    if let Some(choice) = present(body, "tool_choice") {
        req.tool_choice = Some(tool_choice(choice)?);
    }
    match present(body, "parallel_tool_calls") {
        None => {}
        Some(Value::Bool(b)) => {
            req.extra
                .insert("parallel_tool_calls".into(), Value::Bool(*b));
        }
        Some(_) => {
            return Err(bad(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be a boolean",
            ))
        }
    }
    match present(body, "user") {
        None => {}
        Some(Value::String(u)) => {
            req.extra.insert("user".into(), json!(u));
        }
        Some(_) => return Err(bad("user", "`user` must be a string")),
    }
    if present(body, "metadata").is_some_and(|m| !m.is_object()) {
        return Err(bad("metadata", "`metadata` must be an object"));
    }
    match present(body, "reasoning") {
        None => {}
        Some(Value::Object(r)) => {
            // OpenAI chat's name for it, which the neutral request already carries over.
            if let Some(effort) = r.get("effort").and_then(Value::as_str) {
                req.extra.insert("reasoning_effort".into(), json!(effort));
            }
        }
        Some(_) => return Err(bad("reasoning", "`reasoning` must be an object")),
    }
    if let Some(format) = text_format(body)? {
        req.extra.insert("response_format".into(), format);
    }
    // A body only a native upstream can serve may hold no translatable message at all.
    if !stateful && refusal.is_none() {
        req.check_required()?;
    }
    Ok((req, refusal))
}

fn number(body: &JsonObject, key: &str) -> Result<Option<f64>, Rejection> {
    match present(body, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(key, format!("`{key}` must be a number"))),
    }
}

/// `text.format` as chat's `response_format`: `json_schema` and `json_object`; `text` is the
/// default and says nothing.
fn text_format(body: &JsonObject) -> Result<Option<Value>, Rejection> {
    let Some(text) = present(body, "text") else {
        return Ok(None);
    };
    let text = text
        .as_object()
        .ok_or_else(|| bad("text", "`text` must be an object"))?;
    let Some(format) = text.get("format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let f = format
        .as_object()
        .ok_or_else(|| bad("text.format", "`text.format` must be an object"))?;
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("text.format.name", "`text.format.name` is required"))?;
            let mut schema = JsonObject::new();
            schema.insert("name".into(), json!(name));
            for key in ["schema", "strict", "description"] {
                if let Some(v) = f.get(key) {
                    schema.insert(key.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(bad(
            "text.format.type",
            "`text.format.type` must be text, json_object or json_schema",
        )),
    }
}

/// One input item into the neutral messages. Function calls join the assistant message before
/// them (one assistant turn, as the Messages API wants it); reasoning items wait for the next
/// assistant message. Returns why an item cannot be translated, if it cannot.
fn input_item(
    i: usize,
    item: &Value,
    out: &mut Vec<Message>,
    pending: &mut Vec<Reasoning>,
) -> Result<Option<String>, Rejection> {
    let at = format!("input[{i}]");
    let o = item
        .as_object()
        .ok_or_else(|| bad(&at, format!("`{at}` must be an object")))?;
    let ty = o.get("type").and_then(Value::as_str);
    match ty {
        None | Some("message") => {
            let m = message_item(o, &at)?;
            if m.role == Role::Assistant {
                let mut m = m;
                m.reasoning.append(pending);
                out.push(m);
            } else {
                out.push(m);
            }
        }
        Some("function_call") => {
            let call = ToolCall {
                id: req_str(o, "call_id", &at)?.to_string(),
                name: req_str(o, "name", &at)?.to_string(),
                arguments: req_str(o, "arguments", &at)?.to_string(),
                extra: JsonObject::new(),
            };
            match out.last_mut() {
                Some(last) if last.role == Role::Assistant && pending.is_empty() => {
                    last.tool_calls.push(call)
                }
                _ => {
                    let mut m = Message::text(Role::Assistant, String::new());
                    m.content = None;
                    m.tool_calls.push(call);
                    m.reasoning.append(pending);
                    out.push(m);
                }
            }
        }
        Some("function_call_output") => {
            let id = req_str(o, "call_id", &at)?;
            let content = match o.get("output") {
                Some(Value::String(s)) => Content::Text(s.clone()),
                Some(Value::Array(parts)) => Content::Parts(content_parts(parts, &at)?),
                _ => {
                    return Err(bad(
                        &format!("{at}.output"),
                        format!("`{at}.output` must be a string or a list of parts"),
                    ))
                }
            };
            let mut m = Message::text(Role::Tool, String::new());
            m.content = Some(content);
            m.tool_call_id = Some(id.to_string());
            out.push(m);
        }
        Some("reasoning") => {
            let text_of = |key: &str| -> String {
                o.get(key)
                    .and_then(Value::as_array)
                    .map(|ps| {
                        ps.iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join("")
                    })
                    .unwrap_or_default()
            };
            let content = text_of("content");
            pending.push(Reasoning {
                text: if content.is_empty() {
                    text_of("summary")
                } else {
                    content
                },
                // Where tollgate put Anthropic's signature when it said the thinking.
                signature: o
                    .get("encrypted_content")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                redacted: None,
            });
        }
        Some("item_reference") => {
            return Ok(Some(
                "tollgate keeps no conversation state, so `item_reference` input items work \
                 only with a model that speaks the Responses API natively (an openai provider)"
                    .into(),
            ))
        }
        Some(other) => {
            return Ok(Some(format!(
                "tollgate cannot carry `{other}` input items to this model; only messages, \
                 function calls and function call outputs are translated"
            )))
        }
    }
    Ok(None)
}

fn req_str<'a>(o: &'a JsonObject, key: &str, at: &str) -> Result<&'a str, Rejection> {
    o.get(key).and_then(Value::as_str).ok_or_else(|| {
        bad(
            &format!("{at}.{key}"),
            format!("`{at}.{key}` must be a string"),
        )
    })
}

/// A message item: a role, and content as a string or a list of parts.
fn message_item(o: &JsonObject, at: &str) -> Result<Message, Rejection> {
    let role = match o.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("system") => Role::System,
        Some("developer") => Role::Developer,
        _ => {
            return Err(bad(
                &format!("{at}.role"),
                format!("`{at}.role` must be user, assistant, system or developer"),
            ))
        }
    };
    let content = match o.get("content") {
        Some(Value::String(s)) => Content::Text(s.clone()),
        Some(Value::Array(parts)) => {
            let parts = content_parts(parts, at)?;
            let only_text = parts
                .iter()
                .all(|p| matches!(p, ContentPart::Text { extra, .. } if extra.is_empty()));
            if only_text {
                Content::Text(Content::Parts(parts).text())
            } else {
                Content::Parts(parts)
            }
        }
        _ => {
            return Err(bad(
                &format!("{at}.content"),
                format!("`{at}.content` must be a string or a list of parts"),
            ))
        }
    };
    let mut m = Message::text(role, String::new());
    m.content = Some(content);
    Ok(m)
}

/// Content parts: text (`input_text`, `output_text`), images by URL; files and the rest kept
/// whole.
fn content_parts(parts: &[Value], at: &str) -> Result<Vec<ContentPart>, Rejection> {
    let mut out = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        let pat = format!("{at}.content[{j}]");
        let o = p
            .as_object()
            .ok_or_else(|| bad(&pat, format!("`{pat}` must be an object")))?;
        match o.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text") => out.push(ContentPart::Text {
                text: req_str(o, "text", &pat)?.to_string(),
                extra: JsonObject::new(),
            }),
            Some("refusal") => out.push(ContentPart::Text {
                text: req_str(o, "refusal", &pat)?.to_string(),
                extra: JsonObject::new(),
            }),
            Some("input_image") => match o.get("image_url").and_then(Value::as_str) {
                Some(url) => out.push(ContentPart::Image {
                    url: url.to_string(),
                    detail: o.get("detail").and_then(Value::as_str).map(str::to_string),
                    extra: JsonObject::new(),
                }),
                // A file id: only an upstream that holds the file can read it.
                None => out.push(ContentPart::Other(o.clone())),
            },
            Some(_) => out.push(ContentPart::Other(o.clone())),
            None => return Err(bad(&pat, format!("`{pat}.type` is required"))),
        }
    }
    Ok(out)
}

/// A tool definition: a function tool, or a built-in tool kept whole with why it cannot be
/// translated.
fn tool(i: usize, t: &Value) -> Result<(Tool, Option<String>), Rejection> {
    let at = format!("tools[{i}]");
    let o = t
        .as_object()
        .ok_or_else(|| bad(&at, format!("`{at}` must be an object")))?;
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            let why = format!(
                "tollgate cannot run the built-in tool `{other}` for this model; only function \
                 tools are translated (a model that speaks the Responses API natively, an openai \
                 provider, runs its own tools)"
            );
            return Ok((Tool::Other(o.clone()), Some(why)));
        }
        None => {
            return Err(bad(
                &format!("{at}.type"),
                format!("`{at}.type` is required"),
            ))
        }
    }
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad(&format!("{at}.name"), format!("`{at}.name` is required")))?;
    let mut extra = JsonObject::new();
    if let Some(strict) = o.get("strict").filter(|v| !v.is_null()) {
        extra.insert("strict".into(), strict.clone());
    }
    Ok((
        Tool::Function(FunctionTool {
            name: name.to_string(),
            description: o
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            parameters: o.get("parameters").filter(|v| !v.is_null()).cloned(),
            extra,
        }),
        None,
    ))
}

/// `tool_choice`: `auto`, `none`, `required`, or `{"type":"function","name"}`; other forms
/// (built-in tools, allowed lists) kept as sent.
fn tool_choice(v: &Value) -> Result<ToolChoice, Rejection> {
    Ok(match v {
        Value::String(s) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => {
                return Err(bad(
                    "tool_choice",
                    "`tool_choice` must be auto, none, required or an object",
                ))
            }
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            ToolChoice::Function(
                o.get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("tool_choice.name", "`tool_choice.name` is required"))?
                    .to_string(),
            )
        }
        Value::Object(_) => ToolChoice::Other(v.clone()),
        _ => {
            return Err(bad(
                "tool_choice",
                "`tool_choice` must be a string or an object",
            ))
        }
    })
}

/// The fields a Response object repeats from its request, with the API's defaults.
fn echo(body: &JsonObject, model: &str) -> Echo {
    let mut fields = JsonObject::new();
    let get = |k: &str, default: Value| present(body, k).cloned().unwrap_or(default);
    fields.insert("instructions".into(), get("instructions", Value::Null));
    fields.insert(
        "max_output_tokens".into(),
        get("max_output_tokens", Value::Null),
    );
    fields.insert("metadata".into(), get("metadata", json!({})));
    fields.insert(
        "parallel_tool_calls".into(),
        get("parallel_tool_calls", json!(true)),
    );
    fields.insert(
        "reasoning".into(),
        get("reasoning", json!({"effort": null})),
    );
    fields.insert("temperature".into(), get("temperature", json!(1.0)));
    fields.insert(
        "text".into(),
        get("text", json!({"format": {"type": "text"}})),
    );
    fields.insert("tool_choice".into(), get("tool_choice", json!("auto")));
    fields.insert("tools".into(), get("tools", json!([])));
    fields.insert("top_p".into(), get("top_p", json!(1.0)));
    fields.insert("user".into(), get("user", Value::Null));
    fields.insert("store".into(), json!(false));
    Echo {
        model: model.to_string(),
        fields,
    }
}
