//! The stream decoder, on the recorded fixtures and on single events.

use serde_json::{json, Value};

use super::{StreamDecoder, StreamError};
use crate::api::{ChatDelta, ChoiceDelta, JsonObject, StopReason, ToolCallDelta, Usage};

const TEXT: &str = include_str!("../../../tests/fixtures/anthropic/text.sse");
const TOOL_USE: &str = include_str!("../../../tests/fixtures/anthropic/tool_use.sse");
const THINKING: &str = include_str!("../../../tests/fixtures/anthropic/thinking.sse");
const STREAM_ERROR: &str = include_str!("../../../tests/fixtures/anthropic/stream_error.sse");

const CREATED: u64 = 1_700_000_000;

/// The `data` payloads of an SSE text, checking each `event:` name against the `type` inside.
fn sse_data(text: &str) -> Vec<String> {
    assert!(text.ends_with("\n\n"), "an SSE file ends with a blank line");
    text.split("\n\n")
        .filter(|chunk| !chunk.trim().is_empty())
        .map(|chunk| {
            let mut event = None;
            let mut data = Vec::new();
            for line in chunk.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e);
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            let data = data.join("\n");
            let v: Value = serde_json::from_str(&data).expect("data is JSON");
            assert_eq!(event, v["type"].as_str(), "event name matches the type");
            data
        })
        .collect()
}

/// Every event's result, in order.
fn decode_all(text: &str) -> (StreamDecoder, Vec<Result<Option<ChatDelta>, StreamError>>) {
    let mut dec = StreamDecoder::new(CREATED);
    let out = sse_data(text).iter().map(|d| dec.event(d)).collect();
    (dec, out)
}

/// The deltas of a stream that must decode without error.
fn deltas(text: &str) -> (StreamDecoder, Vec<ChatDelta>) {
    let (dec, results) = decode_all(text);
    let deltas = results
        .into_iter()
        .filter_map(|r| r.expect("no stream error"))
        .collect();
    (dec, deltas)
}

fn delta(id: &str, choice: ChoiceDelta) -> ChatDelta {
    ChatDelta {
        id: id.into(),
        created: CREATED,
        model: "claude-sonnet-4-5-20250929".into(),
        choices: vec![choice],
        usage: None,
        extra: JsonObject::new(),
    }
}

fn role() -> ChoiceDelta {
    ChoiceDelta {
        role: Some("assistant".into()),
        ..ChoiceDelta::default()
    }
}

fn content(s: &str) -> ChoiceDelta {
    ChoiceDelta {
        content: Some(s.into()),
        ..ChoiceDelta::default()
    }
}

fn finish(reason: StopReason) -> ChoiceDelta {
    ChoiceDelta {
        finish_reason: Some(reason),
        ..ChoiceDelta::default()
    }
}

fn joined(ds: &[ChatDelta], f: impl Fn(&ChoiceDelta) -> Option<&str>) -> String {
    ds.iter().filter_map(|d| f(&d.choices[0])).collect()
}

#[test]
fn text_stream_exact_sequence() {
    let (dec, results) = decode_all(TEXT);
    let id = "msg_01XFDUDYJgAACzvnptvVoYEL";
    let mut last = delta(id, finish(StopReason::Stop));
    last.usage = Some(Usage {
        prompt_tokens: 25 + 1800,
        completion_tokens: 15,
        cached_prompt_tokens: 1800,
        cache_creation_tokens: 0,
    });
    let want = vec![
        Some(delta(id, role())),           // message_start
        None,                              // content_block_start, empty text
        None,                              // ping
        Some(delta(id, content("Hello"))), // text_delta
        Some(delta(id, content("!"))),     // text_delta
        Some(delta(id, content(" How can I help you today?"))),
        None,       // content_block_stop
        Some(last), // message_delta
        None,       // message_stop
    ];
    let got: Vec<Option<ChatDelta>> = results.into_iter().map(|r| r.expect("ok")).collect();
    assert_eq!(got, want);
    assert!(dec.is_finished());
}

