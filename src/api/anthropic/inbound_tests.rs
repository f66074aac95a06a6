//! The inbound Messages conversions: a caller's body into the neutral request, a neutral answer
//! and deltas back into a Message and events, rejections into error bodies.

use serde_json::{json, Value};

use super::{
    encode_message, error_json, parse_messages_request, Endpoint, InboundHeaders, StreamEncoder,
};
use crate::api::{
    Api, ChatDelta, ChatResponse, Choice, ChoiceDelta, Content, ContentPart, JsonObject, Message,
    Reasoning, Role, StopReason, Tool, ToolCall, ToolCallDelta, ToolChoice, Usage,
};
use crate::error::{Reason, Rejection};

fn parse(v: &Value) -> Result<crate::api::ChatRequest, Rejection> {
    parse_messages_request(
        v.to_string().into(),
        Endpoint::Messages,
        InboundHeaders::default(),
    )
}

#[test]
fn a_full_body_becomes_the_neutral_request_and_keeps_its_bytes() {
    let body = json!({
        "model": "claude-x",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "7C", "is_error": false},
                {"type": "text", "text": "And tomorrow?"}
            ]}
        ],
        "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "metadata": {"user_id": "u-1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "stream": true,
        "unknown_field": {"kept": true}
    });
    let text = body.to_string();
    let req = parse_messages_request(
        text.clone().into(),
        Endpoint::Messages,
        InboundHeaders {
            version: Some("2023-06-01".into()),
            beta: vec!["b1".into()],
        },
    )
    .unwrap();
    assert_eq!(req.api, Api::Messages);
    assert_eq!(req.model, "claude-x");
    assert_eq!(req.max_tokens, Some(300));
    assert!(req.stream && req.include_usage);
    assert_eq!(req.stop, vec!["END"]);
    assert_eq!(req.temperature, Some(0.5));
    assert_eq!(req.extra["user"], "u-1");
    assert_eq!(req.extra["parallel_tool_calls"], false);
    assert_eq!(req.tool_choice, Some(ToolChoice::Required));
    assert!(matches!(&req.tools[0], Tool::Function(f) if f.name == "weather"));
    assert!(matches!(&req.tools[1], Tool::Other(_)));
    let roles: Vec<&str> = req.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
    match &req.messages[0].content {
        Some(Content::Parts(p)) => {
            assert!(
                matches!(&p[0], ContentPart::Text { extra, .. } if extra.contains_key("cache_control"))
            )
        }
        other => panic!("{other:?}"),
    }
    match &req.messages[1].content {
        Some(Content::Parts(p)) => {
            assert!(
                matches!(&p[1], ContentPart::Image { url, .. } if url == "data:image/png;base64,AAAA")
            )
        }
        other => panic!("{other:?}"),
    }
    let a = &req.messages[2];
    assert_eq!(a.reasoning[0].signature.as_deref(), Some("sig"));
    assert_eq!(a.tool_calls[0].arguments, r#"{"city":"Oslo"}"#);
    assert_eq!(req.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
    assert_eq!(req.messages[3].extra["is_error"], false);
    let native = req.native.as_ref().unwrap();
    assert_eq!(&native.body[..], text.as_bytes());
    assert_eq!(native.anthropic_beta, vec!["b1"]);
}

#[test]
fn caller_mistakes_are_invalid_requests() {
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"model": "m", "messages": user}), "max_tokens"),
        (
            json!({"model": "m", "max_tokens": 0, "messages": user}),
            "max_tokens",
        ),
        (json!({"max_tokens": 5, "messages": user}), "model"),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "messages",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": user, "system": 5}),
            "system",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": user, "tool_choice": {"type": "bad"}}),
            "tool_choice.type",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
            "messages[0].content[0]",
        ),
    ];
    for (body, param) in cases {
        let e = parse(&body).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidRequest, "{body}");
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
    }
    let e = parse_messages_request(
        bytes::Bytes::from_static(b"{not json"),
        Endpoint::Messages,
        InboundHeaders::default(),
    )
    .unwrap_err();
    assert_eq!(e.reason, Reason::InvalidRequest);
    // count_tokens needs no max_tokens.
    let ok = parse_messages_request(
        json!({"model": "m", "messages": user}).to_string().into(),
        Endpoint::CountTokens,
        InboundHeaders::default(),
    );
    assert!(ok.is_ok());
}

