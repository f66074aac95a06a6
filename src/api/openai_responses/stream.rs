//! Neutral deltas, in order, as the Responses API's typed streaming events, each with its
//! `sequence_number`: `response.created`, `response.in_progress`, then per output item
//! `response.output_item.added`, its content (`response.content_part.added`,
//! `response.output_text.delta`/`.done`, `response.content_part.done` for a message;
//! `response.reasoning_text.delta`/`.done` for reasoning;
//! `response.function_call_arguments.delta`/`.done` for a call) and
//! `response.output_item.done`, and last `response.completed` (`response.incomplete` when the
//! output cap cut the answer short) with the whole response and usage. One item is open at a
//! time; a failure mid-way ends with `response.failed`.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::id_with;
use super::request::Echo;
use super::response::{
    function_call_item, message_item, output_text, reasoning_item, response_object, status_of,
};
use crate::api::{ChatDelta, Reasoning, StopReason, ToolCall, Usage};
use crate::error::Rejection;

/// One event: its type and its data.
pub type Event = (String, Value);

/// The open output item.
#[derive(Debug)]
enum Open {
    Message {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
    },
    /// A function call: the neutral index of its call.
    Call {
        id: String,
        index: u32,
        call: ToolCall,
    },
}

/// Turns neutral deltas into Responses events.
#[derive(Debug)]
pub struct StreamEncoder {
    echo: Echo,
    started: bool,
    /// The upstream's id, which item ids are made from.
    base: String,
    id: String,
    created: u64,
    seq: u64,
    open: Option<Open>,
    /// Finished output items, in order.
    done: Vec<Value>,
    /// Neutral tool-call index to its call id, to tell a repeated id from a new call.
    calls: HashMap<u32, Option<String>>,
    signature: Option<String>,
    stop: Option<StopReason>,
    usage: Option<Usage>,
    finished: bool,
}

impl StreamEncoder {
    /// An encoder for one stream, echoing the request's fields.
    pub fn new(echo: Echo) -> StreamEncoder {
        StreamEncoder {
            echo,
            started: false,
            base: String::new(),
            id: String::new(),
            created: 0,
            seq: 0,
            open: None,
            done: Vec::new(),
            calls: HashMap::new(),
            signature: None,
            stop: None,
            usage: None,
            finished: false,
        }
    }

    fn event(&mut self, ty: &str, mut data: Value, out: &mut Vec<Event>) {
        data["type"] = json!(ty);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push((ty.to_string(), data));
    }

    fn output_index(&self) -> usize {
        self.done.len()
    }

    fn snapshot(&self, status: &str, incomplete: Value, usage: Option<&Usage>) -> Value {
        response_object(
            &self.id,
            self.created,
            &self.echo,
            status,
            incomplete,
            self.done.clone(),
            usage,
        )
    }