#[test]
fn tool_use_stream_reassembles_text_and_arguments() {
    let (dec, ds) = deltas(TOOL_USE);
    assert!(dec.is_finished());
    let id = "msg_019Q1hrJbZG26Fb9BQhrkHEr";
    assert!(ds
        .iter()
        .all(|d| d.id == id && d.created == CREATED && d.choices.len() == 1));
    assert_eq!(ds[0].choices[0].role.as_deref(), Some("assistant"));
    assert_eq!(
        joined(&ds, |c| c.content.as_deref()),
        "I'll check the weather and the local time in Paris for you."
    );
    // The tool uses are Anthropic blocks 1 and 2, and calls 0 and 1.
    let pieces: Vec<&ToolCallDelta> = ds.iter().flat_map(|d| &d.choices[0].tool_calls).collect();
    assert!(
        pieces
            .iter()
            .all(|p| !p.arguments.is_empty() || p.id.is_some()),
        "no empty pieces"
    );
    let starts: Vec<(u32, &str, &str)> = pieces
        .iter()
        .filter_map(|p| Some((p.index, p.id.as_deref()?, p.name.as_deref()?)))
        .collect();
    assert_eq!(
        starts,
        [
            (0, "toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather"),
            (1, "toolu_01Bq7CUAjH4d3rDp8Gh7RwTz", "get_time"),
        ]
    );
    let args = |k: u32| -> Value {
        let text: String = pieces
            .iter()
            .filter(|p| p.index == k)
            .map(|p| p.arguments.as_str())
            .collect();
        serde_json::from_str(&text).expect("arguments reassemble into JSON")
    };
    assert_eq!(
        args(0),
        json!({"location": "Paris, France", "unit": "celsius"})
    );
    assert_eq!(args(1), json!({"timezone": "Europe/Paris"}));
    // Six non-empty pieces for the first call, two for the second, plus the two starts.
    assert_eq!(pieces.len(), 10);
    let last = ds.last().expect("a last delta");
    assert_eq!(last.finish_reason(), Some(&StopReason::ToolCalls));
    assert_eq!(
        last.usage,
        Some(Usage {
            prompt_tokens: 472,
            completion_tokens: 89,
            ..Usage::default()
        })
    );
    assert!(ds[..ds.len() - 1].iter().all(|d| d.usage.is_none()));
}

#[test]
fn thinking_stream_gives_reasoning_signature_then_text() {
    let (dec, ds) = deltas(THINKING);
    assert!(dec.is_finished());
    let kinds: Vec<&str> = ds
        .iter()
        .map(|d| {
            let c = &d.choices[0];
            match () {
                _ if c.role.is_some() => "role",
                _ if c.reasoning.is_some() => "reasoning",
                _ if c.reasoning_signature.is_some() => "signature",
                _ if c.content.is_some() => "content",
                _ if c.finish_reason.is_some() => "finish",
                _ => "other",
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "role",
            "reasoning",
            "reasoning",
            "reasoning",
            "reasoning",
            "reasoning",
            "reasoning",
            "signature",
            "content",
            "finish",
        ]
    );
    let reasoning = joined(&ds, |c| c.reasoning.as_deref());
    assert!(
        reasoning.starts_with("Let me solve this step by step:\n\n1. First break down 27 * 453")
    );
    assert!(reasoning.ends_with("\n6. 10,800 + 1,350 + 81 = 12,231"));
    assert_eq!(
        joined(&ds, |c| c.reasoning_signature.as_deref()),
        "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
    );
    assert_eq!(joined(&ds, |c| c.content.as_deref()), "27 * 453 = 12,231");
    let last = ds.last().expect("a last delta");
    assert_eq!(last.finish_reason(), Some(&StopReason::Stop));
    assert_eq!(
        last.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((49, 260))
    );
}

#[test]
fn error_event_mid_stream_is_an_upstream_error() {
    let (dec, results) = decode_all(STREAM_ERROR);
    let (last, before) = results.split_last().expect("events");
    assert_eq!(
        last,
        &Err(StreamError::Upstream {
            error_type: "overloaded_error".into(),
            message: "Overloaded".into(),
        })
    );
    let ds: Vec<ChatDelta> = before
        .iter()
        .filter_map(|r| r.clone().expect("ok before the error"))
        .collect();
    assert_eq!(
        joined(&ds, |c| c.content.as_deref()),
        "Once upon a time, in a quiet village"
    );
    assert!(!dec.is_finished());
}

/// Feeds events to a fresh decoder that has seen a `message_start`.
fn started() -> StreamDecoder {
    let mut dec = StreamDecoder::new(CREATED);
    let start = json!({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2, "output_tokens": 1},
    }});
    let d = dec.event(&start.to_string()).expect("ok").expect("delta");
    assert_eq!(
        (d.id.as_str(), d.model.as_str(), d.created),
        ("msg_1", "claude-x", CREATED)
    );
    dec
}

fn one(dec: &mut StreamDecoder, v: Value) -> Option<ChoiceDelta> {
    dec.event(&v.to_string())
        .expect("ok")
        .map(|d| d.choices.into_iter().next().expect("one choice"))
}

#[test]
fn text_block_start_with_text_is_content() {
    let mut dec = started();
    let c = one(
        &mut dec,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "Hi"}}),
    );
    assert_eq!(c.and_then(|c| c.content).as_deref(), Some("Hi"));
}

