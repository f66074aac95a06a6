//! A streamed answer, one delta at a time. Providers turn their wire events into these in order;
//! adapters turn them into their own events (OpenAI chunks, gRPC chunks, Anthropic events).

use super::chat::StopReason;
use super::{JsonObject, Usage};

/// A piece of a tool call: the first piece of a call carries `id` and `name`, later ones
/// append to `arguments`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCallDelta {
    /// Which call of the turn this piece belongs to (0, 1, ...).
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    /// Argument text to append.
    pub arguments: String,
    pub extra: JsonObject,
}

/// What one choice gained in one delta.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChoiceDelta {
    pub index: u32,
    /// Set on the first delta of a choice (`assistant`).
    pub role: Option<String>,
    /// Text to append.
    pub content: Option<String>,
    /// Reasoning ("thinking") text to append.
    pub reasoning: Option<String>,
    /// Anthropic's signature of the reasoning block, when it is complete.
    pub reasoning_signature: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
    /// Set on the delta that ends the choice.
    pub finish_reason: Option<StopReason>,
    /// Other fields of the choice (`logprobs`, ...) and of its delta (`delta_extra`).
    pub extra: JsonObject,
    pub delta_extra: JsonObject,
}

impl ChoiceDelta {
    /// Whether this delta adds nothing a caller would see.
    pub fn is_empty(&self) -> bool {
        self.role.is_none()
            && self.content.as_deref().is_none_or(str::is_empty)
            && self.reasoning.as_deref().is_none_or(str::is_empty)
            && self.reasoning_signature.is_none()
            && self.tool_calls.is_empty()
            && self.finish_reason.is_none()
            && self.extra.is_empty()
            && self.delta_extra.is_empty()
    }
}

/// One step of a streamed answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatDelta {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model answering; the core sets it to the resolved `provider/model`.
    pub model: String,
    pub choices: Vec<ChoiceDelta>,
    /// Usage so far; the upstream's final figures arrive on the last delta.
    pub usage: Option<Usage>,
    /// Other top-level fields (`system_fingerprint`, ...).
    pub extra: JsonObject,
}

impl ChatDelta {
    /// The text the first choice gains.
    pub fn content(&self) -> &str {
        self.choices
            .first()
            .and_then(|c| c.content.as_deref())
            .unwrap_or("")
    }

    /// The first choice's finish reason, on the delta that ends it.
    pub fn finish_reason(&self) -> Option<&StopReason> {
        self.choices.first().and_then(|c| c.finish_reason.as_ref())
    }

    /// Whether it carries only usage (the last delta of an OpenAI stream with usage).
    pub fn is_usage_only(&self) -> bool {
        self.choices.is_empty()
    }

    /// Generated characters in it (text, reasoning, tool arguments), for estimates.
    pub fn generated_chars(&self) -> usize {
        self.choices
            .iter()
            .map(|c| {
                c.content.as_deref().map_or(0, str::len)
                    + c.reasoning.as_deref().map_or(0, str::len)
                    + c.tool_calls
                        .iter()
                        .map(|t| t.arguments.len() + t.name.as_deref().map_or(0, str::len))
                        .sum::<usize>()
            })
            .sum()
    }
}
