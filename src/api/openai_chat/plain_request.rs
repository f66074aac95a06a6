//! The common chat request (text messages, the usual scalar fields) read straight into a
//! [`ChatRequest`] without a `serde_json::Value` tree of the whole body: the request path's
//! largest parse (bench/README.md). It reads a body exactly as [`super::parse_request`] reads
//! it or not at all: any field it does not model the same way (tools, stops, content parts,
//! tool calls, a typed field sent as `null`, a duplicate key, anything invalid) makes it give
//! up, and the full reader takes the body from the start, so every refusal keeps its message.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::asks_for_usage;
use crate::api::{ChatRequest, Content, JsonObject, MaxTokensField, Message, Role};

/// The request in `bytes` when it is a plain one the full reader would accept as this.
pub(super) fn read_plain_request(bytes: &[u8]) -> Option<ChatRequest> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let req = de.deserialize_map(BodyVisitor).ok()?;
    de.end().ok()?;
    Some(req)
}

/// Why a body is left to the full reader; never shown to anyone.
fn not_plain<E: de::Error>() -> E {
    E::custom("not a plain request")
}

/// Sets a field seen once; a second sighting gives up (the full reader keeps the last).
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    match slot.replace(value) {
        None => Ok(()),
        Some(_) => Err(not_plain()),
    }
}

/// Puts an unmodelled field in `extra` as sent.
fn keep<'de, A: MapAccess<'de>>(
    map: &mut A,
    extra: &mut JsonObject,
    key: Cow<'de, str>,
) -> Result<(), A::Error> {
    let value: Value = map.next_value()?;
    match extra.insert(key.into_owned(), value) {
        None => Ok(()),
        Some(_) => Err(not_plain()),
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The top-level object.
struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = ChatRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a chat request")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatRequest, A::Error> {
        let mut model: Option<String> = None;
        let mut messages: Option<Vec<Message>> = None;
        let mut stream: Option<Option<bool>> = None;
        let mut max_tokens: Option<u64> = None;
        let mut max_completion_tokens: Option<u64> = None;
        let mut temperature: Option<f64> = None;
        let mut top_p: Option<f64> = None;
        let mut extra = JsonObject::new();
        while let Some(Key(key)) = map.next_key()? {
            match key.as_ref() {
                "model" => once(&mut model, map.next_value()?)?,
                "messages" => once(&mut messages, map.next_value_seed(MessagesSeed)?)?,
                // `null` reads as not streaming, and is not kept, as in the full reader.
                "stream" => once(&mut stream, map.next_value()?)?,
                // A `null` cap or sampling value stays in `extra` there: left to it.
                "max_tokens" => once(&mut max_tokens, map.next_value()?)?,
                "max_completion_tokens" => once(&mut max_completion_tokens, map.next_value()?)?,
                "temperature" => once(&mut temperature, map.next_value()?)?,
                "top_p" => once(&mut top_p, map.next_value()?)?,
                "tools" | "tool_choice" | "stop" => return Err(not_plain()),
                // `stream_options` is kept whole, like any field not modelled.
                _ => keep(&mut map, &mut extra, key)?,
            }
        }
        let model = model.filter(|m| !m.trim().is_empty());
        let messages = messages.filter(|m| !m.is_empty());
        let (Some(model), Some(messages)) = (model, messages) else {
            return Err(not_plain());
        };
        let (max_tokens, max_tokens_field) = match (max_completion_tokens, max_tokens) {
            (Some(_), Some(_)) => return Err(not_plain()),
            (Some(n), None) => (Some(n), MaxTokensField::MaxCompletionTokens),
            (None, n) => (n, MaxTokensField::MaxTokens),
        };
        let mut req = ChatRequest::new(model, messages);
        req.stream = stream.flatten().unwrap_or(false);
        req.include_usage = asks_for_usage(&extra);
        req.max_tokens = max_tokens;
        req.max_tokens_field = max_tokens_field;
        req.temperature = temperature;
        req.top_p = top_p;
        req.extra = extra;
        Ok(req)
    }
}

/// `messages`: an array of plain messages.
struct MessagesSeed;

impl<'de> DeserializeSeed<'de> for MessagesSeed {
    type Value = Vec<Message>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Message>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed {
    type Value = Vec<Message>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Message>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(m) = seq.next_element_seed(MessageSeed)? {
            out.push(m);
        }
        Ok(out)
    }
}

/// One message: a non-empty string `role` and text (or `null`) `content`.
struct MessageSeed;

impl<'de> DeserializeSeed<'de> for MessageSeed {
    type Value = Message;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Message, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed {
    type Value = Message;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
        let mut role: Option<String> = None;
        let mut content: Option<Option<String>> = None;
        let mut extra = JsonObject::new();
        while let Some(Key(key)) = map.next_key()? {
            match key.as_ref() {
                "role" => once(&mut role, map.next_value()?)?,
                "content" => once(&mut content, map.next_value()?)?,
                "tool_calls" | "name" | "tool_call_id" | "reasoning_content" => {
                    return Err(not_plain())
                }
                _ => keep(&mut map, &mut extra, key)?,
            }
        }
        let Some(role) = role.filter(|r| !r.is_empty()) else {
            return Err(not_plain());
        };
        Ok(Message {
            role: Role::parse(&role),
            content: content.flatten().map(Content::Text),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            reasoning: Vec::new(),
            extra,
        })
    }
}
