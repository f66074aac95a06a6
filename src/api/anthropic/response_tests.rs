//! The response mapping, on the fixtures and on hand-made bodies.

use serde_json::json;

use super::{error_body, parse_response, stop_reason, usage};
use crate::api::{Content, Reasoning, Role, StopReason, ToolCall, Usage};

const TEXT: &str = include_str!("../../../tests/fixtures/anthropic/text.json");
const TOOL_USE: &str = include_str!("../../../tests/fixtures/anthropic/tool_use.json");
const THINKING: &str = include_str!("../../../tests/fixtures/anthropic/thinking.json");
const OVERLOADED: &str = include_str!("../../../tests/fixtures/anthropic/error_overloaded.json");
const INVALID: &str = include_str!("../../../tests/fixtures/anthropic/error_invalid_request.json");
const RATE_LIMIT: &str = include_str!("../../../tests/fixtures/anthropic/error_rate_limit.json");

#[test]
fn text_fixture() {
    let r = parse_response(TEXT.as_bytes(), 1_700_000_000).expect("parses");
    assert_eq!(r.id, "msg_013Zva2CMHLNnXjNJJKqJ2EF");
    assert_eq!(r.model, "claude-sonnet-4-5-20250929");
    assert_eq!(r.created, 1_700_000_000);
    assert_eq!(r.choices.len(), 1);
    let c = &r.choices[0];
    assert_eq!(c.index, 0);
    assert_eq!(c.message.role, Role::Assistant);
    assert_eq!(
        c.message.content,
        Some(Content::Text("Hi! My name is Claude.".into()))
    );
    assert_eq!(c.finish_reason, Some(StopReason::Stop));
    assert!(c.message.extra.is_empty());
    assert_eq!(
        r.usage,
        Some(Usage {
            prompt_tokens: 12 + 2000 + 100,
            completion_tokens: 9,
            cached_prompt_tokens: 2000,
            cache_creation_tokens: 100,
        })
    );
    // A null `stop_sequence` says nothing; the modelled keys are not repeated.
    assert!(r.extra.is_empty(), "{:?}", r.extra);
}

#[test]
fn tool_use_fixture() {
    let r = parse_response(TOOL_USE.as_bytes(), 1).expect("parses");
    let m = &r.choices[0].message;
    assert_eq!(r.choices[0].finish_reason, Some(StopReason::ToolCalls));
    assert_eq!(
        m.content,
        Some(Content::Text(
            "I'll check the current weather in San Francisco for you.".into()
        ))
    );
    assert_eq!(m.tool_calls.len(), 1);
    let call = &m.tool_calls[0];
    assert_eq!(call.id, "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(call.name, "get_weather");
    let args: serde_json::Value = serde_json::from_str(&call.arguments).expect("JSON arguments");
    assert_eq!(
        args,
        json!({"location": "San Francisco, CA", "unit": "celsius"})
    );
    assert!(
        !call.arguments.contains(": "),
        "compact: {}",
        call.arguments
    );
    assert_eq!(
        r.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((384, 73))
    );
}

#[test]
fn thinking_fixture() {
    let r = parse_response(THINKING.as_bytes(), 1).expect("parses");
    let m = &r.choices[0].message;
    assert_eq!(m.content, Some(Content::Text("27 * 453 = 12,231".into())));
    assert_eq!(m.reasoning.len(), 2);
    assert!(m.reasoning[0]
        .text
        .starts_with("Let me solve this step by step:"));
    assert!(m.reasoning[0].text.ends_with("= 12,231"));
    assert_eq!(
        m.reasoning[0].signature.as_deref(),
        Some("EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds")
    );
    assert_eq!(m.reasoning[0].redacted, None);
    assert_eq!(m.reasoning[1].text, "");
    assert!(m.reasoning[1]
        .redacted
        .as_deref()
        .is_some_and(|d| d.starts_with("EmwKAhgB")));
}

#[test]
fn texts_join_and_other_blocks_are_kept() {
    let body = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [
            {"type": "text", "text": "Let me search. "},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "rust"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "text", "text": "Rust is a language.", "citations": [
                {"type": "web_search_result_location", "url": "https://rust-lang.org", "cited_text": "Rust"}
            ]},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}, "caller": {"type": "direct"}},
        ],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "container": {"id": "container_1", "expires_at": "2025-01-01T00:00:00Z"},
        "usage": {"input_tokens": 5, "output_tokens": 6},
    });
    let r = parse_response(body.to_string().as_bytes(), 1).expect("parses");
    let m = &r.choices[0].message;
    assert_eq!(
        m.content,
        Some(Content::Text("Let me search. Rust is a language.".into()))
    );
    assert_eq!(m.extra["content_blocks"].as_array().map(Vec::len), Some(2));
    assert_eq!(m.extra["content_blocks"][0]["type"], "server_tool_use");
    assert_eq!(m.extra["citations"][0]["url"], "https://rust-lang.org");
    assert_eq!(
        m.tool_calls,
        vec![ToolCall {
            id: "toolu_1".into(),
            name: "f".into(),
            arguments: "{}".into(),
            extra: serde_json::from_value(json!({"caller": {"type": "direct"}})).expect("map"),
        }]
    );
    assert_eq!(r.choices[0].finish_reason, Some(StopReason::Stop));
    assert_eq!(r.extra["stop_sequence"], "END");
    assert_eq!(r.extra["container"]["id"], "container_1");
    assert_eq!(r.extra.len(), 2);
}

