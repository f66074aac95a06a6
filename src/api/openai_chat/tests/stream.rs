use serde_json::{json, Value};

use crate::api::openai_chat::{chunk_to_object, encode_chunk, parse_chunk};
use crate::api::{ChatDelta, ChoiceDelta, StopReason, ToolCallDelta, Usage};

fn parse(v: &Value) -> ChatDelta {
    parse_chunk(&v.to_string()).unwrap()
}

/// Asserts that the chunk goes back out exactly as it came, as an object and as text.
fn assert_round_trip(v: &Value) {
    let d = parse(v);
    assert_eq!(&Value::Object(chunk_to_object(&d)), v);
    let text: Value = serde_json::from_str(&encode_chunk(&d)).unwrap();
    assert_eq!(&text, v, "encode_chunk and chunk_to_object differ");
}

/// A chunk of OpenAI's stream around `choice`.
fn openai_chunk(choice: Value) -> Value {
    json!({"id": "chatcmpl-AzLb3", "object": "chat.completion.chunk", "created": 1739000000,
        "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
        "system_fingerprint": "fp_72ed7ab54c", "choices": [choice], "obfuscation": "Yx3"})
}

#[test]
fn round_trips_a_text_stream() {
    let role = openai_chunk(
        json!({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
        "logprobs": null, "finish_reason": null}),
    );
    let text = openai_chunk(
        json!({"index": 0, "delta": {"content": "Hello"}, "logprobs": null, "finish_reason": null}),
    );
    let finish =
        openai_chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}));
    for c in [&role, &text, &finish] {
        assert_round_trip(c);
    }
    let r = parse(&role);
    assert_eq!(r.choices[0].role.as_deref(), Some("assistant"));
    assert_eq!(r.choices[0].content.as_deref(), Some(""));
    assert_eq!(r.choices[0].delta_extra["refusal"], Value::Null);
    assert_eq!(r.extra["obfuscation"], "Yx3");
    assert_eq!((r.id.as_str(), r.created), ("chatcmpl-AzLb3", 1739000000));
    assert_eq!(parse(&text).content(), "Hello");
    let f = parse(&finish);
    assert_eq!(f.finish_reason(), Some(&StopReason::Stop));
    assert_eq!(f.choices[0].extra["logprobs"], Value::Null);
    assert!(!f.is_usage_only());
}

