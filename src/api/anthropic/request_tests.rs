//! The request mapping, rule by rule.

use serde_json::{json, Value};

use super::{encode_request, TranslateError};
use crate::api::{
    ChatRequest, Content, ContentPart, FunctionTool, JsonObject, Message, Reasoning, Role, Tool,
    ToolCall, ToolChoice,
};

fn obj(v: Value) -> JsonObject {
    match v {
        Value::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

fn text_part(text: &str) -> ContentPart {
    ContentPart::Text {
        text: text.into(),
        extra: JsonObject::new(),
    }
}

fn image(url: &str) -> ContentPart {
    ContentPart::Image {
        url: url.into(),
        detail: Some("high".into()),
        extra: JsonObject::new(),
    }
}

fn parts(role: Role, parts: Vec<ContentPart>) -> Message {
    Message {
        content: Some(Content::Parts(parts)),
        ..Message::text(role, "")
    }
}

fn call(id: &str, name: &str, args: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: args.into(),
        extra: JsonObject::new(),
    }
}

fn assistant_calls(content: Option<Content>, calls: Vec<ToolCall>) -> Message {
    Message {
        content,
        tool_calls: calls,
        ..Message::text(Role::Assistant, "")
    }
}

fn tool_result(id: &str, text: &str) -> Message {
    Message {
        tool_call_id: Some(id.into()),
        ..Message::text(Role::Tool, text)
    }
}

fn user(text: &str) -> Message {
    Message::text(Role::User, text)
}

fn req(messages: Vec<Message>) -> ChatRequest {
    ChatRequest::new("claude", messages)
}

fn encode(r: &ChatRequest) -> Value {
    Value::Object(encode_request(r, "claude-sonnet-4-5", false, 1024).expect("encodes"))
}

fn weather_tool() -> Tool {
    Tool::Function(FunctionTool {
        name: "get_weather".into(),
        description: Some("Weather of a city".into()),
        parameters: Some(json!({"type": "object", "properties": {"city": {"type": "string"}}})),
        extra: obj(json!({"strict": true, "cache_control": {"type": "ephemeral"}})),
    })
}

#[test]
fn minimal_request_has_model_max_tokens_and_string_content() {
    let body = encode(&req(vec![user("Hello")]));
    assert_eq!(
        body,
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello"}],
        })
    );
}

#[test]
fn callers_max_tokens_wins_and_stream_only_when_true() {
    let mut r = req(vec![user("Hi")]);
    r.max_tokens = Some(77);
    let body = encode_request(&r, "m", true, 1024).expect("encodes");
    assert_eq!(body["max_tokens"], json!(77));
    assert_eq!(body["stream"], json!(true));
    assert!(!encode(&r)
        .as_object()
        .expect("object")
        .contains_key("stream"));
}

#[test]
fn plain_system_and_developer_messages_become_one_string() {
    let body = encode(&req(vec![
        Message::text(Role::System, "Be brief."),
        user("Hi"),
        Message::text(Role::Developer, "Answer in French."),
    ]));
    assert_eq!(body["system"], json!("Be brief.\n\nAnswer in French."));
    assert_eq!(body["messages"], json!([{"role": "user", "content": "Hi"}]));
}

#[test]
fn system_with_cache_control_becomes_text_blocks() {
    let cached = ContentPart::Text {
        text: "Long reference text".into(),
        extra: obj(json!({"cache_control": {"type": "ephemeral"}})),
    };
    let body = encode(&req(vec![
        Message::text(Role::System, "Be brief."),
        parts(Role::System, vec![cached]),
        user("Hi"),
    ]));
    assert_eq!(
        body["system"],
        json!([
            {"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Long reference text", "cache_control": {"type": "ephemeral"}},
        ])
    );
}

