//! Messages API streaming events, in order, as neutral deltas.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::error::error_fields;
use super::{stop_reason, usage_of, StreamError};
use crate::api::{ChatDelta, ChoiceDelta, JsonObject, ToolCallDelta};

/// What a content block of the streamed message is, by its Anthropic index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    /// A client tool call: the neutral index of the call (tool uses counted from 0).
    ToolUse(u32),
    /// A block the neutral deltas do not model (server tool use and results, ...).
    Other,
}

/// Turns the streaming events, in order, into neutral deltas.
#[derive(Debug)]
pub struct StreamDecoder {
    created: u64,
    id: String,
    model: String,
    input_tokens: u64,
    cache_read: u64,
    cache_creation: u64,
    output_tokens: u64,
    blocks: HashMap<u64, Block>,
    tool_calls: u32,
    /// Whether `message_start` was seen: every other event must come after it.
    started: bool,
    finished: bool,
}

impl StreamDecoder {
    /// A decoder for one stream; `created` (unix seconds) is stamped on every delta.
    pub fn new(created: u64) -> StreamDecoder {
        StreamDecoder {
            created,
            id: String::new(),
            model: String::new(),
            input_tokens: 0,
            cache_read: 0,
            cache_creation: 0,
            output_tokens: 0,
            blocks: HashMap::new(),
            tool_calls: 0,
            started: false,
            finished: false,
        }
    }

