//! The OpenAI Responses API (`POST /v1/responses`) as pure conversions. Inbound (a caller
//! speaking Responses to tollgate): [`parse_request`] validates the caller's body into a neutral
//! request that also carries the body natively (for an OpenAI upstream), [`encode_response`]
//! says a translated answer as a Response object, [`StreamEncoder`] says translated deltas as
//! the typed Responses events. For the pass-through, [`usage`] and [`generated_chars`] read what
//! an OpenAI upstream's own answer says for accounting.

mod request;
mod response;
mod stream;

#[cfg(test)]
mod tests;

use serde_json::{json, Value};

use super::Usage;

pub use request::{parse_request, Echo};
pub use response::encode_response;
pub use stream::{sse, Event, StreamEncoder};

/// Reads a Responses `usage` object (`input_tokens` counts cached tokens too).
pub fn usage(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt_tokens: n("input_tokens"),
        completion_tokens: n("output_tokens"),
        cached_prompt_tokens: o
            .get("input_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cache_creation_tokens: 0,
    })
}

/// A Responses `usage` object for what the core accounted.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": u.cached_prompt_tokens,
            "cache_write_tokens": u.cache_creation_tokens,
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens(),
    })
}

/// Generated characters of a Response object's `output` (text, arguments, reasoning), for an
/// estimate when the upstream reports no usage.
pub fn generated_chars(response: &Value) -> usize {
    let Some(items) = response.get("output").and_then(Value::as_array) else {
        return 0;
    };
    let text_of = |parts: Option<&Value>| -> usize {
        parts
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .map(str::len)
                    .sum()
            })
            .unwrap_or(0)
    };
    items
        .iter()
        .map(|item| {
            text_of(item.get("content"))
                + text_of(item.get("summary"))
                + item
                    .get("arguments")
                    .and_then(Value::as_str)
                    .map_or(0, str::len)
        })
        .sum()
}

/// An id with `prefix` (`resp_`, `msg_`, ...): the upstream's id when it has one, else one made
/// from the clock, so that ids in one answer differ.
pub(crate) fn id_with(prefix: &str, base: &str, n: usize) -> String {
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    let base = if base.is_empty() { unique() } else { base };
    if n == 0 {
        format!("{prefix}{base}")
    } else {
        format!("{prefix}{base}_{n}")
    }
}

fn unique() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{n:x}")
}