#[test]
fn empty_system_is_omitted_and_system_images_are_refused() {
    let body = encode(&req(vec![Message::text(Role::System, ""), user("Hi")]));
    assert!(body.get("system").is_none());
    let r = req(vec![
        parts(Role::System, vec![image("https://x/y.png")]),
        user("Hi"),
    ]);
    assert!(matches!(
        encode_request(&r, "m", false, 1),
        Err(TranslateError::Unsupported(_))
    ));
}

#[test]
fn user_parts_become_blocks_with_images_by_data_and_url() {
    let cached = ContentPart::Text {
        text: "Describe both.".into(),
        extra: obj(json!({"cache_control": {"type": "ephemeral"}})),
    };
    let body = encode(&req(vec![parts(
        Role::User,
        vec![
            cached,
            image("data:image/png;base64,iVBORw0KGgo="),
            image("https://example.com/cat.jpg"),
        ],
    )]));
    assert_eq!(
        body["messages"][0]["content"],
        json!([
            {"type": "text", "text": "Describe both.", "cache_control": {"type": "ephemeral"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ])
    );
}

#[test]
fn bad_image_urls_are_refused() {
    for url in [
        "ftp://x/y.png",
        "data:image/png,rawbytes",
        "data:;base64,AAAA",
        "data:image/png;base64",
    ] {
        let r = req(vec![parts(Role::User, vec![image(url)])]);
        assert!(
            matches!(
                encode_request(&r, "m", false, 1),
                Err(TranslateError::ImageUrl(_))
            ),
            "{url}"
        );
    }
}

#[test]
fn native_blocks_pass_and_openai_only_parts_are_refused() {
    let doc = obj(json!({
        "type": "document",
        "source": {"type": "url", "url": "https://example.com/a.pdf"},
        "citations": {"enabled": true},
    }));
    let body = encode(&req(vec![parts(
        Role::User,
        vec![ContentPart::Other(doc.clone()), text_part("Summarise")],
    )]));
    assert_eq!(body["messages"][0]["content"][0], Value::Object(doc));
    for ty in ["input_audio", "file"] {
        let part = ContentPart::Other(obj(json!({"type": ty, ty: {"data": "AAAA"}})));
        let r = req(vec![parts(Role::User, vec![part])]);
        match encode_request(&r, "m", false, 1) {
            Err(TranslateError::Unsupported(m)) => assert!(m.contains(ty), "{m}"),
            other => panic!("{ty}: {other:?}"),
        }
    }
}

#[test]
fn assistant_turn_orders_reasoning_text_tool_use() {
    let mut m = assistant_calls(
        Some(Content::Text("Let me look.".into())),
        vec![
            call("toolu_1", "get_weather", r#"{"city":"Paris"}"#),
            call("toolu_2", "now", ""),
        ],
    );
    m.reasoning = vec![
        Reasoning {
            text: "unsigned, cannot go back".into(),
            ..Reasoning::default()
        },
        Reasoning {
            text: "I should call the tool.".into(),
            signature: Some("sig-1".into()),
            redacted: None,
        },
        Reasoning {
            redacted: Some("opaque".into()),
            ..Reasoning::default()
        },
    ];
    let body = encode(&req(vec![user("Weather?"), m]));
    assert_eq!(
        body["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call the tool.", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
        ]})
    );
}

#[test]
fn assistant_without_content_sends_no_empty_text() {
    let body = encode(&req(vec![
        user("Weather?"),
        assistant_calls(None, vec![call("toolu_1", "get_weather", "{}")]),
        tool_result("toolu_1", "Sunny"),
    ]));
    assert_eq!(
        body["messages"][1]["content"],
        json!([{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}])
    );
    // A turn with nothing at all in it is left out.
    let body = encode(&req(vec![
        user("a"),
        assistant_calls(None, vec![]),
        user("b"),
    ]));
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "a"},
            {"type": "text", "text": "b"},
        ]}])
    );
}