    /// Whether `message_stop` was seen.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// One SSE event's `data` payload (the `type` field inside says which event). Ok(None):
    /// nothing for the caller (ping, content_block_stop, a text block start with empty text, ...).
    pub fn event(&mut self, data: &str) -> Result<Option<ChatDelta>, StreamError> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| StreamError::Malformed(format!("event data is not JSON: {e}")))?;
        let ty = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| StreamError::Malformed("event without a type".into()))?;
        // Out of order is a broken upstream, not an answer: nothing is made up from it.
        if ty == "message_start" && self.started {
            return Err(StreamError::Malformed("a second message_start".into()));
        }
        if matches!(
            ty,
            "content_block_start" | "content_block_delta" | "message_delta" | "message_stop"
        ) && !self.started
        {
            return Err(StreamError::Malformed(format!("{ty} before message_start")));
        }
        match ty {
            "message_start" => self.message_start(&v),
            "content_block_start" => self.block_start(&v),
            "content_block_delta" => self.block_delta(&v),
            "message_delta" => Ok(Some(self.message_delta(&v))),
            "message_stop" => {
                self.finished = true;
                Ok(None)
            }
            "error" => {
                let (error_type, message) = error_fields(&v).ok_or_else(|| {
                    StreamError::Malformed("error event without error.type".into())
                })?;
                Err(StreamError::Upstream {
                    error_type,
                    message,
                })
            }
            // `ping`, `content_block_stop`, and event types the API may add later.
            _ => Ok(None),
        }
    }

    fn message_start(&mut self, v: &Value) -> Result<Option<ChatDelta>, StreamError> {
        let m = v
            .get("message")
            .ok_or_else(|| StreamError::Malformed("message_start without a message".into()))?;
        self.started = true;
        let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default();
        self.id = s("id").to_string();
        self.model = s("model").to_string();
        if let Some(u) = m.get("usage") {
            self.take_usage(u);
        }
        Ok(Some(self.delta(ChoiceDelta {
            role: Some("assistant".into()),
            ..ChoiceDelta::default()
        })))
    }

    fn block_start(&mut self, v: &Value) -> Result<Option<ChatDelta>, StreamError> {
        let index = block_index(v)?;
        let block = v.get("content_block").ok_or_else(|| {
            StreamError::Malformed(format!("content_block_start {index} without a block"))
        })?;
        let s = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or_default();
        let mut choice = ChoiceDelta::default();
        match s("type") {
            "text" => {
                self.blocks.insert(index, Block::Text);
                let text = s("text");
                if text.is_empty() {
                    return Ok(None);
                }
                choice.content = Some(text.to_string());
            }
            "thinking" => {
                // Thinking arrives in deltas; the start block is normally empty.
                self.blocks.insert(index, Block::Thinking);
                let (text, signature) = (s("thinking"), s("signature"));
                if text.is_empty() && signature.is_empty() {
                    return Ok(None);
                }
                choice.reasoning = (!text.is_empty()).then(|| text.to_string());
                choice.reasoning_signature = (!signature.is_empty()).then(|| signature.to_string());
            }
            "redacted_thinking" => {
                // Complete in its start block; the neutral delta has no field for it.
                self.blocks.insert(index, Block::Other);
                choice
                    .delta_extra
                    .insert("redacted_thinking".into(), json!(s("data")));
            }
            "tool_use" => {
                let k = self.tool_calls;
                self.tool_calls += 1;
                self.blocks.insert(index, Block::ToolUse(k));
                let extra: JsonObject = block
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(k, _)| !["type", "id", "name", "input"].contains(&k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                choice.tool_calls.push(ToolCallDelta {
                    index: k,
                    id: Some(s("id").to_string()),
                    name: Some(s("name").to_string()),
                    arguments: String::new(),
                    extra,
                });
            }
            _ => {
                self.blocks.insert(index, Block::Other);
                choice.delta_extra.insert(
                    "content_block_start".into(),
                    json!({ "index": index, "content_block": block }),
                );
            }
        }
        Ok(Some(self.delta(choice)))
    }

    fn block_delta(&mut self, v: &Value) -> Result<Option<ChatDelta>, StreamError> {
        let index = block_index(v)?;
        let d = v.get("delta").ok_or_else(|| {
            StreamError::Malformed(format!("content_block_delta {index} without a delta"))
        })?;
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or_default();
        let kind = self.blocks.get(&index).copied().ok_or_else(|| {
            StreamError::Malformed(format!(
                "content_block_delta for block {index}, which was never started"
            ))
        })?;
        let mut choice = ChoiceDelta::default();
        match (s("type"), Some(kind)) {
            (_, Some(Block::Other)) => {
                choice.delta_extra.insert(
                    "content_block_delta".into(),
                    json!({ "index": index, "delta": d }),
                );
            }
            ("text_delta", _) => choice.content = non_empty(s("text")),
            ("thinking_delta", _) => choice.reasoning = non_empty(s("thinking")),
            ("signature_delta", _) => choice.reasoning_signature = non_empty(s("signature")),
            ("citations_delta", _) => {
                if let Some(c) = d.get("citation") {
                    choice.delta_extra.insert("citations".into(), json!([c]));
                }
            }
            ("input_json_delta", Some(Block::ToolUse(k))) => {
                let partial = s("partial_json");
                if !partial.is_empty() {
                    choice.tool_calls.push(ToolCallDelta {
                        index: k,
                        arguments: partial.to_string(),
                        ..ToolCallDelta::default()
                    });
                }
            }
            ("input_json_delta", _) => {
                return Err(StreamError::Malformed(format!(
                    "input_json_delta for block {index}, which is not a tool_use block"
                )))
            }
            // Delta types the API may add later.
            _ => {}
        }
        if choice.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.delta(choice)))
    }

    fn message_delta(&mut self, v: &Value) -> ChatDelta {
        if let Some(u) = v.get("usage") {
            self.take_usage(u);
        }
        let mut choice = ChoiceDelta::default();
        let mut extra = JsonObject::new();
        if let Some(d) = v.get("delta").and_then(Value::as_object) {
            choice.finish_reason = d
                .get("stop_reason")
                .and_then(Value::as_str)
                .map(stop_reason);
            // `stop_sequence`, `container`, ...: the top-level fields of a whole response.
            for (k, val) in d {
                if k != "stop_reason" && !val.is_null() {
                    extra.insert(k.clone(), val.clone());
                }
            }
        }
        let mut delta = self.delta(choice);
        delta.usage = Some(usage_of(
            self.input_tokens,
            self.cache_read,
            self.cache_creation,
            self.output_tokens,
        ));
        delta.extra = extra;
        delta
    }

    /// Counts from `message_start` or `message_delta`: the later figures are cumulative, so a
    /// field present replaces the earlier one and a field absent keeps it.
    fn take_usage(&mut self, u: &Value) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64);
        if let Some(x) = n("input_tokens") {
            self.input_tokens = x;
        }
        if let Some(x) = n("cache_read_input_tokens") {
            self.cache_read = x;
        }
        if let Some(x) = n("cache_creation_input_tokens") {
            self.cache_creation = x;
        }
        if let Some(x) = n("output_tokens") {
            self.output_tokens = x;
        }
    }

    /// A delta of choice 0, stamped with the message's id, model and time.
    fn delta(&self, mut choice: ChoiceDelta) -> ChatDelta {
        choice.index = 0;
        ChatDelta {
            id: self.id.clone(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage: None,
            extra: JsonObject::new(),
        }
    }
}

/// The `index` of a content block event.
fn block_index(v: &Value) -> Result<u64, StreamError> {
    v.get("index")
        .and_then(Value::as_u64)
        .ok_or_else(|| StreamError::Malformed("content block event without an index".into()))
}

/// `Some` of a non-empty text: empty pieces are not deltas.
fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}
