//! Typed, protocol-neutral values: what the core works on (docs/architecture.md). Every wire
//! format is a pair of conversions to and from these, kept beside them: [`openai_chat`] for
//! OpenAI chat completions, [`openai_embeddings`] for OpenAI embeddings, `anthropic` for the Anthropic Messages API
//! and [`openai_responses`] for the OpenAI Responses API. The gRPC proto
//! converts in the gRPC adapter.

pub mod anthropic;
pub mod chat;
pub mod embeddings;
pub mod lenient;
pub mod native;
pub mod openai_chat;
pub mod openai_embeddings;
pub mod openai_responses;
pub mod stream;
pub mod usage;

#[cfg(test)]
mod fuzz_tests;

pub use chat::{
    ChatRequest, ChatResponse, Choice, Content, ContentPart, FunctionTool, MaxTokensField, Message,
    Reasoning, Role, StopReason, Tool, ToolCall, ToolChoice,
};
pub use embeddings::{EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse, EncodingFormat};
pub use native::{Api, NativeBody};
pub use stream::{ChatDelta, ChoiceDelta, ToolCallDelta};
pub use usage::Usage;

/// A JSON object: the `extra` maps that carry what the typed values do not model.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Counts tokens the cheap way (about four characters a token) when an upstream reports none.
pub fn estimate_tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}
