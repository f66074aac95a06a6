//! The OpenAI chat-completions wire: requests, answers and stream chunks to and from the neutral
//! types of [`crate::api`].
//!
//! Parsing moves each value out of the body (no copies); what the typed fields do not model stays
//! in the `extra` maps exactly as sent, including a typed field sent as `null` or in a shape the
//! type cannot hold (an empty `tools` array, `"content": null` in a delta, ...), so that an OpenAI
//! body reaches an OpenAI-compatible upstream as the caller wrote it. Encoding serializes borrowed
//! views of the neutral values; a typed field that is set wins over an `extra` entry of the same
//! name, so a stage that fills a typed field never produces a duplicate key.

mod chunk_facts;
mod message;
mod plain_request;
mod request;
mod response;
mod stream;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::JsonObject;
use crate::error::Rejection;

pub use chunk_facts::{read_chunk, ChunkFacts};
pub use request::{
    apply_top_level, encode_request, parse_request, parse_request_keeping_body,
    request_from_object, request_to_object,
};
pub use response::{
    encode_response, parse_response, read_answer, response_from_object, response_to_object,
    AnswerFacts,
};
pub use stream::{chunk_to_object, encode_chunk, parse_chunk};

/// Reads `messages[index]` of a request with OpenAI's meaning (the gRPC adapter's JSON fields).
pub fn message_from_object(
    obj: JsonObject,
    index: usize,
) -> Result<crate::api::Message, Rejection> {
    let at = At {
        list: "messages",
        index,
        suffix: "",
    };
    if !matches!(obj.get("role"), Some(Value::String(r)) if !r.is_empty()) {
        return Err(Rejection::invalid(
            &format!("messages[{index}].role"),
            format!("`messages[{index}].role` must be a non-empty string"),
        ));
    }
    message::message_from_object(obj, at, crate::api::Role::User).map_err(BadField::into_rejection)
}

/// A field a body holds in a shape the wire format does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
struct BadField {
    /// The field's path (`messages[2].content`).
    param: String,
    message: String,
}

impl BadField {
    /// `what` is the rule the field broke, after the field's name.
    fn new(param: impl fmt::Display, what: &str) -> BadField {
        let param = param.to_string();
        let message = format!("`{param}` {what}");
        BadField { param, message }
    }

    /// The caller's `invalid_request`.
    fn into_rejection(self) -> Rejection {
        Rejection::invalid(&self.param, self.message)
    }
}

/// The path of an element of a list (`messages[2]`, `choices[0].message`), formatted only when
/// an error needs it.
#[derive(Debug, Clone, Copy)]
struct At<'a> {
    list: &'a str,
    index: usize,
    suffix: &'a str,
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]{}", self.list, self.index, self.suffix)
    }
}

/// Removes `key` when its value passes `wanted`; any other value stays (it belongs in `extra`).
fn take_where(
    obj: &mut JsonObject,
    key: &str,
    wanted: impl FnOnce(&Value) -> bool,
) -> Option<Value> {
    if obj.get(key).is_some_and(wanted) {
        obj.remove(key)
    } else {
        None
    }
}

/// Whether a body's `stream_options` asks for the usage chunk (`include_usage: true`).
fn asks_for_usage(body: &JsonObject) -> bool {
    body.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Removes `key` when it holds a string.
fn take_string(obj: &mut JsonObject, key: &str) -> Option<String> {
    match take_where(obj, key, Value::is_string) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Removes `key` when it holds a non-negative integer.
fn take_u64(obj: &mut JsonObject, key: &str) -> Option<u64> {
    take_where(obj, key, |v| v.as_u64().is_some()).and_then(|v| v.as_u64())
}

/// Removes `key` when it holds a number.
fn take_f64(obj: &mut JsonObject, key: &str) -> Option<f64> {
    take_where(obj, key, Value::is_number).and_then(|v| v.as_f64())
}

/// A list index as the wire's `index`, when it has one.
fn take_index(obj: &mut JsonObject, fallback: usize) -> u32 {
    take_u64(obj, "index")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or_else(|| u32::try_from(fallback).unwrap_or(u32::MAX))
}

/// Serializes a slice through a view of each element.
struct Each<'a, T, F>(&'a [T], F);

impl<'a, T, V, F> Serialize for Each<'a, T, F>
where
    V: Serialize,
    F: Fn(&'a T) -> V,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(&self.1))
    }
}

/// Writes the entries of `extra` that the typed fields did not already write.
fn put_extra<M: SerializeMap>(
    m: &mut M,
    extra: &JsonObject,
    written: impl Fn(&str) -> bool,
) -> Result<(), M::Error> {
    for (k, v) in extra {
        if !written(k) {
            m.serialize_entry(k, v)?;
        }
    }
    Ok(())
}

/// A float written the way a client most likely sent it: JSON does not tell `1` from `1.0` and
/// most clients (every JavaScript one) write integral values without a fraction, so those go out
/// as integers and `"temperature": 1` comes back as `1`.
struct Float(f64);

impl Serialize for Float {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Below 2^53 every integral f64 is exactly an i64.
        if self.0.fract() == 0.0 && self.0.abs() < 9_007_199_254_740_992.0 {
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

/// A view serialized into a JSON object. Every view here writes a map with string keys, which
/// `serde_json` cannot fail on; the empty fallback only satisfies the types.
fn to_object(view: impl Serialize) -> JsonObject {
    match serde_json::to_value(view) {
        Ok(Value::Object(o)) => o,
        _ => JsonObject::new(),
    }
}