#[test]
fn no_text_means_no_content() {
    let body = json!({
        "id": "m", "type": "message", "role": "assistant", "model": "c",
        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, 2]}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1},
    });
    let r = parse_response(body.to_string().as_bytes(), 1).expect("parses");
    assert_eq!(r.choices[0].message.content, None);
    assert_eq!(
        r.choices[0].message.tool_calls[0].arguments,
        r#"{"a":[1,2]}"#
    );
    assert_eq!(r.choices[0].message.reasoning, Vec::<Reasoning>::new());
}

#[test]
fn stop_reasons_map() {
    assert_eq!(stop_reason("end_turn"), StopReason::Stop);
    assert_eq!(stop_reason("stop_sequence"), StopReason::Stop);
    assert_eq!(stop_reason("max_tokens"), StopReason::Length);
    assert_eq!(stop_reason("tool_use"), StopReason::ToolCalls);
    assert_eq!(stop_reason("refusal"), StopReason::ContentFilter);
    assert_eq!(
        stop_reason("pause_turn"),
        StopReason::Other("pause_turn".into())
    );
}

#[test]
fn usage_without_cache_fields() {
    assert_eq!(
        usage(&json!({"input_tokens": 10, "output_tokens": 3})),
        Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 3,
            ..Usage::default()
        })
    );
    assert_eq!(usage(&json!("nope")), None);
}

#[test]
fn not_a_message_is_an_error() {
    assert!(parse_response(b"not json", 1).is_err());
    assert!(parse_response(b"[]", 1).is_err());
    assert!(parse_response(br#"{"type":"message","id":"m"}"#, 1).is_err());
    let err = parse_response(OVERLOADED.as_bytes(), 1).expect_err("error body");
    assert!(err.contains("overloaded_error"), "{err}");
}

#[test]
fn error_fixtures() {
    assert_eq!(
        error_body(OVERLOADED),
        Some(("overloaded_error".into(), "Overloaded".into()))
    );
    assert_eq!(
        error_body(INVALID),
        Some((
            "invalid_request_error".into(),
            "max_tokens: Field required".into()
        ))
    );
    let (ty, msg) = error_body(RATE_LIMIT).expect("rate limit body");
    assert_eq!(ty, "rate_limit_error");
    assert!(msg.contains("50 requests per minute"), "{msg}");
    assert_eq!(error_body("<html>502 Bad Gateway</html>"), None);
    assert_eq!(error_body(r#"{"error":"plain string"}"#), None);
}
