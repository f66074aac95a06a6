//! Chat requests: a caller's body validated into a [`ChatRequest`], and the body an
//! OpenAI-compatible upstream receives.

use std::sync::Arc;

use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::message::{message_from_object, MessageView};
use super::plain_request::read_plain_request;
use super::{
    asks_for_usage, put_extra, take_f64, take_string, take_u64, take_where, to_object, At, BadField,
};
use super::{Each, Float};
use crate::api::native::with_first_member;
use crate::api::{
    Api, ChatRequest, FunctionTool, JsonObject, MaxTokensField, NativeBody, Role, Tool, ToolChoice,
};
use crate::error::{Reason, Rejection};

/// [`parse_request`], keeping the body as sent for an upstream that speaks this wire (an
/// `openai` provider), which then gets it byte for byte with only `model` changed. tollgate
/// accounts every stream by its usage chunk: a stream whose caller did not ask for it gets
/// `stream_options` with `include_usage` put in as the body's first member (and the usage is
/// kept from the caller); one whose `stream_options` says otherwise is translated instead.
pub fn parse_request_keeping_body(bytes: Bytes) -> Result<ChatRequest, Rejection> {
    let mut req = parse_request(&bytes)?;
    let (body, hide_usage) = if !req.stream || req.include_usage {
        (Some(bytes), false)
    } else if req.extra.contains_key("stream_options") {
        (None, false)
    } else {
        let asked = with_first_member(&bytes, r#""stream_options":{"include_usage":true}"#);
        (asked.map(Bytes::from), true)
    };
    req.native = body.map(|body| {
        Arc::new(NativeBody {
            api: Api::ChatCompletions,
            body,
            anthropic_version: None,
            anthropic_beta: Vec::new(),
            hide_usage,
            untranslatable: None,
        })
    });
    Ok(req)
}

/// Parses and validates an OpenAI chat-completions request body.
pub fn parse_request(bytes: &[u8]) -> Result<ChatRequest, Rejection> {
    match read_plain_request(bytes) {
        Some(req) => Ok(req),
        None => parse_request_tree(bytes),
    }
}

/// [`parse_request`] through a `Value` tree of the whole body: every shape, every refusal.
pub(super) fn parse_request_tree(bytes: &[u8]) -> Result<ChatRequest, Rejection> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Rejection::new(
            Reason::InvalidRequest,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(body) => request_from_object(body),
        _ => Err(Rejection::new(
            Reason::InvalidRequest,
            "the body must be a JSON object",
        )),
    }
}

