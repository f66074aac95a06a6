//! A chat request and its answer, as the core sees them: typed, and free of any wire format.
//! Wire formats (`super::openai_chat`, `super::anthropic`, the gRPC proto) convert into and out
//! of these. What a type does not model rides in its `extra` map, so a request that enters as
//! OpenAI JSON and leaves as OpenAI JSON loses nothing.

use std::sync::Arc;

use serde_json::Value;

use super::native::{Api, NativeBody};
use super::{JsonObject, Usage};
use crate::error::Rejection;

/// Who wrote a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    System,
    /// OpenAI's `developer` role: system instructions from the application.
    Developer,
    User,
    Assistant,
    /// The result of a tool call.
    Tool,
    /// A role tollgate does not model (kept as sent).
    Other(String),
}

impl Role {
    /// The role from its wire name.
    pub fn parse(s: &str) -> Role {
        match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => Role::Other(other.to_string()),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Other(s) => s,
        }
    }

    /// System or developer instructions.
    pub fn is_instruction(&self) -> bool {
        matches!(self, Role::System | Role::Developer)
    }
}

/// A message's content: plain text or a list of parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of the content (parts' texts joined), without images.
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    if let ContentPart::Text { text, .. } = p {
                        out.push_str(text);
                    }
                }
                out
            }
        }
    }

    /// Characters of text, for token estimates (an image counts as a fixed amount).
    pub fn estimate_chars(&self) -> usize {
        match self {
            Content::Text(s) => s.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text, .. } => text.len(),
                    ContentPart::Image { .. } => IMAGE_ESTIMATE_CHARS,
                    ContentPart::Other(o) => Value::Object(o.clone()).to_string().len(),
                })
                .sum(),
        }
    }
}

/// What an image is assumed to weigh in a token estimate (about 85 tokens, OpenAI's low detail).
const IMAGE_ESTIMATE_CHARS: usize = 340;

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// Text; `extra` holds what the wire added (for example Anthropic `cache_control`).
    Text { text: String, extra: JsonObject },
    /// An image by URL (`https://...` or a `data:` URL with base64 bytes).
    Image {
        url: String,
        /// OpenAI's `detail` (`auto`, `low`, `high`).
        detail: Option<String>,
        extra: JsonObject,
    },
    /// A part tollgate does not model (audio, files, ...), kept whole in its wire shape.
    Other(JsonObject),
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub enum Tool {
    /// A function with a JSON-Schema for its arguments.
    Function(FunctionTool),
    /// A tool kind tollgate does not model (built-in tools of a provider), kept whole.
    Other(JsonObject),
}

/// A function tool.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON-Schema of the arguments.
    pub parameters: Option<Value>,
    /// Other fields of the function definition (`strict`, `cache_control`, ...).
    pub extra: JsonObject,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool, the model picks which.
    Required,
    /// This function.
    Function(String),
    /// A form tollgate does not model, kept as sent.
    Other(Value),
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON text, exactly as the model produced them.
    pub arguments: String,
    pub extra: JsonObject,
}

/// A reasoning ("thinking") block the model produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reasoning {
    pub text: String,
    /// Anthropic's signature over the thinking, needed to send it back.
    pub signature: Option<String>,
    /// Anthropic's `redacted_thinking` data, opaque.
    pub redacted: Option<String>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    /// `None`: absent or null (an assistant turn that only calls tools).
    pub content: Option<Content>,
    pub name: Option<String>,
    /// Calls made by an assistant turn.
    pub tool_calls: Vec<ToolCall>,
    /// On a tool result: the call it answers.
    pub tool_call_id: Option<String>,
    /// Reasoning an assistant turn carried (sent back to providers that want it).
    pub reasoning: Vec<Reasoning>,
    /// Other message fields, kept as sent.
    pub extra: JsonObject,
}

impl Message {
    /// A message with only a role and text.
    pub fn text(role: Role, text: impl Into<String>) -> Message {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            reasoning: Vec::new(),
            extra: JsonObject::new(),
        }
    }
}

/// Which field a caller's output cap came in, so that an OpenAI upstream gets it in the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxTokensField {
    #[default]
    MaxTokens,
    MaxCompletionTokens,
}

