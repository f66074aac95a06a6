//! The Anthropic Messages API (`POST /v1/messages`) as pure conversions to and from the neutral
//! types. Upstream (tollgate calling Anthropic): [`encode_request`] builds the body,
//! [`parse_response`] reads a whole answer, [`StreamDecoder`] turns streaming events into
//! deltas, [`error_body`] reads an error. Inbound (a caller speaking Messages to tollgate):
//! [`parse_messages_request`] validates the caller's body, [`encode_message`] and
//! [`StreamEncoder`] say a neutral answer as a Message or as events, [`error_json`] says a
//! rejection. The HTTP client (keys, headers, SSE framing) lives in `providers`.

mod error;
mod inbound_request;
mod inbound_response;
mod inbound_stream;
mod request;
mod response;
mod stream;

#[cfg(test)]
mod inbound_tests;
#[cfg(test)]
mod request_tests;
#[cfg(test)]
mod response_tests;
#[cfg(test)]
mod stream_tests;

use serde_json::Value;

use super::{StopReason, Usage};

pub use error::{error_body, StreamError, TranslateError};
pub use inbound_request::{parse_messages_request, Endpoint, InboundHeaders};
pub use inbound_response::{encode_response as encode_message, error_json, error_type};
pub use inbound_stream::{sse, StreamEncoder};
pub use request::encode_request;
pub use response::parse_response;
pub use stream::StreamDecoder;

/// The `anthropic-version` tollgate sends unless configured otherwise.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// A Messages API `stop_reason` as the neutral reason.
pub fn stop_reason(s: &str) -> StopReason {
    match s {
        "end_turn" | "stop_sequence" => StopReason::Stop,
        // Both say the answer was cut short by a size limit.
        "max_tokens" | "model_context_window_exceeded" => StopReason::Length,
        "tool_use" => StopReason::ToolCalls,
        "refusal" => StopReason::ContentFilter,
        other => StopReason::Other(other.to_string()),
    }
}

/// Reads a Messages API `usage` object. Anthropic counts cache reads and writes apart from
/// `input_tokens`, while the neutral prompt count includes them.
pub fn usage(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(usage_of(
        n("input_tokens"),
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
        n("output_tokens"),
    ))
}

/// The neutral usage from the four Anthropic counts.
fn usage_of(input: u64, cache_read: u64, cache_creation: u64, output: u64) -> Usage {
    Usage {
        prompt_tokens: input
            .saturating_add(cache_read)
            .saturating_add(cache_creation),
        completion_tokens: output,
        cached_prompt_tokens: cache_read,
        cache_creation_tokens: cache_creation,
    }
}
