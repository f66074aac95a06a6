//! Property tests over every caller-facing decoder (OpenAI chat, Anthropic Messages, Responses,
//! embeddings) and the config loader: arbitrary bytes, arbitrary JSON shaped like a request,
//! and valid requests with one field replaced by anything never panic, and every refusal is a
//! typed `invalid_request` with a message (the gRPC decoders are in src/grpc/fuzz_tests.rs).

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::api::{anthropic, openai_chat, openai_embeddings, openai_responses};
use crate::error::{Reason, Rejection};

/// Field names the decoders look at, so that random objects hit real code paths.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream",
    "stream_options",
    "include_usage",
    "tools",
    "tool_choice",
    "function",
    "name",
    "arguments",
    "parameters",
    "tool_calls",
    "tool_call_id",
    "id",
    "input",
    "instructions",
    "system",
    "image_url",
    "url",
    "source",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stop_sequences",
    "encoding_format",
    "dimensions",
    "thinking",
    "budget_tokens",
    "metadata",
    "user",
    "response_format",
    "json_schema",
    "previous_response_id",
    "tool_use_id",
    "cache_control",
];

/// Strings the decoders compare against.
const WORDS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "function",
    "text",
    "image_url",
    "input_text",
    "input_image",
    "tool_use",
    "tool_result",
    "thinking",
    "auto",
    "none",
    "required",
    "float",
    "base64",
    "message",
    "mock/echo",
    "",
    "\u{0}",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// A top-level object shaped like a request: a `model`, and known keys with random values.
fn request_like() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..10).prop_map(|kv| {
        let mut o: Map<String, Value> = kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        o.entry("model").or_insert_with(|| json!("mock/echo"));
        Value::Object(o)
    })
}

/// Valid requests of each API, to mutate one field of.
fn seeds() -> [Value; 4] {
    [
        json!({"model": "m", "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "system", "content": "s"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
                         {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c", "content": "r"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
        json!({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "s"}],
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}], "thinking": {"type": "enabled", "budget_tokens": 1024}}),
        json!({"model": "m", "instructions": "s", "max_output_tokens": 5,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                      {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c", "output": "r"}],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}),
        json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8}),
    ]
}

/// A refusal of the caller's input: typed `invalid_request` with something to say.
fn assert_typed(r: Rejection, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.reason, Reason::InvalidRequest, "{}: {:?}", what, r);
    prop_assert!(!r.message.is_empty(), "{}: empty message", what);
    Ok(())
}

/// Feeds `bytes` to every decoder: each may accept it, or refuse it with a typed error.
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Err(r) = openai_chat::parse_request(bytes) {
        assert_typed(r, "chat")?;
    }
    if let Err(r) = openai_embeddings::parse_request(bytes) {
        assert_typed(r, "embeddings")?;
    }
    if let Err(r) = openai_responses::parse_request(bytes::Bytes::copy_from_slice(bytes)) {
        assert_typed(r, "responses")?;
    }
    for endpoint in [
        anthropic::Endpoint::Messages,
        anthropic::Endpoint::CountTokens,
    ] {
        if let Err(r) = anthropic::parse_messages_request(
            bytes::Bytes::copy_from_slice(bytes),
            endpoint,
            anthropic::InboundHeaders::default(),
        ) {
            assert_typed(r, "messages")?;
        }
    }
    Ok(())
}

