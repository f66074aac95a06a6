use serde_json::{json, Value};

use crate::api::openai_chat::{
    encode_response, parse_response, read_answer, response_from_object, response_to_object,
    AnswerFacts,
};
use crate::api::{ChatResponse, Choice, Content, Message, Role, StopReason, Usage};

fn parse(v: &Value) -> ChatResponse {
    parse_response(v.to_string().as_bytes()).unwrap()
}

fn round_trip(v: &Value) -> Value {
    let r = parse(v);
    let object = Value::Object(response_to_object(&r));
    let text: Value = serde_json::from_str(&encode_response(&r)).unwrap();
    assert_eq!(text, object, "encode_response and response_to_object agree");
    object
}

/// OpenAI's answer, with usage in the shape `Usage::to_openai` writes back.
fn openai_answer() -> Value {
    json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "The image shows a cat.", "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
            "prompt_tokens_details": {"cached_tokens": 1024}},
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035"
    })
}

#[test]
fn reads_an_answer() {
    let r = parse(&openai_answer());
    assert_eq!(r.id, "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG");
    assert_eq!(
        (r.created, r.model.as_str()),
        (1741570283, "gpt-4o-2024-08-06")
    );
    assert_eq!(r.first_text(), "The image shows a cat.");
    let c = &r.choices[0];
    assert_eq!(
        (c.index, c.finish_reason.clone()),
        (0, Some(StopReason::Stop))
    );
    assert_eq!(c.message.role, Role::Assistant);
    assert_eq!(c.message.extra["refusal"], Value::Null);
    assert_eq!(c.message.extra["annotations"], json!([]));
    assert_eq!(c.extra["logprobs"], Value::Null);
    assert_eq!(
        r.usage,
        Some(Usage {
            prompt_tokens: 1117,
            completion_tokens: 46,
            cached_prompt_tokens: 1024,
            cache_creation_tokens: 0
        })
    );
    let mut keys: Vec<_> = r.extra.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["service_tier", "system_fingerprint"]);
}

#[test]
fn round_trips_an_answer() {
    assert_eq!(round_trip(&openai_answer()), openai_answer());
}

#[test]
fn round_trips_tool_calls_and_reasoning() {
    let a = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "deepseek-reasoner",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": null, "reasoning_content": "cold north",
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            "logprobs": null,
            "finish_reason": "tool_calls"
        }, {
            "index": 1,
            "message": {"role": "assistant", "content": "cut"},
            "finish_reason": "length"
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    });
    assert_eq!(round_trip(&a), a);
    let r = parse(&a);
    let m = &r.choices[0].message;
    assert_eq!(m.content, None);
    assert_eq!(m.reasoning[0].text, "cold north");
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(r.choices[0].finish_reason, Some(StopReason::ToolCalls));
    assert_eq!(r.choices[1].finish_reason, Some(StopReason::Length));
    assert_eq!(
        r.estimate_completion_chars(),
        "cold north".len() + "get_weather".len() + 15 + 3
    );
}