#[test]
fn empty_pieces_are_not_deltas() {
    let mut dec = started();
    let start = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}});
    assert_eq!(one(&mut dec, start), None);
    for d in [
        json!({"type": "thinking_delta", "thinking": ""}),
        json!({"type": "signature_delta", "signature": ""}),
        json!({"type": "text_delta", "text": ""}),
        json!({"type": "some_future_delta", "x": 1}),
    ] {
        assert_eq!(
            one(
                &mut dec,
                json!({"type": "content_block_delta", "index": 0, "delta": d})
            ),
            None
        );
    }
    assert_eq!(
        one(&mut dec, json!({"type": "content_block_stop", "index": 0})),
        None
    );
    assert_eq!(one(&mut dec, json!({"type": "some_future_event"})), None);
}

#[test]
fn citations_delta_goes_to_delta_extra() {
    let mut dec = started();
    one(
        &mut dec,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "citations": []}}),
    );
    let citation = json!({"type": "char_location", "cited_text": "grass is green", "document_index": 0, "start_char_index": 0, "end_char_index": 20});
    let c = one(&mut dec, json!({"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": citation}}))
        .expect("delta");
    assert_eq!(c.delta_extra["citations"], json!([citation]));
    assert_eq!(c.content, None);
}

#[test]
fn redacted_thinking_and_server_blocks_are_not_lost() {
    let mut dec = started();
    let c = one(&mut dec, json!({"type": "content_block_start", "index": 0, "content_block": {"type": "redacted_thinking", "data": "opaque"}}))
        .expect("delta");
    assert_eq!(c.delta_extra["redacted_thinking"], "opaque");
    let block =
        json!({"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}});
    let c = one(
        &mut dec,
        json!({"type": "content_block_start", "index": 1, "content_block": block}),
    )
    .expect("delta");
    assert_eq!(
        c.delta_extra["content_block_start"],
        json!({"index": 1, "content_block": block})
    );
    // Its input is the server's, not a client tool call.
    let d = json!({"type": "input_json_delta", "partial_json": "{\"query\": \"rust\"}"});
    let c = one(
        &mut dec,
        json!({"type": "content_block_delta", "index": 1, "delta": d}),
    )
    .expect("delta");
    assert!(c.tool_calls.is_empty());
    assert_eq!(
        c.delta_extra["content_block_delta"],
        json!({"index": 1, "delta": d})
    );
    // A client tool use after them is still call 0.
    let c = one(&mut dec, json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}))
        .expect("delta");
    assert_eq!(c.tool_calls[0].index, 0);
    assert_eq!(c.tool_calls[0].arguments, "");
}

#[test]
fn message_delta_usage_replaces_start_figures_it_repeats() {
    let mut dec = started();
    let mut d = dec
        .event(&json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"output_tokens": 30}}).to_string())
        .expect("ok")
        .expect("delta");
    assert_eq!(d.finish_reason(), Some(&StopReason::Length));
    assert_eq!(
        d.usage,
        Some(Usage {
            prompt_tokens: 16,
            completion_tokens: 30,
            cached_prompt_tokens: 4,
            cache_creation_tokens: 2,
        })
    );
    assert!(d.extra.is_empty());
    let mut dec = started();
    d = dec
        .event(&json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}, "usage": {"input_tokens": 12, "cache_read_input_tokens": 0, "output_tokens": 3}}).to_string())
        .expect("ok")
        .expect("delta");
    assert_eq!(d.finish_reason(), Some(&StopReason::Stop));
    assert_eq!(d.extra["stop_sequence"], "END");
    assert_eq!(
        d.usage,
        Some(Usage {
            prompt_tokens: 14,
            completion_tokens: 3,
            cached_prompt_tokens: 0,
            cache_creation_tokens: 2,
        })
    );
}

#[test]
fn refusal_and_unknown_stop_reasons() {
    let mut dec = started();
    let c = one(
        &mut dec,
        json!({"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {"output_tokens": 1}}),
    );
    assert_eq!(
        c.and_then(|c| c.finish_reason),
        Some(StopReason::ContentFilter)
    );
    let mut dec = started();
    let c = one(
        &mut dec,
        json!({"type": "message_delta", "delta": {"stop_reason": "pause_turn"}, "usage": {"output_tokens": 1}}),
    );
    assert_eq!(
        c.and_then(|c| c.finish_reason),
        Some(StopReason::Other("pause_turn".into()))
    );
}

#[test]
fn malformed_events() {
    let mut dec = started();
    for bad in [
        "not json".to_string(),
        json!({"no": "type"}).to_string(),
        json!({"type": "content_block_start", "content_block": {"type": "text", "text": ""}}).to_string(),
        json!({"type": "content_block_delta", "index": 7, "delta": {"type": "input_json_delta", "partial_json": "{"}}).to_string(),
        json!({"type": "error"}).to_string(),
    ] {
        assert!(matches!(dec.event(&bad), Err(StreamError::Malformed(_))), "{bad}");
    }
    assert!(!dec.is_finished());
    assert_eq!(dec.event(r#"{"type":"message_stop"}"#), Ok(None));
    assert!(dec.is_finished());
}
