//! Unit tests of the Responses conversions.

use bytes::Bytes;
use serde_json::{json, Value};

use super::*;
use crate::api::{
    Api, ChatDelta, ChatResponse, Choice, ChoiceDelta, Content, Message, Reasoning, Role,
    StopReason, Tool, ToolCall, ToolCallDelta, ToolChoice, Usage,
};
use crate::error::Reason;

fn parse(v: Value) -> Result<(crate::api::ChatRequest, Echo), crate::error::Rejection> {
    parse_request(Bytes::from(v.to_string()))
}

#[test]
fn string_input_and_instructions() {
    let (req, echo) = parse(json!({"model": "m", "input": "hi", "instructions": "sys",
        "max_output_tokens": 7, "temperature": 0.5, "user": "u1"}))
    .unwrap();
    assert_eq!(req.api, Api::Responses);
    assert_eq!(req.messages.len(), 2);
    assert_eq!(req.messages[0].role, Role::System);
    assert_eq!(req.messages[1].content, Some(Content::Text("hi".into())));
    assert_eq!(req.max_tokens, Some(7));
    assert_eq!(req.temperature, Some(0.5));
    assert_eq!(req.extra["user"], "u1");
    assert!(req.include_usage);
    let native = req.native.unwrap();
    assert_eq!(native.api, Api::Responses);
    assert!(native.untranslatable.is_none());
    assert_eq!(echo.model, "m");
    assert_eq!(echo.fields["instructions"], "sys");
    assert_eq!(echo.fields["tools"], json!([]));
}

#[test]
fn items_become_one_assistant_turn_and_tool_results() {
    let (req, _) = parse(json!({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
            {"type": "input_image", "image_url": "https://x/i.png", "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}],
            "encrypted_content": "sig"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "r2"}]},
    ]}))
    .unwrap();
    let m = &req.messages;
    assert_eq!(m.len(), 4);
    assert!(matches!(&m[0].content, Some(Content::Parts(p)) if p.len() == 2));
    assert_eq!(m[1].role, Role::Assistant);
    assert_eq!(m[1].content, Some(Content::Text("Let me".into())));
    assert_eq!(
        m[1].reasoning,
        vec![Reasoning {
            text: "hmm".into(),
            signature: Some("sig".into()),
            redacted: None
        }]
    );
    let ids: Vec<&str> = m[1].tool_calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c1", "c2"]);
    assert_eq!(m[2].role, Role::Tool);
    assert_eq!(m[2].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(m[3].tool_call_id.as_deref(), Some("c2"));
}

#[test]
fn tools_choice_and_format() {
    let (req, _) = parse(json!({"model": "m", "input": "x",
        "tools": [{"type": "function", "name": "f", "description": "d",
            "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false,
        "reasoning": {"effort": "high"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": true}}}))
    .unwrap();
    let Tool::Function(f) = &req.tools[0] else {
        panic!("a function tool")
    };
    assert_eq!(f.name, "f");
    assert_eq!(f.parameters, Some(json!({"type": "object"})));
    assert_eq!(f.extra["strict"], true);
    assert_eq!(req.tool_choice, Some(ToolChoice::Function("f".into())));
    assert_eq!(req.extra["parallel_tool_calls"], false);
    assert_eq!(req.extra["reasoning_effort"], "high");
    assert_eq!(
        req.extra["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": true}})
    );
}

#[test]
fn state_and_builtin_tools_are_untranslatable_not_invalid() {
    for body in [
        json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
        json!({"model": "m", "previous_response_id": "resp_1"}),
        json!({"model": "m", "conversation": "conv_1", "input": "x"}),
        json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
    ] {
        let (req, _) = parse(body.clone()).unwrap();
        let why = req.native.unwrap().untranslatable.clone().unwrap();
        assert!(why.contains("keeps no conversation state"), "{body}: {why}");
    }
    let (req, _) = parse(json!({"model": "m", "input": "x", "store": true,
        "tools": [{"type": "web_search"}]}))
    .unwrap();
    let why = req.native.unwrap().untranslatable.clone().unwrap();
    assert!(why.contains("built-in tool `web_search`"), "{why}");
    let (req, _) = parse(json!({"model": "m", "input": "x", "store": true})).unwrap();
    assert!(req.native.unwrap().untranslatable.is_none());
}

#[test]
fn bad_bodies_name_their_param() {
    for (body, param) in [
        (json!({"input": "x"}), "model"),
        (json!({"model": "m"}), "input"),
        (json!({"model": "m", "input": {}}), "input"),
        (
            json!({"model": "m", "input": "x", "stream": "yes"}),
            "stream",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": "maybe"}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}),
            "input[0].output",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"text": "x"}]}]}),
            "input[0].content[0]",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}),
            "text.format.type",
        ),
    ] {
        let e = parse(body.clone()).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidRequest, "{body}");
        assert_eq!(e.param.as_deref(), Some(param), "{body}");
    }
    assert!(parse_request(Bytes::from_static(b"[1]")).is_err());
}

fn answer(text: &str, calls: Vec<ToolCall>, stop: StopReason) -> ChatResponse {
    let mut m = Message::text(Role::Assistant, text);
    m.tool_calls = calls;
    m.reasoning = vec![Reasoning {
        text: "think".into(),
        signature: Some("sig".into()),
        redacted: None,
    }];
    ChatResponse {
        id: "abc".into(),
        created: 5,
        model: "p/m".into(),
        choices: vec![Choice {
            index: 0,
            message: m,
            finish_reason: Some(stop),
            extra: Default::default(),
        }],
        usage: None,
        extra: Default::default(),
    }
}

