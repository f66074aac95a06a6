//! The plain-request reader against the full reader: whatever body it reads, it reads as the
//! full reader does, and whatever it leaves, the full reader answers as before.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::super::plain_request::read_plain_request;
use super::super::request::parse_request_tree;
use crate::api::openai_chat::parse_request;
use crate::api::MaxTokensField;

/// Both readers' answers to `body`, and whether the plain reader took it.
fn compare(body: &[u8]) -> Result<bool, TestCaseError> {
    let tree = parse_request_tree(body);
    let plain = read_plain_request(body);
    if let Some(plain) = &plain {
        let tree = tree.as_ref();
        prop_assert!(
            tree.is_ok(),
            "plain read a body the tree refused: {:?}",
            tree.err()
        );
        prop_assert_eq!(plain, tree.unwrap());
    }
    // What the callers see is the tree's answer, refusals word for word.
    let seen = parse_request(body);
    prop_assert_eq!(format!("{seen:?}"), format!("{tree:?}"));
    Ok(plain.is_some())
}

fn takes(body: &str) -> bool {
    compare(body.as_bytes()).unwrap()
}

#[test]
fn the_common_bodies_are_read_plainly() {
    for body in [
        r#"{"model":"up/gpt-bench","messages":[{"role":"user","content":"hello"}],"max_tokens":64}"#,
        r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"h\u00e9\n"}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.2,"top_p":1,"user":"u","seed":7}"#,
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"refusal":null}],"stream":null,"max_completion_tokens":5}"#,
        r#"{"mod\u0065l":"m","messages":[{"role":"user","content":"x"}]}"#,
    ] {
        assert!(takes(body), "not read plainly: {body}");
    }
    let req = read_plain_request(
        br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true,"x":1}}"#,
    )
    .unwrap();
    assert_eq!(req.max_tokens, Some(5));
    assert_eq!(req.max_tokens_field, MaxTokensField::MaxCompletionTokens);
    assert!(req.stream && req.include_usage);
    assert_eq!(
        req.extra["stream_options"],
        json!({"include_usage": true, "x": 1})
    );
}

#[test]
fn other_bodies_are_left_to_the_full_reader() {
    for body in [
        // Shapes the plain reader does not model.
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":"\n"}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
        r#"{"model":"m","messages":[{"role":"tool","tool_call_id":"c","content":"r"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","name":"n","content":"x"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":null}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1,"max_completion_tokens":2}"#,
        // Duplicate keys: the full reader keeps the last.
        r#"{"model":"a","model":"b","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"m","user":"a","user":"b","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","role":"system","content":"x"}]}"#,
        // Refusals, which keep their messages.
        r#"{"model":" ","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"m","messages":[]}"#,
        r#"{"model":"m","messages":[{"role":"","content":"x"}]}"#,
        r#"{"model":"m","messages":[{"content":"x"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}]} trailing"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}]"#,
        r#"[1]"#,
    ] {
        assert!(!takes(body), "read plainly: {body}");
    }
}

const TOP: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "user",
    "seed",
    "stop",
];
const IN_MESSAGE: &[&str] = &["role", "content", "name", "refusal", "tool_calls"];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..100).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-2.0f64..2.0).prop_map(Value::from),
        prop::sample::select(&["", " ", "user", "system", "m", "x\u{e9}\n\""][..])
            .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(2, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(&["include_usage", "type", "text"][..]),
                    inner
                ),
                0..3
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

fn message() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(IN_MESSAGE), value()), 0..4).prop_map(|kv| {
        let mut o: Map<String, Value> = kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        o.entry("role").or_insert_with(|| json!("user"));
        Value::Object(o)
    })
}

fn body() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((prop::sample::select(TOP), value()), 0..6),
        prop::collection::vec(message(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(kv, messages, typed_model)| {
            let mut o: Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if typed_model {
                o.insert("model".into(), json!("m"));
                o.insert("messages".into(), Value::Array(messages));
            }
            Value::Object(o)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_plain_reader_agrees_with_the_full_one(body in body()) {
        compare(body.to_string().as_bytes())?;
    }
}