#[test]
fn assistant_refusal_part_becomes_text() {
    let refusal = ContentPart::Other(obj(json!({"type": "refusal", "refusal": "I can't help."})));
    let body = encode(&req(vec![user("x"), parts(Role::Assistant, vec![refusal])]));
    assert_eq!(
        body["messages"][1]["content"],
        json!([{"type": "text", "text": "I can't help."}])
    );
}

#[test]
fn invalid_tool_arguments_are_refused() {
    for args in ["{not json", "[1, 2]"] {
        let r = req(vec![
            user("x"),
            assistant_calls(None, vec![call("toolu_9", "f", args)]),
        ]);
        match encode_request(&r, "m", false, 1) {
            Err(TranslateError::ToolArguments { call_id, .. }) => assert_eq!(call_id, "toolu_9"),
            other => panic!("{args}: {other:?}"),
        }
    }
}

#[test]
fn tool_results_and_following_user_merge_into_one_turn() {
    let body = encode(&req(vec![
        user("Weather and time?"),
        assistant_calls(
            None,
            vec![
                call("toolu_1", "get_weather", "{}"),
                call("toolu_2", "now", "{}"),
            ],
        ),
        tool_result("toolu_1", "Sunny"),
        Message {
            tool_call_id: Some("toolu_2".into()),
            ..parts(
                Role::Tool,
                vec![text_part("12:00"), image("https://x/clock.png")],
            )
        },
        user("Thanks, and tomorrow?"),
    ]));
    let messages = body["messages"].as_array().expect("array");
    assert_eq!(messages.len(), 3);
    assert_eq!(
        messages[2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
                {"type": "text", "text": "12:00"},
                {"type": "image", "source": {"type": "url", "url": "https://x/clock.png"}},
            ]},
            {"type": "text", "text": "Thanks, and tomorrow?"},
        ]})
    );
}

#[test]
fn consecutive_assistant_turns_merge() {
    let body = encode(&req(vec![
        user("Hi"),
        Message::text(Role::Assistant, "One."),
        Message::text(Role::Assistant, "Two."),
    ]));
    assert_eq!(
        body["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "text", "text": "One."},
            {"type": "text", "text": "Two."},
        ]})
    );
}

#[test]
fn tool_result_needs_its_call_id_and_other_roles_are_refused() {
    let r = req(vec![user("x"), Message::text(Role::Tool, "result")]);
    assert_eq!(
        encode_request(&r, "m", false, 1).err(),
        Some(TranslateError::MissingToolCallId)
    );
    let r = req(vec![Message::text(Role::Other("function".into()), "x")]);
    assert!(matches!(
        encode_request(&r, "m", false, 1),
        Err(TranslateError::Unsupported(_))
    ));
}

#[test]
fn tools_get_input_schema_and_lose_openai_only_keys() {
    let mut r = req(vec![user("x")]);
    let web_search =
        obj(json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 3}));
    r.tools = vec![
        weather_tool(),
        Tool::Function(FunctionTool {
            name: "now".into(),
            description: None,
            parameters: None,
            extra: JsonObject::new(),
        }),
        Tool::Other(web_search.clone()),
    ];
    let body = encode(&r);
    assert_eq!(
        body["tools"],
        json!([
            {
                "name": "get_weather",
                "description": "Weather of a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "cache_control": {"type": "ephemeral"},
            },
            {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            Value::Object(web_search),
        ])
    );
    assert!(body.get("tool_choice").is_none());
}

#[test]
fn tool_choice_maps_each_form() {
    let cases = [
        (ToolChoice::Auto, json!({"type": "auto"})),
        (ToolChoice::Required, json!({"type": "any"})),
        (
            ToolChoice::Function("get_weather".into()),
            json!({"type": "tool", "name": "get_weather"}),
        ),
        (ToolChoice::None, json!({"type": "none"})),
        (
            ToolChoice::Other(json!({"type": "any", "x": 1})),
            json!({"type": "any", "x": 1}),
        ),
    ];
    for (choice, want) in cases {
        let mut r = req(vec![user("x")]);
        r.tools = vec![weather_tool()];
        r.tool_choice = Some(choice);
        assert_eq!(encode(&r)["tool_choice"], want);
    }
    let mut r = req(vec![user("x")]);
    r.tools = vec![weather_tool()];
    r.tool_choice = Some(ToolChoice::Other(json!("validated")));
    assert!(matches!(
        encode_request(&r, "m", false, 1),
        Err(TranslateError::Unsupported(_))
    ));
}