/// Validates a body already parsed into an object (the gRPC adapter builds one from extra_json).
pub fn request_from_object(mut body: JsonObject) -> Result<ChatRequest, Rejection> {
    // The checks tollgate has always made come first, so that a body they reject is rejected
    // with the same param and message as before the typed checks existed.
    check_basics(&body)?;
    typed_request(&body).map_err(BadField::into_rejection)?;
    let model = take_string(&mut body, "model").unwrap_or_default();
    let stream = matches!(body.remove("stream"), Some(Value::Bool(true)));
    let include_usage = asks_for_usage(&body);
    let messages = match body.remove("messages") {
        Some(Value::Array(m)) => m,
        _ => Vec::new(),
    };
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(index, m)| {
            let at = At {
                list: "messages",
                index,
                suffix: "",
            };
            match m {
                Value::Object(o) => message_from_object(o, at, Role::User),
                // check_basics let no such message through.
                _ => Err(BadField::new(at, "must be an object")),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(BadField::into_rejection)?;
    let mut req = ChatRequest::new(model, messages);
    req.stream = stream;
    req.include_usage = include_usage;
    take_top_level(&mut req, body);
    Ok(req)
}

/// Reads an object of top-level fields into `req` with OpenAI's meaning (the gRPC adapter's
/// `extra_json`): the modelled ones into the typed fields, the rest into `req.extra`. `model`,
/// `messages` and `stream` are the caller's to set.
pub fn apply_top_level(req: &mut ChatRequest, body: JsonObject) -> Result<(), Rejection> {
    check_fields(&body)?;
    typed_request(&body).map_err(BadField::into_rejection)?;
    take_top_level(req, body);
    Ok(())
}

/// Moves the modelled top-level fields out of a checked body; what is left is `extra`.
fn take_top_level(req: &mut ChatRequest, mut body: JsonObject) {
    let tools = match take_where(
        &mut body,
        "tools",
        |v| matches!(v, Value::Array(a) if !a.is_empty()),
    ) {
        Some(Value::Array(tools)) => tools
            .into_iter()
            .filter_map(|t| match t {
                Value::Object(o) => Some(tool_from_object(o)),
                // typed_request let no other entry through.
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let tool_choice =
        take_where(&mut body, "tool_choice", |v| !v.is_null()).map(tool_choice_from_value);
    // When both caps came, `max_completion_tokens` rules and `max_tokens` rides along as sent.
    let (max_tokens, max_tokens_field) = match take_u64(&mut body, "max_completion_tokens") {
        Some(n) => (Some(n), MaxTokensField::MaxCompletionTokens),
        None => (take_u64(&mut body, "max_tokens"), MaxTokensField::MaxTokens),
    };
    let temperature = take_f64(&mut body, "temperature");
    let top_p = take_f64(&mut body, "top_p");
    let stop = match take_where(&mut body, "stop", |v| match v {
        Value::String(_) => true,
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }) {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    req.tools = tools;
    req.tool_choice = tool_choice;
    req.max_tokens = max_tokens;
    req.max_tokens_field = max_tokens_field;
    req.temperature = temperature;
    req.top_p = top_p;
    req.stop = stop;
    req.extra = body;
}

/// The checks of the body that predate the typed fields: `model` a non-empty string, `messages`
/// a non-empty array of objects with a string `role`, `stream` a boolean, the output caps
/// non-negative integers, `temperature` a number.
fn check_basics(body: &JsonObject) -> Result<(), Rejection> {
    match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => {}
        Some(Value::String(_)) | None => {
            return Err(Rejection::invalid("model", "`model` is required"))
        }
        Some(_) => return Err(Rejection::invalid("model", "`model` must be a string")),
    }
    match body.get("messages") {
        Some(Value::Array(msgs)) if msgs.is_empty() => {
            return Err(Rejection::invalid(
                "messages",
                "`messages` must not be empty",
            ))
        }
        Some(Value::Array(msgs)) => {
            for (i, m) in msgs.iter().enumerate() {
                let Some(obj) = m.as_object() else {
                    return Err(Rejection::invalid(
                        &format!("messages[{i}]"),
                        format!("`messages[{i}]` must be an object"),
                    ));
                };
                if !matches!(obj.get("role"), Some(Value::String(r)) if !r.is_empty()) {
                    return Err(Rejection::invalid(
                        &format!("messages[{i}].role"),
                        format!("`messages[{i}].role` must be a non-empty string"),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(Rejection::invalid(
                "messages",
                "`messages` must be an array",
            ))
        }
        None => return Err(Rejection::invalid("messages", "`messages` is required")),
    }
    check_fields(body)
}

/// The old checks of the optional fields: `stream` a boolean, the output caps non-negative
/// integers, `temperature` a number.
fn check_fields(body: &JsonObject) -> Result<(), Rejection> {
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => return Err(Rejection::invalid("stream", "`stream` must be a boolean")),
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64().is_some() => {}
            Some(_) => {
                return Err(Rejection::invalid(
                    field,
                    format!("`{field}` must be a non-negative integer"),
                ))
            }
        }
    }
    if let Some(t) = body.get("temperature") {
        if !t.is_null() && !t.is_number() {
            return Err(Rejection::invalid(
                "temperature",
                "`temperature` must be a number",
            ));
        }
    }
    Ok(())
}

/// The checks of the top-level typed fields added with the neutral types (messages are checked
/// as they are read): `tools` an array of objects, `top_p` a number, `stop` a string or an array
/// of strings, `tool_choice` a string or an object. `null` passes for each, as for the others.
fn typed_request(body: &JsonObject) -> Result<(), BadField> {
    match body.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            if let Some(i) = tools.iter().position(|t| !t.is_object()) {
                return Err(BadField::new(
                    At {
                        list: "tools",
                        index: i,
                        suffix: "",
                    },
                    "must be an object",
                ));
            }
        }
        Some(_) => return Err(BadField::new("tools", "must be an array of objects")),
    }
    if body
        .get("top_p")
        .is_some_and(|v| !v.is_null() && !v.is_number())
    {
        return Err(BadField::new("top_p", "must be a number"));
    }
    match body.get("stop") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(BadField::new(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    }
    match body.get("tool_choice") {
        None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(BadField::new(
                "tool_choice",
                "must be a string or an object",
            ))
        }
    }
    Ok(())
}

/// A `tools` entry: exactly `{"type": "function", "function": {...}}` with a string `name` is
/// typed; any other shape is kept whole.
fn tool_from_object(mut tool: JsonObject) -> Tool {
    let is_function = tool.len() == 2
        && tool.get("type").and_then(Value::as_str) == Some("function")
        && tool
            .get("function")
            .is_some_and(|f| f.get("name").is_some_and(Value::is_string));
    if !is_function {
        return Tool::Other(tool);
    }
    let mut f = match tool.remove("function") {
        Some(Value::Object(f)) => f,
        _ => JsonObject::new(),
    };
    Tool::Function(FunctionTool {
        name: take_string(&mut f, "name").unwrap_or_default(),
        description: take_string(&mut f, "description"),
        parameters: take_where(&mut f, "parameters", |p| !p.is_null()),
        extra: f,
    })
}

/// `tool_choice` (not `null`: that stays in `extra`).
fn tool_choice_from_value(v: Value) -> ToolChoice {
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => ToolChoice::Other(Value::String(s)),
        },
        Value::Object(o) => match named_function(&o) {
            Some(name) => ToolChoice::Function(name.to_string()),
            None => ToolChoice::Other(Value::Object(o)),
        },
        other => ToolChoice::Other(other),
    }
}

/// The name in exactly `{"type": "function", "function": {"name": ...}}`.
fn named_function(o: &JsonObject) -> Option<&str> {
    if o.len() != 2 || o.get("type")?.as_str()? != "function" {
        return None;
    }
    let f = o.get("function")?.as_object()?;
    if f.len() != 1 {
        return None;
    }
    f.get("name")?.as_str()
}

/// The JSON object sent to an OpenAI-compatible upstream: `model` replaced, `stream` set.
pub fn request_to_object(req: &ChatRequest, model: &str, stream: bool) -> JsonObject {
    to_object(RequestView { req, model, stream })
}

/// The same, serialized (what goes on the wire).
pub fn encode_request(req: &ChatRequest, model: &str, stream: bool) -> Vec<u8> {
    // A view with string keys only: serde_json cannot fail on it.
    serde_json::to_vec(&RequestView { req, model, stream }).unwrap_or_default()
}

/// A request as an upstream receives it.
struct RequestView<'a> {
    req: &'a ChatRequest,
    model: &'a str,
    stream: bool,
}

impl Serialize for RequestView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.req;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("model", self.model)?;
        m.serialize_entry("messages", &Each(&r.messages, MessageView))?;
        if !r.tools.is_empty() {
            m.serialize_entry("tools", &Each(&r.tools, ToolView))?;
        }
        if let Some(tc) = &r.tool_choice {
            m.serialize_entry("tool_choice", &ToolChoiceView(tc))?;
        }
        let max_key = match r.max_tokens_field {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        };
        if let Some(n) = r.max_tokens {
            m.serialize_entry(max_key, &n)?;
        }
        if let Some(t) = r.temperature {
            m.serialize_entry("temperature", &Float(t))?;
        }
        if let Some(p) = r.top_p {
            m.serialize_entry("top_p", &Float(p))?;
        }
        if !r.stop.is_empty() {
            m.serialize_entry("stop", &r.stop)?;
        }
        m.serialize_entry("stream", &self.stream)?;
        if self.stream {
            // tollgate accounts every stream, so it always asks for the usage chunk.
            m.serialize_entry(
                "stream_options",
                &StreamOptionsView(r.extra.get("stream_options")),
            )?;
        }
        put_extra(&mut m, &r.extra, |k| match k {
            "model" | "messages" | "stream" | "stream_options" => true,
            "tools" => !r.tools.is_empty(),
            "tool_choice" => r.tool_choice.is_some(),
            "temperature" => r.temperature.is_some(),
            "top_p" => r.top_p.is_some(),
            "stop" => !r.stop.is_empty(),
            k => k == max_key && r.max_tokens.is_some(),
        })?;
        m.end()
    }
}

