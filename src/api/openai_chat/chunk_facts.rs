//! A passed-through stream chunk read for accounting only: its bytes go to the caller as they
//! came, so nothing of it is built but what the accounting reads.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::stream::parse_chunk;
use crate::api::lenient::AsString;
use crate::api::usage::OpenAiUsage;
use crate::api::{ChatDelta, StopReason, Usage};

/// What a chunk says for accounting.
#[derive(Debug, Default, PartialEq)]
pub struct ChunkFacts {
    /// As the upstream reported it (the usage chunk).
    pub usage: Option<Usage>,
    /// Each finishing choice's `finish_reason`, in OpenAI's words.
    pub finish_reasons: Vec<String>,
    /// Characters generated (text, reasoning, tool calls), for an estimate.
    pub generated_chars: usize,
    /// It has no choices (the usage chunk).
    pub usage_only: bool,
}

impl ChunkFacts {
    /// The facts of a parsed chunk.
    fn of(delta: &ChatDelta) -> ChunkFacts {
        ChunkFacts {
            usage: delta.usage,
            finish_reasons: delta
                .choices
                .iter()
                .filter_map(|c| c.finish_reason.as_ref())
                .map(|r| r.as_openai().to_string())
                .collect(),
            generated_chars: delta.generated_chars(),
            usage_only: delta.is_usage_only(),
        }
    }
}

/// Reads one SSE `data:` payload of a chat stream (not `[DONE]`) as [`parse_chunk`] would,
/// with the same errors, without building the chunk. A chunk in the shape every server sends
/// is read in one pass that borrows its strings; any other (an error object, a field in an
/// unusual type, a repeated key) is parsed in full, so that the answer is always the one the
/// full parse gives.
pub fn read_chunk(data: &str) -> Result<ChunkFacts, String> {
    if let Ok(MapOnly(head)) = serde_json::from_str::<MapOnly<Head>>(data) {
        if let (false, false, Some(choices)) = (
            head.error.0,
            head.object.0.as_deref() == Some("error"),
            head.choices,
        ) {
            return Ok(facts_of(choices, head.usage.0));
        }
    }
    parse_chunk(data).map(|delta| ChunkFacts::of(&delta))
}

fn facts_of(choices: Vec<MapOnly<ChoiceHead<'_>>>, usage: Option<Usage>) -> ChunkFacts {
    let len = |s: &Option<Cow<'_, str>>| s.as_deref().map_or(0, str::len);
    let generated_chars = choices
        .iter()
        .filter_map(|c| c.0.delta.as_ref())
        .map(|MapOnly(d)| {
            len(&d.content)
                + len(&d.reasoning_content)
                + d.tool_calls
                    .iter()
                    .flatten()
                    .map(|p| match &p.0.function {
                        Some(MapOnly(f)) => len(&f.name) + len(&f.arguments),
                        None => 0,
                    })
                    .sum::<usize>()
        })
        .sum();
    ChunkFacts {
        usage,
        usage_only: choices.is_empty(),
        finish_reasons: choices
            .iter()
            .filter_map(|c| c.0.finish_reason.as_deref())
            .map(|r| StopReason::from_openai(r).as_openai().to_string())
            .collect(),
        generated_chars,
    }
}

/// A chunk in the usual shape; a field of another type fails it (and the full parse decides).
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    choices: Option<Vec<MapOnly<ChoiceHead<'a>>>>,
    #[serde(default)]
    usage: OpenAiUsage,
    #[serde(default)]
    error: Present,
    #[serde(default)]
    object: AsString,
}

#[derive(serde::Deserialize)]
struct ChoiceHead<'a> {
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<MapOnly<DeltaHead<'a>>>,
}

#[derive(serde::Deserialize)]
struct DeltaHead<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<MapOnly<PieceHead<'a>>>>,
}

#[derive(serde::Deserialize)]
struct PieceHead<'a> {
    #[serde(borrow, default)]
    function: Option<MapOnly<FunctionHead<'a>>>,
}

#[derive(serde::Deserialize)]
struct FunctionHead<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

/// A struct read only from a JSON object: serde's derive also takes an array of the field
/// values, which the full parse refuses.
struct MapOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectOf<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOf<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectOf(PhantomData)).map(MapOnly)
    }
}

/// Whether a key is there at all, whatever its value (`null` included).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d)?;
        Ok(Present(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the chunk, the reading is the full parse's: the same facts, or the same error.
    #[test]
    fn every_chunk_reads_as_the_full_parse_reads_it() {
        let chunks = [
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"caf\u00e9"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"th\"ink"},"finish_reason":"length"}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{"content":"x"},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}},{"index":1}]}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":13,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"choices":null,"usage":{"prompt_tokens":1}}"#,
            // Shapes the one-pass read leaves to the full parse.
            r#"{"choices":[{"index":0,"delta":"odd","finish_reason":5}]}"#,
            r#"{"choices":[{"delta":{"content":7,"tool_calls":"no"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":"x"},3]}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"choices":[]}"#,
            r#"{"choices":[],"usage":5}"#,
            r#"{"error":{"message":"overloaded"}}"#,
            r#"{"error":null,"choices":[]}"#,
            r#"{"object":"error","message":"bad things"}"#,
            r#"{"id":"c"}"#,
            r#"{"choices":"x"}"#,
            r#"{"choices":[1]}"#,
            r#"[1,2]"#,
            r#"[[]]"#,
            r#"{"choices":[["stop",{"content":"x"}]]}"#,
            r#"{"choices":[{"delta":["a"]}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[[{"name":"f"}]]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":["f","{}"]}]}}]}"#,
            r#"{"choices":[{"delta":{"content":"unterminated}}]}"#,
        ];
        for chunk in chunks {
            let full = parse_chunk(chunk).map(|d| ChunkFacts::of(&d));
            assert_eq!(read_chunk(chunk), full, "{chunk}");
        }
    }

    #[test]
    fn a_usual_chunk_is_read_in_one_pass() {
        let facts = read_chunk(r#"{"choices":[{"index":0,"delta":{"content":"héllo","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#)
            .unwrap();
        assert_eq!(
            facts,
            ChunkFacts {
                usage: Some(Usage {
                    prompt_tokens: 4,
                    completion_tokens: 2,
                    ..Usage::default()
                }),
                finish_reasons: vec!["stop".into()],
                generated_chars: "héllo".len() + 1 + 2,
                usage_only: false,
            }
        );
    }
}
