//! Streamed answers: an upstream's `chat.completion.chunk` payloads into [`ChatDelta`]s, and
//! back for a caller.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::message::FunctionCallView;
use super::response::take_finish_reason;
use super::{put_extra, take_index, take_string, take_u64, take_where, to_object, Each};
use crate::api::{ChatDelta, ChoiceDelta, JsonObject, StopReason, ToolCallDelta, Usage};

/// How much of an unrecognised error object goes into the message.
const ERROR_EXCERPT_CHARS: usize = 300;

/// One SSE `data:` payload of an upstream stream (not `[DONE]`); Err for bad JSON or an in-stream `{"error": {...}}` object (message included).
pub fn parse_chunk(data: &str) -> Result<ChatDelta, String> {
    let chunk: JsonObject = serde_json::from_str(data).map_err(|e| format!("bad chunk: {e}"))?;
    if let Some(err) = chunk.get("error") {
        return Err(format!("error in the stream: {}", error_text(err)));
    }
    // vLLM and some other servers send the error object itself.
    if chunk.get("object").and_then(Value::as_str) == Some("error") {
        let text = match chunk.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => excerpt(data),
        };
        return Err(format!("error in the stream: {text}"));
    }
    chunk_from_object(chunk)
}

/// The message of an `error` value: `{"message": ...}`, a bare string, or an excerpt.
fn error_text(err: &Value) -> String {
    match err {
        Value::String(s) => s.clone(),
        other => match other.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => excerpt(&other.to_string()),
        },
    }
}

fn excerpt(s: &str) -> String {
    s.chars().take(ERROR_EXCERPT_CHARS).collect()
}

/// A chunk object.
fn chunk_from_object(mut chunk: JsonObject) -> Result<ChatDelta, String> {
    let choices = match chunk.remove("choices") {
        // A usage-only chunk may leave `choices` out; a chunk with neither says nothing.
        None | Some(Value::Null) if chunk.get("usage").is_some_and(|u| !u.is_null()) => Vec::new(),
        None | Some(Value::Null) => return Err("a chunk with neither `choices` nor `usage`".into()),
        Some(Value::Array(c)) => c,
        Some(_) => return Err("`choices` in a chunk is not an array".into()),
    };
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c {
            Value::Object(o) => Ok(choice_from_object(o, i)),
            _ => Err(format!("`choices[{i}]` in a chunk is not an object")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    chunk.remove("object");
    Ok(ChatDelta {
        id: take_string(&mut chunk, "id").unwrap_or_default(),
        created: take_u64(&mut chunk, "created").unwrap_or(0),
        model: take_string(&mut chunk, "model").unwrap_or_default(),
        choices,
        // Every chunk of a stream with usage carries `"usage": null` until the last one.
        usage: chunk.remove("usage").and_then(|u| Usage::from_openai(&u)),
        extra: chunk,
    })
}

/// `choices[i]` of a chunk. Values of a typed key in another shape (`"content": null`) stay in
/// the extras, so the chunk goes back out as it came.
fn choice_from_object(mut o: JsonObject, i: usize) -> ChoiceDelta {
    let index = take_index(&mut o, i);
    let finish_reason = take_finish_reason(&mut o);
    let mut delta = match take_where(&mut o, "delta", Value::is_object) {
        Some(Value::Object(d)) => d,
        _ => JsonObject::new(),
    };
    let tool_calls = match take_where(&mut delta, "tool_calls", |v| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_object))
    }) {
        Some(Value::Array(pieces)) => pieces
            .into_iter()
            .enumerate()
            .filter_map(|(j, p)| match p {
                Value::Object(p) => Some(piece_from_object(p, j)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    ChoiceDelta {
        index,
        role: take_string(&mut delta, "role"),
        content: take_string(&mut delta, "content"),
        reasoning: take_string(&mut delta, "reasoning_content"),
        reasoning_signature: None,
        tool_calls,
        finish_reason,
        extra: o,
        delta_extra: delta,
    }
}

/// A piece of a tool call. `type: "function"` is dropped where the encoder puts it back (on a
/// piece with an `id` or a `name`); keys of `function` other than `name` and `arguments` stay
/// under `extra["function"]`.
fn piece_from_object(mut p: JsonObject, j: usize) -> ToolCallDelta {
    let index = take_index(&mut p, j);
    let id = take_string(&mut p, "id");
    let (name, arguments) = match p.get_mut("function") {
        Some(Value::Object(f)) => (
            take_string(f, "name"),
            take_string(f, "arguments").unwrap_or_default(),
        ),
        _ => (None, String::new()),
    };
    if p.get("function")
        .and_then(Value::as_object)
        .is_some_and(JsonObject::is_empty)
    {
        p.remove("function");
    }
    if (id.is_some() || name.is_some()) && p.get("type").and_then(Value::as_str) == Some("function")
    {
        p.remove("type");
    }
    ToolCallDelta {
        index,
        id,
        name,
        arguments,
        extra: p,
    }
}

/// A chat.completion.chunk object for a caller.
pub fn chunk_to_object(delta: &ChatDelta) -> JsonObject {
    to_object(ChunkView(delta))
}

/// The same as JSON text.
pub fn encode_chunk(delta: &ChatDelta) -> String {
    // A view with string keys only: serde_json cannot fail on it.
    serde_json::to_string(&ChunkView(delta)).unwrap_or_default()
}

/// A chunk on the wire.
struct ChunkView<'a>(&'a ChatDelta);

impl Serialize for ChunkView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &d.id)?;
        m.serialize_entry("object", "chat.completion.chunk")?;
        m.serialize_entry("created", &d.created)?;
        m.serialize_entry("model", &d.model)?;
        m.serialize_entry("choices", &Each(&d.choices, ChoiceView))?;
        if let Some(u) = d.usage {
            m.serialize_entry("usage", &u.to_openai())?;
        }
        put_extra(&mut m, &d.extra, |k| match k {
            "id" | "object" | "created" | "model" | "choices" => true,
            "usage" => d.usage.is_some(),
            _ => false,
        })?;
        m.end()
    }
}