#[test]
fn tolerates_a_sparse_answer() {
    let r = parse(
        &json!({"choices": [{"message": {"content": "hi"}, "finish_reason": null}], "usage": null}),
    );
    assert_eq!((r.id.as_str(), r.created, r.model.as_str()), ("", 0, ""));
    assert_eq!(r.usage, None);
    assert_eq!(r.choices[0].message.role, Role::Assistant);
    assert_eq!(r.choices[0].finish_reason, None);
    assert_eq!(
        Value::Object(response_to_object(&r)),
        json!({"id": "", "object": "chat.completion", "created": 0, "model": "",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": null}]})
    );
    let r = parse(&json!({"choices": [{"index": 0}]}));
    assert_eq!(r.choices[0].message.content, None);
}

#[test]
fn rejects_what_is_not_an_answer() {
    let e = parse_response(b"<html>").unwrap_err();
    assert!(e.starts_with("not a JSON object: "), "{e}");
    assert!(parse_response(b"[1]")
        .unwrap_err()
        .starts_with("not a JSON object: "));
    assert_eq!(
        parse_response(b"{\"id\":\"x\"}").unwrap_err(),
        "no `choices` in the answer"
    );
    assert!(parse_response(br#"{"choices":{}}"#).is_err());
    assert!(parse_response(br#"{"choices":[1]}"#).is_err());
    let e = parse_response(
        br#"{"choices":[{"message":{"role":"assistant","tool_calls":[{"id":"c"}]}}]}"#,
    )
    .unwrap_err();
    assert!(e.contains("choices[0].message.tool_calls[0]"), "{e}");
    assert!(response_from_object(serde_json::Map::new()).is_err());
}

#[test]
fn encodes_a_response_built_in_code() {
    let r = ChatResponse {
        id: "chatcmpl-x".into(),
        created: 9,
        model: "openai/gpt-4o".into(),
        choices: vec![Choice {
            index: 0,
            message: Message::text(Role::Assistant, "yo"),
            finish_reason: Some(StopReason::Other("pause_turn".into())),
            extra: Default::default(),
        }],
        usage: Some(Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
            ..Usage::default()
        }),
        extra: Default::default(),
    };
    assert_eq!(
        Value::Object(response_to_object(&r)),
        json!({"id": "chatcmpl-x", "object": "chat.completion", "created": 9, "model": "openai/gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "pause_turn"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})
    );
    assert!(matches!(
        r.choices[0].message.content,
        Some(Content::Text(_))
    ));
}

#[test]
fn read_answer_keeps_what_accounting_needs() {
    let v = json!({
        "id": "c", "model": "gpt-x", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hey"}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": null}, "finish_reason": null}
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}
    });
    let text = v.to_string();
    let facts = read_answer(text.as_bytes()).unwrap();
    let at = text.find(r#""gpt-x""#).unwrap();
    assert_eq!(
        facts,
        AnswerFacts {
            usage: Some(parse(&v).usage.unwrap()),
            model: Some("gpt-x".into()),
            model_span: Some(at..at + r#""gpt-x""#.len()),
            finish_reasons: vec!["stop".into()],
            generated_chars: 0,
        }
    );
    assert_eq!(facts.usage.unwrap().cached_prompt_tokens, 1);
}

/// The model's place is where `with_model` would rewrite it: the rewrite from it is the same,
/// escapes and spacing included; a model that is not a string has none.
#[test]
fn read_answer_finds_the_model_where_with_model_rewrites_it() {
    for answer in [
        r#"{ "model" : "gpt\u002dx" , "choices": [{"message": {"model": "no"}}]}"#,
        r#"{"choices": [], "model":"m"}"#,
    ] {
        let facts = read_answer(answer.as_bytes()).unwrap();
        let span = facts.model_span.expect("a string model");
        assert_eq!(
            crate::api::native::replace_span(answer.as_bytes(), span, "up/m"),
            crate::api::native::with_model(answer.into(), "up/m").to_vec(),
            "{answer}"
        );
    }
    let facts = read_answer(br#"{"model": 5, "choices": []}"#).unwrap();
    assert_eq!((facts.model, facts.model_span), (None, None));
    let facts = read_answer(br#"{"model": null, "choices": []}"#).unwrap();
    assert_eq!((facts.model, facts.model_span), (None, None));
}

#[test]
fn read_answer_counts_characters_when_no_usage_came() {
    let v = json!({"choices": [{"message": {"role": "assistant", "content": "héllo"}}]});
    let facts = read_answer(v.to_string().as_bytes()).unwrap();
    assert_eq!(facts.usage, None);
    assert_eq!(facts.generated_chars, parse(&v).estimate_completion_chars());
    assert!(facts.generated_chars > 0);
}

#[test]
fn read_answer_refuses_what_parse_response_refuses_in_its_words() {
    for bad in [
        "not json",
        "[1]",
        r#"{"id": "c"}"#,
        r#"{"choices": 3}"#,
        r#"{"choices": [3]}"#,
    ] {
        assert_eq!(
            read_answer(bad.as_bytes()).unwrap_err(),
            parse_response(bad.as_bytes()).unwrap_err(),
            "{bad}"
        );
    }
}