/// Sets `v` at a path chosen by `pick` (object keys and array indices, at most 3 deep).
fn replace_somewhere(mut seed: Value, pick: &[usize], v: Value) -> Value {
    fn go(at: &mut Value, pick: &[usize], v: Value) {
        let Some((&p, rest)) = pick.split_first() else {
            *at = v;
            return;
        };
        match at {
            Value::Object(o) if !o.is_empty() => {
                let k = o.keys().nth(p % o.len()).unwrap().clone();
                go(o.get_mut(&k).unwrap(), rest, v);
            }
            Value::Array(a) if !a.is_empty() => {
                let n = a.len();
                go(&mut a[p % n], rest, v);
            }
            _ => *at = v,
        }
    }
    go(&mut seed, pick, v);
    seed
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes)?;
    }

    #[test]
    fn arbitrary_request_shaped_json_never_panics(v in request_like()) {
        decode_all(&serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn a_valid_request_with_one_field_replaced_never_panics(
        which in 0usize..4,
        pick in prop::collection::vec(any::<usize>(), 0..4),
        v in json_value(),
    ) {
        let mutated = replace_somewhere(seeds()[which].clone(), &pick, v);
        decode_all(&serde_json::to_vec(&mutated).unwrap())?;
    }

    #[test]
    fn a_valid_request_truncated_never_panics(which in 0usize..4, cut in any::<usize>()) {
        let bytes = serde_json::to_vec(&seeds()[which]).unwrap();
        decode_all(&bytes[..cut % bytes.len()])?;
    }

    /// Config text made of real table names, keys and values in any order: loaded or refused
    /// with a `ConfigError`, never a panic.
    #[test]
    fn config_toml_never_panics(lines in prop::collection::vec(config_line(), 0..12)) {
        let _ = crate::config::Config::from_toml_str(&lines.join("\n"));
    }

    #[test]
    fn config_of_arbitrary_text_never_panics(text in any::<String>()) {
        let _ = crate::config::Config::from_toml_str(&text);
    }
}

/// One line of a tollgate config: a table header or `key = value`.
fn config_line() -> impl Strategy<Value = String> {
    const TABLES: &[&str] = &[
        "[server]",
        "[database]",
        "[auth]",
        "[[auth.static_keys]]",
        "[auth.jwt]",
        "[auth.introspection]",
        "[providers.p]",
        "[providers.q]",
        "[aliases.a]",
        "[service_types.default]",
        "[budgets.b]",
        "[pricing.\"p/m\"]",
        "[routing]",
        "[log]",
        "[rate_limits.r]",
    ];
    const CONFIG_KEYS: &[&str] = &[
        "kind",
        "base_url",
        "keys",
        "models",
        "chain",
        "url",
        "max_body_bytes",
        "max_header_bytes",
        "header_read_timeout_ms",
        "connect_timeout_ms",
        "max_response_bytes",
        "unhealthy_after_failures",
        "user",
        "key",
        "period",
        "limit_usd",
        "input_usd_per_mtok",
        "tokens",
        "level",
        "format",
        "http_addr",
        "ledger_flush_ms",
        "purposes",
    ];
    const VALUES: &[&str] = &[
        "0",
        "1",
        "-1",
        "18446744073709551615",
        "1e308",
        "\"openai\"",
        "\"anthropic\"",
        "\"mock\"",
        "\"http://127.0.0.1:1\"",
        "\"\"",
        "[]",
        "[\"p/m\"]",
        "[\"a\"]",
        "true",
        "\"daily\"",
        "\"json\"",
        "\"${NOPE}\"",
        "{}",
        "\"127.0.0.1:0\"",
    ];
    prop_oneof![
        prop::sample::select(TABLES).prop_map(str::to_string),
        (
            prop::sample::select(CONFIG_KEYS),
            prop::sample::select(VALUES)
        )
            .prop_map(|(k, v)| format!("{k} = {v}")),
    ]
}

/// The order checks of the Anthropic stream decoder (found by tests/it/hostile.rs): events
/// before `message_start`, a second one, and a delta for a block never started are refused.
#[test]
fn anthropic_events_out_of_order_are_malformed() {
    let start =
        r#"{"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":1}}}"#;
    let delta = |i: u32| {
        format!(
            r#"{{"type":"content_block_delta","index":{i},"delta":{{"type":"text_delta","text":"x"}}}}"#
        )
    };
    let mut d = anthropic::StreamDecoder::new(0);
    assert!(d.event(&delta(0)).is_err(), "a delta before message_start");
    let mut d = anthropic::StreamDecoder::new(0);
    assert!(d.event(r#"{"type":"message_stop"}"#).is_err());
    let mut d = anthropic::StreamDecoder::new(0);
    d.event(start).unwrap();
    assert!(d.event(start).is_err(), "a second message_start");
    let mut d = anthropic::StreamDecoder::new(0);
    d.event(start).unwrap();
    assert!(
        d.event(&delta(3)).is_err(),
        "a delta for a block never started"
    );
    d.event(
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    )
    .unwrap();
    assert!(d.event(&delta(0)).unwrap().is_some());
}

/// A chunk with neither `choices` nor `usage` says nothing: refused (found by
/// tests/it/hostile.rs); a usage-only chunk without `choices` is still read.
#[test]
fn a_chunk_without_choices_or_usage_is_refused() {
    assert!(openai_chat::parse_chunk(r#"{"id":"c","object":"chat.completion.chunk"}"#).is_err());
    let usage = openai_chat::parse_chunk(
        r#"{"id":"c","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
    )
    .unwrap();
    assert!(usage.choices.is_empty() && usage.usage.is_some());
}