/// One choice of a chunk.
struct ChoiceView<'a>(&'a ChoiceDelta);

impl Serialize for ChoiceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("index", &c.index)?;
        m.serialize_entry("delta", &DeltaView(c))?;
        m.serialize_entry(
            "finish_reason",
            &c.finish_reason.as_ref().map(StopReason::as_openai),
        )?;
        put_extra(&mut m, &c.extra, |k| {
            matches!(k, "index" | "delta" | "finish_reason")
        })?;
        m.end()
    }
}

/// The `delta` of a choice.
struct DeltaView<'a>(&'a ChoiceDelta);

impl Serialize for DeltaView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut m = s.serialize_map(None)?;
        if let Some(r) = &c.role {
            m.serialize_entry("role", r)?;
        }
        if let Some(t) = &c.content {
            m.serialize_entry("content", t)?;
        }
        if let Some(r) = &c.reasoning {
            m.serialize_entry("reasoning_content", r)?;
        }
        if !c.tool_calls.is_empty() {
            m.serialize_entry("tool_calls", &Each(&c.tool_calls, PieceView))?;
        }
        put_extra(&mut m, &c.delta_extra, |k| match k {
            "role" => c.role.is_some(),
            "content" => c.content.is_some(),
            "reasoning_content" => c.reasoning.is_some(),
            "tool_calls" => !c.tool_calls.is_empty(),
            _ => false,
        })?;
        m.end()
    }
}

/// A piece of a tool call.
struct PieceView<'a>(&'a ToolCallDelta);

impl Serialize for PieceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("index", &p.index)?;
        if let Some(id) = &p.id {
            m.serialize_entry("id", id)?;
        }
        if (p.id.is_some() || p.name.is_some()) && !p.extra.contains_key("type") {
            m.serialize_entry("type", "function")?;
        }
        m.serialize_entry(
            "function",
            &FunctionCallView {
                name: p.name.as_deref(),
                arguments: &p.arguments,
                rest: p.extra.get("function"),
            },
        )?;
        put_extra(&mut m, &p.extra, |k| match k {
            "index" | "function" => true,
            "id" => p.id.is_some(),
            _ => false,
        })?;
        m.end()
    }
}