#[test]
fn parallel_tool_calls_false_disables_parallel_tool_use() {
    let serial = |choice: Option<ToolChoice>| {
        let mut r = req(vec![user("x")]);
        r.tools = vec![weather_tool()];
        r.tool_choice = choice;
        r.extra.insert("parallel_tool_calls".into(), json!(false));
        encode(&r)["tool_choice"].clone()
    };
    assert_eq!(
        serial(None),
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        serial(Some(ToolChoice::Required)),
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        serial(Some(ToolChoice::Function("f".into()))),
        json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})
    );
    assert_eq!(serial(Some(ToolChoice::None)), json!({"type": "none"}));
    // Without tools there is nothing to choose.
    let mut r = req(vec![user("x")]);
    r.tool_choice = Some(ToolChoice::Auto);
    r.extra.insert("parallel_tool_calls".into(), json!(false));
    assert!(encode(&r).get("tool_choice").is_none());
}

#[test]
fn sampling_fields_map_and_temperature_is_clamped() {
    let mut r = req(vec![user("x")]);
    r.temperature = Some(1.7);
    r.top_p = Some(0.9);
    r.stop = vec!["END".into(), "\n\nHuman:".into()];
    let body = encode(&r);
    assert_eq!(body["temperature"], json!(1.0));
    assert_eq!(body["top_p"], json!(0.9));
    assert_eq!(body["stop_sequences"], json!(["END", "\n\nHuman:"]));
    r.temperature = Some(0.3);
    r.stop.clear();
    let body = encode(&r);
    assert_eq!(body["temperature"], json!(0.3));
    assert!(body.get("stop_sequences").is_none());
}

#[test]
fn only_known_extra_keys_pass() {
    let mut r = req(vec![user("x")]);
    r.extra = obj(json!({
        "top_k": 40,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "container": "container_011CQ",
        "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "ex"}],
        "service_tier": "auto",
        "seed": 7,
        "response_format": {"type": "json_object"},
        "logit_bias": {"50256": -100},
        "logprobs": true,
        "stream_options": {"include_usage": true},
        "n": 1,
        "user": "user-42",
    }));
    let body = encode(&r);
    let keys: Vec<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "container",
            "max_tokens",
            "mcp_servers",
            "messages",
            "metadata",
            "model",
            "service_tier",
            "thinking",
            "top_k",
        ]
    );
    assert_eq!(
        body["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert_eq!(body["top_k"], json!(40));
    assert_eq!(body["metadata"], json!({"user_id": "user-42"}));
}

#[test]
fn metadata_keeps_user_id_and_openai_service_tiers_are_dropped() {
    let mut r = req(vec![user("x")]);
    r.extra = obj(json!({
        "metadata": {"user_id": "u-1", "session": "openai-style"},
        "user": "ignored",
        "service_tier": "flex",
    }));
    let body = encode(&r);
    assert_eq!(body["metadata"], json!({"user_id": "u-1"}));
    assert!(body.get("service_tier").is_none());
    // OpenAI-style metadata without a user id says nothing Anthropic takes.
    r.extra = obj(json!({"metadata": {"session": "s"}}));
    assert!(encode(&r).get("metadata").is_none());
}

#[test]
fn more_than_one_choice_is_refused() {
    let mut r = req(vec![user("x")]);
    r.extra.insert("n".into(), json!(2));
    assert!(matches!(
        encode_request(&r, "m", false, 1),
        Err(TranslateError::Unsupported(_))
    ));
}