fn some_usage() -> Usage {
    Usage {
        prompt_tokens: 10,
        completion_tokens: 4,
        cached_prompt_tokens: 3,
        cache_creation_tokens: 0,
    }
}

#[test]
fn response_object_items_and_usage() {
    let (_, echo) = parse(json!({"model": "alias", "input": "x"})).unwrap();
    let call = ToolCall {
        id: "call_1".into(),
        name: "f".into(),
        arguments: "{}".into(),
        extra: Default::default(),
    };
    let v: Value = serde_json::from_str(&encode_response(
        &answer("hi", vec![call], StopReason::ToolCalls),
        &some_usage(),
        &echo,
    ))
    .unwrap();
    assert_eq!(v["id"], "resp_abc");
    assert_eq!(v["object"], "response");
    assert_eq!(v["model"], "alias");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["created_at"], 5);
    let out = v["output"].as_array().unwrap();
    assert_eq!(out[0]["type"], "reasoning");
    assert_eq!(out[0]["content"][0]["text"], "think");
    assert_eq!(out[0]["encrypted_content"], "sig");
    assert_eq!(
        out[1]["content"][0],
        json!({"type": "output_text", "text": "hi", "annotations": [], "logprobs": []})
    );
    assert_eq!(out[2]["call_id"], "call_1");
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
            "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14})
    );
    let v: Value = serde_json::from_str(&encode_response(
        &answer("cut", vec![], StopReason::Length),
        &some_usage(),
        &echo,
    ))
    .unwrap();
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
}

fn delta(f: impl FnOnce(&mut ChoiceDelta)) -> ChatDelta {
    let mut c = ChoiceDelta::default();
    f(&mut c);
    ChatDelta {
        id: "abc".into(),
        created: 5,
        model: "p/m".into(),
        choices: vec![c],
        usage: None,
        extra: Default::default(),
    }
}

#[test]
fn stream_sequence_text_then_call() {
    let (_, echo) = parse(json!({"model": "alias", "input": "x"})).unwrap();
    let mut enc = StreamEncoder::new(echo);
    let mut ev = Vec::new();
    ev.extend(enc.push(&delta(|c| c.content = Some("He".into()))));
    ev.extend(enc.push(&delta(|c| c.content = Some("llo".into()))));
    ev.extend(enc.push(&delta(|c| {
        c.tool_calls = vec![ToolCallDelta {
            index: 0,
            id: Some("call_1".into()),
            name: Some("f".into()),
            arguments: "{\"a\"".into(),
            extra: Default::default(),
        }]
    })));
    ev.extend(enc.push(&delta(|c| {
        c.tool_calls = vec![ToolCallDelta {
            index: 0,
            id: Some("call_1".into()),
            arguments: ":1}".into(),
            ..ToolCallDelta::default()
        }];
        c.finish_reason = Some(StopReason::ToolCalls);
    })));
    let mut last = delta(|_| {});
    last.choices.clear();
    last.usage = Some(some_usage());
    ev.extend(enc.push(&last));
    ev.extend(enc.finish());
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (n, d)) in ev.iter().enumerate() {
        assert_eq!(d["type"], n.as_str());
        assert_eq!(d["sequence_number"], i as u64);
    }
    assert_eq!(ev[6].1["text"], "Hello");
    assert_eq!(ev[10].1["output_index"], 1);
    assert_eq!(ev[12].1["arguments"], "{\"a\":1}");
    let done = &ev[14].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["output"][1]["call_id"], "call_1");
    assert_eq!(done["usage"]["total_tokens"], 14);
    assert!(enc.finish().is_empty());
}

#[test]
fn stream_reasoning_incomplete_and_failure() {
    let (_, echo) = parse(json!({"model": "alias", "input": "x"})).unwrap();
    let mut enc = StreamEncoder::new(echo.clone());
    let mut ev = enc.push(&delta(|c| c.reasoning = Some("think".into())));
    ev.extend(enc.push(&delta(|c| c.reasoning_signature = Some("sig".into()))));
    ev.extend(enc.push(&delta(|c| {
        c.content = Some("a".into());
        c.finish_reason = Some(StopReason::Length);
    })));
    ev.extend(enc.finish());
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[2..5],
        [
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta"
        ]
    );
    let last = ev.last().unwrap();
    assert_eq!(last.0, "response.incomplete");
    assert_eq!(last.1["response"]["output"][0]["encrypted_content"], "sig");
    assert_eq!(
        last.1["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );

    let mut enc = StreamEncoder::new(echo);
    let n = enc.push(&delta(|c| c.content = Some("a".into()))).len();
    let failed = enc.failed(&crate::error::Rejection::new(
        Reason::UpstreamError,
        "broke",
    ));
    assert_eq!(failed[0].0, "response.failed");
    assert_eq!(failed[0].1["sequence_number"], n as u64);
    assert_eq!(failed[0].1["response"]["status"], "failed");
    assert_eq!(failed[0].1["response"]["error"]["message"], "broke");
    assert!(sse(&failed[0]).starts_with("event: response.failed\ndata: {"));
}

#[test]
fn native_usage_and_chars() {
    let v = json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": "abcd"}]},
        {"type": "function_call", "arguments": "{}"}],
        "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 3}});
    assert_eq!(
        usage(&v["usage"]),
        Some(Usage {
            prompt_tokens: 9,
            completion_tokens: 3,
            cached_prompt_tokens: 2,
            cache_creation_tokens: 0
        })
    );
    assert_eq!(generated_chars(&v), 6);
}