/// The caller's `stream_options` (other keys kept) with `include_usage: true`.
struct StreamOptionsView<'a>(Option<&'a Value>);

impl Serialize for StreamOptionsView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(Value::Object(o)) = self.0 {
            put_extra(&mut m, o, |k| k == "include_usage")?;
        }
        m.serialize_entry("include_usage", &true)?;
        m.end()
    }
}

/// A `tools` entry.
struct ToolView<'a>(&'a Tool);

impl Serialize for ToolView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Tool::Function(f) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("type", "function")?;
                m.serialize_entry("function", &FunctionToolView(f))?;
                m.end()
            }
            Tool::Other(o) => o.serialize(s),
        }
    }
}

/// A function tool's definition.
struct FunctionToolView<'a>(&'a FunctionTool);

impl Serialize for FunctionToolView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let f = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &f.name)?;
        if let Some(d) = &f.description {
            m.serialize_entry("description", d)?;
        }
        if let Some(p) = &f.parameters {
            m.serialize_entry("parameters", p)?;
        }
        put_extra(&mut m, &f.extra, |k| match k {
            "name" => true,
            "description" => f.description.is_some(),
            "parameters" => f.parameters.is_some(),
            _ => false,
        })?;
        m.end()
    }
}

/// `tool_choice`.
struct ToolChoiceView<'a>(&'a ToolChoice);

impl Serialize for ToolChoiceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            ToolChoice::Auto => s.serialize_str("auto"),
            ToolChoice::None => s.serialize_str("none"),
            ToolChoice::Required => s.serialize_str("required"),
            ToolChoice::Function(name) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("type", "function")?;
                m.serialize_entry("function", &NameView(name))?;
                m.end()
            }
            ToolChoice::Other(v) => v.serialize(s),
        }
    }
}

/// `{"name": ...}`.
struct NameView<'a>(&'a str);

impl Serialize for NameView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("name", self.0)?;
        m.end()
    }
}