    /// The events one delta adds.
    pub fn push(&mut self, delta: &ChatDelta) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(u) = delta.usage {
            self.usage = Some(u);
        }
        if !self.started {
            self.started = true;
            self.base.clone_from(&delta.id);
            self.id = id_with("resp_", &delta.id, 0);
            self.created = delta.created;
            let r = self.snapshot("in_progress", Value::Null, None);
            self.event("response.created", json!({ "response": r }), &mut out);
            let r = self.snapshot("in_progress", Value::Null, None);
            self.event("response.in_progress", json!({ "response": r }), &mut out);
        }
        for c in delta.choices.iter().filter(|c| c.index == 0) {
            if let Some(sig) = &c.reasoning_signature {
                self.signature = Some(sig.clone());
            }
            if let Some(r) = c.reasoning.as_deref().filter(|r| !r.is_empty()) {
                if !matches!(self.open, Some(Open::Reasoning { .. })) {
                    self.close(&mut out);
                    self.open_reasoning(&mut out);
                }
                let index = self.done.len();
                if let Some(Open::Reasoning { id, text }) = &mut self.open {
                    text.push_str(r);
                    let data = json!({"item_id": id, "output_index": index,
                        "content_index": 0, "delta": r});
                    self.event("response.reasoning_text.delta", data, &mut out);
                }
            }
            if let Some(t) = c.content.as_deref().filter(|t| !t.is_empty()) {
                if !matches!(self.open, Some(Open::Message { .. })) {
                    self.close(&mut out);
                    self.open_message(&mut out);
                }
                let index = self.done.len();
                if let Some(Open::Message { id, text }) = &mut self.open {
                    text.push_str(t);
                    let data = json!({"item_id": id, "output_index": index,
                        "content_index": 0, "delta": t, "logprobs": []});
                    self.event("response.output_text.delta", data, &mut out);
                }
            }
            for piece in &c.tool_calls {
                // Some servers repeat the call's id on every piece: the same id is the same call.
                let same = matches!(&self.open, Some(Open::Call { index, .. }) if *index == piece.index)
                    && self
                        .calls
                        .get(&piece.index)
                        .is_some_and(|id| piece.id.is_none() || piece.id == *id);
                if !same {
                    self.close(&mut out);
                    self.calls.insert(piece.index, piece.id.clone());
                    let call = ToolCall {
                        id: piece.id.clone().unwrap_or_default(),
                        name: piece.name.clone().unwrap_or_default(),
                        arguments: String::new(),
                        extra: Default::default(),
                    };
                    let id = id_with("fc_", &self.base, self.output_index() + 1);
                    let item = function_call_item(&id, &call, "in_progress");
                    let data = json!({"output_index": self.output_index(), "item": item});
                    self.event("response.output_item.added", data, &mut out);
                    self.open = Some(Open::Call {
                        id,
                        index: piece.index,
                        call,
                    });
                }
                if !piece.arguments.is_empty() {
                    let index = self.output_index();
                    if let Some(Open::Call { id, call, .. }) = &mut self.open {
                        call.arguments.push_str(&piece.arguments);
                        let data = json!({"item_id": id, "output_index": index,
                            "delta": piece.arguments});
                        self.event("response.function_call_arguments.delta", data, &mut out);
                    }
                }
            }
            if let Some(r) = &c.finish_reason {
                self.stop = Some(r.clone());
            }
        }
        out
    }

    fn open_message(&mut self, out: &mut Vec<Event>) {
        let id = id_with("msg_", &self.base, self.output_index() + 1);
        let index = self.output_index();
        let item = json!({"id": id, "type": "message", "status": "in_progress",
            "role": "assistant", "content": []});
        self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            out,
        );
        let data = json!({"item_id": id, "output_index": index, "content_index": 0,
            "part": output_text("")});
        self.event("response.content_part.added", data, out);
        self.open = Some(Open::Message {
            id,
            text: String::new(),
        });
    }

    fn open_reasoning(&mut self, out: &mut Vec<Event>) {
        let id = id_with("rs_", &self.base, self.output_index() + 1);
        let index = self.output_index();
        let item = json!({"id": id, "type": "reasoning", "status": "in_progress",
            "summary": [], "content": []});
        self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            out,
        );
        let data = json!({"item_id": id, "output_index": index, "content_index": 0,
            "part": {"type": "reasoning_text", "text": ""}});
        self.event("response.content_part.added", data, out);
        self.open = Some(Open::Reasoning {
            id,
            text: String::new(),
        });
    }

    /// Ends the open item with its `.done` events.
    fn close(&mut self, out: &mut Vec<Event>) {
        let index = self.output_index();
        let item = match self.open.take() {
            None => return,
            Some(Open::Message { id, text }) => {
                let data = json!({"item_id": id, "output_index": index, "content_index": 0,
                    "text": text, "logprobs": []});
                self.event("response.output_text.done", data, out);
                let data = json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": output_text(&text)});
                self.event("response.content_part.done", data, out);
                message_item(&id, &text, "completed")
            }
            Some(Open::Reasoning { id, text }) => {
                let data = json!({"item_id": id, "output_index": index, "content_index": 0,
                    "text": text});
                self.event("response.reasoning_text.done", data, out);
                let data = json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "reasoning_text", "text": text}});
                self.event("response.content_part.done", data, out);
                let r = Reasoning {
                    text,
                    // Anthropic signs a thinking block after its text.
                    signature: self.signature.take(),
                    redacted: None,
                };
                reasoning_item(&id, &[r], "completed")
            }
            Some(Open::Call { id, call, .. }) => {
                let data = json!({"item_id": id, "output_index": index,
                    "name": call.name, "arguments": call.arguments});
                self.event("response.function_call_arguments.done", data, out);
                function_call_item(&id, &call, "completed")
            }
        };
        let data = json!({"output_index": index, "item": item});
        self.event("response.output_item.done", data, out);
        self.done.push(item);
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
        let (status, incomplete) = status_of(self.stop.as_ref());
        let r = self.snapshot(status, incomplete, Some(&usage));
        let ty = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.event(ty, json!({ "response": r }), &mut out);
        out
    }

    /// The `response.failed` event that ends a stream that broke.
    pub fn failed(&mut self, r: &Rejection) -> Vec<Event> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.finished = true;
        let mut resp = self.snapshot("failed", Value::Null, self.usage.as_ref());
        resp["error"] = json!({"code": "server_error", "message": r.message});
        self.event("response.failed", json!({ "response": resp }), &mut out);
        out
    }
}

/// An event as SSE text: `event: TYPE\ndata: JSON\n\n`.
pub fn sse(event: &Event) -> String {
    format!("event: {}\ndata: {}\n\n", event.0, event.1)
}