/// A validated chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model or alias the caller asked for.
    pub model: String,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// The caller's output cap.
    pub max_tokens: Option<u64>,
    pub max_tokens_field: MaxTokensField,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Whether the caller asked for usage at the end of a stream (tollgate always gets it).
    pub include_usage: bool,
    /// Fields not modelled (`response_format`, `seed`, `logprobs`, vendor extensions, ...).
    pub extra: JsonObject,
    /// The inbound API the request came in on.
    pub api: Api,
    /// The caller's body in its own wire, for a provider that takes that wire natively (an
    /// Anthropic upstream for a Messages request); `None` when only the neutral form exists.
    pub native: Option<Arc<NativeBody>>,
}

impl ChatRequest {
    /// A request for `model` with these messages and nothing else set.
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: model.into(),
            messages,
            tools: Vec::new(),
            tool_choice: None,
            max_tokens: None,
            max_tokens_field: MaxTokensField::default(),
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
            extra: JsonObject::new(),
            api: Api::ChatCompletions,
            native: None,
        }
    }

    /// What every request needs, whatever wire it came in on: a model, and at least one
    /// message, each with a role.
    pub fn check_required(&self) -> Result<(), Rejection> {
        if self.model.trim().is_empty() {
            return Err(Rejection::invalid("model", "`model` is required"));
        }
        if self.messages.is_empty() {
            return Err(Rejection::invalid(
                "messages",
                "`messages` must not be empty",
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if m.role.as_str().is_empty() {
                return Err(Rejection::invalid(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be a non-empty string"),
                ));
            }
        }
        Ok(())
    }

    /// Prompt tokens estimated the cheap way (about four characters a token), for reservations
    /// and for upstreams that report no usage.
    pub fn estimate_prompt_tokens(&self) -> u64 {
        let mut chars = 0usize;
        for m in &self.messages {
            chars += 4;
            if let Some(c) = &m.content {
                chars += c.estimate_chars();
            }
            for call in &m.tool_calls {
                chars += call.name.len() + call.arguments.len();
            }
            for r in &m.reasoning {
                chars += r.text.len();
            }
        }
        for t in &self.tools {
            chars += match t {
                Tool::Function(f) => {
                    f.name.len()
                        + f.description.as_deref().map_or(0, str::len)
                        + f.parameters.as_ref().map_or(0, |p| p.to_string().len())
                }
                Tool::Other(o) => Value::Object(o.clone()).to_string().len(),
            };
        }
        super::estimate_tokens(chars)
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The output cap was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    ContentFilter,
    /// A reason tollgate does not model, kept as sent.
    Other(String),
}

impl StopReason {
    /// From OpenAI's `finish_reason`.
    pub fn from_openai(s: &str) -> StopReason {
        match s {
            "stop" => StopReason::Stop,
            "length" => StopReason::Length,
            "tool_calls" | "function_call" => StopReason::ToolCalls,
            "content_filter" => StopReason::ContentFilter,
            other => StopReason::Other(other.to_string()),
        }
    }

    /// As OpenAI's `finish_reason`.
    pub fn as_openai(&self) -> &str {
        match self {
            StopReason::Stop => "stop",
            StopReason::Length => "length",
            StopReason::ToolCalls => "tool_calls",
            StopReason::ContentFilter => "content_filter",
            StopReason::Other(s) => s,
        }
    }
}

/// One answer choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub index: u32,
    /// The assistant message (content, tool calls, reasoning).
    pub message: Message,
    pub finish_reason: Option<StopReason>,
    /// Other choice fields (`logprobs`, ...).
    pub extra: JsonObject,
}

/// A whole, non-streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered; the core sets it to the resolved `provider/model`.
    pub model: String,
    pub choices: Vec<Choice>,
    /// As the upstream reported it; `None` when it reported none.
    pub usage: Option<Usage>,
    /// Other top-level fields (`system_fingerprint`, `service_tier`, ...).
    pub extra: JsonObject,
}

impl ChatResponse {
    /// Characters of generated text, for estimating completion tokens.
    pub fn estimate_completion_chars(&self) -> usize {
        self.choices
            .iter()
            .map(|c| {
                c.message.content.as_ref().map_or(0, |x| x.text().len())
                    + c.message
                        .tool_calls
                        .iter()
                        .map(|t| t.name.len() + t.arguments.len())
                        .sum::<usize>()
                    + c.message
                        .reasoning
                        .iter()
                        .map(|r| r.text.len())
                        .sum::<usize>()
            })
            .sum()
    }

    /// The first choice's text content.
    pub fn first_text(&self) -> String {
        self.choices
            .first()
            .and_then(|c| c.message.content.as_ref())
            .map(Content::text)
            .unwrap_or_default()
    }
}
