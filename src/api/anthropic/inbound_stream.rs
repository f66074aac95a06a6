//! Neutral deltas, in order, as the Messages API's streaming events: `message_start`, `ping`,
//! then per content block `content_block_start`, its `content_block_delta`s (`text_delta`,
//! `thinking_delta`, `signature_delta`, `input_json_delta`) and `content_block_stop`, then
//! `message_delta` (stop reason, usage) and `message_stop`. One block is open at a time, so a
//! thinking delta never lands in a text block; indexes count blocks from 0.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::inbound_response::{error_json, message_id, stop_reason_name, usage_json};
use crate::api::{ChatDelta, StopReason, Usage};
use crate::error::Rejection;

/// One event: its name and its data.
pub type Event = (&'static str, Value);

/// The kind of the open content block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    /// A tool use: the neutral index of its call.
    Tool(u32),
}

/// Turns neutral deltas into Messages events.
#[derive(Debug, Default)]
pub struct StreamEncoder {
    started: bool,
    open: Option<(u32, Open)>,
    next_index: u32,
    /// Neutral tool-call index to its block index and call id.
    tools: HashMap<u32, (u32, Option<String>)>,
    stop: Option<StopReason>,
    usage: Option<Usage>,
    finished: bool,
}

impl StreamEncoder {
    /// An encoder for one stream.
    pub fn new() -> StreamEncoder {
        StreamEncoder::default()
    }

    /// The events one delta adds.
    pub fn push(&mut self, delta: &ChatDelta) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(u) = delta.usage {
            self.usage = Some(u);
        }
        if !self.started {
            self.started = true;
            let usage = self.usage.unwrap_or_default();
            let mut start_usage = usage_json(&usage);
            start_usage["output_tokens"] = json!(0);
            out.push((
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": message_id(&delta.id),
                    "type": "message",
                    "role": "assistant",
                    "model": delta.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": start_usage,
                }}),
            ));
            out.push(("ping", json!({"type": "ping"})));
        }
        for c in delta.choices.iter().filter(|c| c.index == 0) {
            if let Some(r) = c.reasoning.as_deref().filter(|r| !r.is_empty()) {
                let i = self.ensure(Open::Thinking, &mut out);
                out.push(block_delta(
                    i,
                    json!({"type": "thinking_delta", "thinking": r}),
                ));
            }
            if let Some(sig) = c.reasoning_signature.as_deref() {
                let i = self.ensure(Open::Thinking, &mut out);
                out.push(block_delta(
                    i,
                    json!({"type": "signature_delta", "signature": sig}),
                ));
            }
            if let Some(t) = c.content.as_deref().filter(|t| !t.is_empty()) {
                let i = self.ensure(Open::Text, &mut out);
                out.push(block_delta(i, json!({"type": "text_delta", "text": t})));
            }
            for call in &c.tool_calls {
                // Some servers repeat the call's id on every piece: the same id is the same call.
                let known = self
                    .tools
                    .get(&call.index)
                    .filter(|(_, id)| call.id.is_none() || call.id == *id)
                    .map(|(i, _)| *i);
                let index = match known {
                    Some(i) => i,
                    None => {
                        self.close(&mut out);
                        let i = self.next_index;
                        self.next_index += 1;
                        self.tools.insert(call.index, (i, call.id.clone()));
                        self.open = Some((i, Open::Tool(call.index)));
                        out.push((
                            "content_block_start",
                            json!({"type": "content_block_start", "index": i, "content_block": {
                                "type": "tool_use",
                                "id": call.id.clone().unwrap_or_default(),
                                "name": call.name.clone().unwrap_or_default(),
                                "input": {},
                            }}),
                        ));
                        i
                    }
                };
                if !call.arguments.is_empty() {
                    out.push(block_delta(
                        index,
                        json!({"type": "input_json_delta", "partial_json": call.arguments}),
                    ));
                }
            }
            if let Some(r) = &c.finish_reason {
                self.stop = Some(r.clone());
            }
        }
        out
    }

    /// The closing events after the last delta.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.finished = true;
        self.close(&mut out);
        let usage = self.usage.unwrap_or_default();
        let stop = self.stop.as_ref().map_or("end_turn", stop_reason_name);
        out.push((
            "message_delta",
            json!({"type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": usage_json(&usage)}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }

    /// The `error` event that ends a stream that failed.
    pub fn error(&mut self, r: &Rejection) -> Event {
        self.finished = true;
        ("error", error_json(r))
    }

    /// The open block of `kind`: the one open now, or a new one after closing it.
    fn ensure(&mut self, kind: Open, out: &mut Vec<Event>) -> u32 {
        if let Some((i, k)) = self.open {
            if k == kind {
                return i;
            }
        }
        self.close(out);
        let i = self.next_index;
        self.next_index += 1;
        self.open = Some((i, kind));
        let block = match kind {
            Open::Text => json!({"type": "text", "text": ""}),
            Open::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            // Tool blocks are opened by `push` with their id and name.
            Open::Tool(_) => json!({"type": "tool_use", "id": "", "name": "", "input": {}}),
        };
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": block}),
        ));
        i
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((i, _)) = self.open.take() {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }
}

fn block_delta(index: u32, delta: Value) -> Event {
    (
        "content_block_delta",
        json!({"type": "content_block_delta", "index": index, "delta": delta}),
    )
}

/// An event as SSE text: `event: NAME\ndata: JSON\n\n`.
pub fn sse(event: &Event) -> String {
    format!("event: {}\ndata: {}\n\n", event.0, event.1)
}