#[test]
fn a_whole_answer_is_a_message() {
    let mut m = Message::text(Role::Assistant, "Hi there");
    m.reasoning.push(Reasoning {
        text: "think".into(),
        signature: Some("s".into()),
        redacted: None,
    });
    m.tool_calls.push(ToolCall {
        id: "call_1".into(),
        name: "f".into(),
        arguments: r#"{"a":1}"#.into(),
        extra: JsonObject::new(),
    });
    let resp = ChatResponse {
        id: "chatcmpl-1".into(),
        created: 0,
        model: "up/ok".into(),
        choices: vec![Choice {
            index: 0,
            message: m,
            finish_reason: Some(StopReason::ToolCalls),
            extra: JsonObject::new(),
        }],
        usage: None,
        extra: JsonObject::new(),
    };
    let usage = Usage {
        prompt_tokens: 10,
        completion_tokens: 4,
        cached_prompt_tokens: 3,
        cache_creation_tokens: 0,
    };
    let v: Value = serde_json::from_str(&encode_message(&resp, &usage)).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["id"], "msg_chatcmpl-1");
    assert_eq!(v["model"], "up/ok");
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["content"][0]["type"], "thinking");
    assert_eq!(v["content"][0]["signature"], "s");
    assert_eq!(v["content"][1], json!({"type": "text", "text": "Hi there"}));
    assert_eq!(v["content"][2]["input"], json!({"a": 1}));
    assert_eq!(v["usage"]["input_tokens"], 7);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 3);
    assert_eq!(v["usage"]["output_tokens"], 4);
}

fn delta(choice: ChoiceDelta, usage: Option<Usage>) -> ChatDelta {
    ChatDelta {
        id: "chatcmpl-9".into(),
        created: 0,
        model: "up/ok".into(),
        choices: vec![choice],
        usage,
        extra: JsonObject::new(),
    }
}

fn names(events: &[(&'static str, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(n, v)| match v["delta"]["type"].as_str() {
            Some(t) => format!("{n}:{}:{t}", v["index"]),
            None => match v["index"].as_u64() {
                Some(i) => format!("{n}:{i}"),
                None => n.to_string(),
            },
        })
        .collect()
}

#[test]
fn deltas_become_the_anthropic_event_sequence() {
    let mut enc = StreamEncoder::new();
    let mut events = Vec::new();
    // The first delta carries text already: it must not be lost behind message_start.
    events.extend(enc.push(&delta(
        ChoiceDelta {
            role: Some("assistant".into()),
            reasoning: Some("Let me".into()),
            ..ChoiceDelta::default()
        },
        None,
    )));
    events.extend(enc.push(&delta(
        ChoiceDelta {
            reasoning_signature: Some("sig".into()),
            content: Some("Hi".into()),
            ..ChoiceDelta::default()
        },
        None,
    )));
    events.extend(enc.push(&delta(
        ChoiceDelta {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: Some("call_1".into()),
                name: Some("f".into()),
                arguments: "{\"a\"".into(),
                extra: JsonObject::new(),
            }],
            ..ChoiceDelta::default()
        },
        None,
    )));
    events.extend(enc.push(&delta(
        ChoiceDelta {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                // Repeated, as some servers send it: still the same block.
                id: Some("call_1".into()),
                arguments: ":1}".into(),
                ..ToolCallDelta::default()
            }],
            finish_reason: Some(StopReason::ToolCalls),
            ..ChoiceDelta::default()
        },
        None,
    )));
    let usage = Usage {
        prompt_tokens: 5,
        completion_tokens: 6,
        ..Usage::default()
    };
    let mut usage_only = delta(ChoiceDelta::default(), Some(usage));
    usage_only.choices.clear();
    events.extend(enc.push(&usage_only));
    events.extend(enc.finish());
    assert_eq!(
        names(&events),
        [
            "message_start",
            "ping",
            "content_block_start:0",
            "content_block_delta:0:thinking_delta",
            "content_block_delta:0:signature_delta",
            "content_block_stop:0",
            "content_block_start:1",
            "content_block_delta:1:text_delta",
            "content_block_stop:1",
            "content_block_start:2",
            "content_block_delta:2:input_json_delta",
            "content_block_delta:2:input_json_delta",
            "content_block_stop:2",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(events[0].1["message"]["id"], "msg_chatcmpl-9");
    assert_eq!(events[6].1["content_block"]["type"], "text");
    assert_eq!(events[9].1["content_block"]["id"], "call_1");
    let args: String = events[10..12]
        .iter()
        .map(|e| e.1["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(args, "{\"a\":1}");
    assert_eq!(events[13].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(events[13].1["usage"]["output_tokens"], 6);
    assert_eq!(events[13].1["usage"]["input_tokens"], 5);
}

#[test]
fn rejections_in_anthropic_shape() {
    let cases = [
        (Reason::InvalidRequest, "invalid_request_error"),
        (Reason::AuthRejected, "authentication_error"),
        (Reason::Blocked, "permission_error"),
        (Reason::ModelNotFound, "not_found_error"),
        (Reason::RateLimited, "rate_limit_error"),
        (Reason::PayloadTooLarge, "request_too_large"),
        (Reason::UpstreamError, "overloaded_error"),
        (Reason::InternalError, "api_error"),
    ];
    for (reason, ty) in cases {
        let v = error_json(&Rejection::new(reason, "m"));
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": ty, "message": "m"}})
        );
    }
}