#[test]
fn round_trips_tool_call_pieces() {
    let first = openai_chunk(
        json!({"index": 0, "delta": {"role": "assistant", "content": null,
        "tool_calls": [{"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}], "refusal": null},
        "logprobs": null, "finish_reason": null}),
    );
    let piece = |i: u32, args: &str| {
        openai_chunk(
            json!({"index": 0, "delta": {"tool_calls": [{"index": i, "function": {"arguments": args}}]},
            "logprobs": null, "finish_reason": null}),
        )
    };
    let second = openai_chunk(
        json!({"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_2",
        "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        "logprobs": null, "finish_reason": null}),
    );
    let finish = openai_chunk(
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}),
    );
    let chunks = [
        first,
        piece(0, "{\""),
        piece(0, "city\":\"Oslo\"}"),
        second,
        piece(1, "{}"),
        finish,
    ];
    for c in &chunks {
        assert_round_trip(c);
    }
    let d = parse(&chunks[0]);
    assert_eq!(d.choices[0].content, None);
    assert_eq!(d.choices[0].delta_extra["content"], Value::Null);
    assert_eq!(
        d.choices[0].tool_calls,
        [ToolCallDelta {
            index: 0,
            id: Some("call_DdmO9pD3xa9XTPNJ32zg2hcA".into()),
            name: Some("get_weather".into()),
            arguments: String::new(),
            extra: Default::default()
        }]
    );
    let args: String = chunks
        .iter()
        .flat_map(|c| parse(c).choices)
        .flat_map(|c| c.tool_calls)
        .filter(|t| t.index == 0)
        .map(|t| t.arguments)
        .collect();
    assert_eq!(args, r#"{"city":"Oslo"}"#);
    let p = parse(&chunks[1]).choices[0].tool_calls[0].clone();
    assert_eq!((p.id, p.name, p.extra.is_empty()), (None, None, true));
    assert_eq!(
        parse(&chunks[5]).finish_reason(),
        Some(&StopReason::ToolCalls)
    );
}

#[test]
fn round_trips_the_usage_chunk() {
    let usage = json!({"id": "chatcmpl-AzLb3", "object": "chat.completion.chunk", "created": 1739000000,
        "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "system_fingerprint": "fp_72ed7ab54c",
        "choices": [], "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 3}}, "obfuscation": "q"});
    assert_round_trip(&usage);
    let d = parse(&usage);
    assert!(d.is_usage_only());
    assert_eq!(
        d.usage,
        Some(Usage {
            prompt_tokens: 19,
            completion_tokens: 10,
            cached_prompt_tokens: 3,
            cache_creation_tokens: 0
        })
    );
}

#[test]
fn reads_usage_null_as_none() {
    // With include_usage every chunk before the last carries `"usage": null`; it is not kept.
    let mut c = openai_chunk(
        json!({"index": 0, "delta": {"content": "x"}, "logprobs": null, "finish_reason": null}),
    );
    c["usage"] = Value::Null;
    let d = parse(&c);
    assert_eq!(d.usage, None);
    c.as_object_mut().unwrap().remove("usage");
    assert_eq!(Value::Object(chunk_to_object(&d)), c);
}

#[test]
fn reads_details_it_does_not_model() {
    // OpenAI's usage with every detail: the figures are read, the other details are dropped.
    let c = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 4, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}});
    let d = parse(&c);
    assert_eq!(
        d.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((5, 7))
    );
    assert_eq!(
        chunk_to_object(&d)["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
    );
}

#[test]
fn round_trips_reasoning_and_other_servers() {
    let reasoning = json!({"id": "1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-reasoner",
        "choices": [{"index": 0, "delta": {"content": null, "reasoning_content": "Hmm"}, "logprobs": null,
            "finish_reason": null}]});
    assert_round_trip(&reasoning);
    assert_eq!(
        parse(&reasoning).choices[0].reasoning.as_deref(),
        Some("Hmm")
    );
    // vLLM sends `type` on every piece; a piece with extra keys keeps them.
    let vllm = json!({"id": "2", "object": "chat.completion.chunk", "created": 2, "model": "qwen",
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "type": "function",
            "function": {"arguments": "{}", "x_fn": 1}, "x_piece": true}]},
            "logprobs": null, "finish_reason": null, "stop_reason": null}]});
    assert_round_trip(&vllm);
    let t = &parse(&vllm).choices[0].tool_calls[0];
    assert_eq!(t.extra["type"], "function");
    assert_eq!(t.extra["function"], json!({"x_fn": 1}));
    assert_eq!(t.extra["x_piece"], true);
}

#[test]
fn encodes_a_delta_built_in_code() {
    let d = ChatDelta {
        id: "chatcmpl-x".into(),
        created: 3,
        model: "mock/echo".into(),
        choices: vec![
            ChoiceDelta::default(),
            ChoiceDelta {
                index: 1,
                tool_calls: vec![ToolCallDelta {
                    index: 0,
                    name: Some("f".into()),
                    ..Default::default()
                }],
                finish_reason: Some(StopReason::Length),
                reasoning_signature: Some("sig".into()),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let want = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 3, "model": "mock/echo",
    "choices": [
        {"index": 0, "delta": {}, "finish_reason": null},
        {"index": 1, "delta": {"tool_calls": [{"index": 0, "type": "function", "function": {"name": "f", "arguments": ""}}]},
         "finish_reason": "length"}
    ]});
    assert_eq!(Value::Object(chunk_to_object(&d)), want);
    assert_eq!(
        serde_json::from_str::<Value>(&encode_chunk(&d)).unwrap(),
        want
    );
}

#[test]
fn reports_errors_in_the_stream() {
    let e = parse_chunk(r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#)
        .unwrap_err();
    assert!(
        e.contains("The server had an error while processing your request."),
        "{e}"
    );
    let e = parse_chunk(r#"{"object":"error","message":"maximum context length is 4096","type":"BadRequestError","code":400}"#)
        .unwrap_err();
    assert!(e.contains("maximum context length is 4096"), "{e}");
    assert!(parse_chunk(r#"{"error":"overloaded"}"#)
        .unwrap_err()
        .contains("overloaded"));
    assert!(parse_chunk(r#"{"error":{"code":500}}"#)
        .unwrap_err()
        .contains("500"));
    assert!(parse_chunk("{not json")
        .unwrap_err()
        .starts_with("bad chunk: "));
    assert!(parse_chunk("[DONE]").is_err());
    assert!(parse_chunk(r#"{"choices":{}}"#).is_err());
    assert!(parse_chunk(r#"{"choices":[1]}"#).is_err());
}
