use serde_json::{json, Value};

use crate::api::openai_chat::{
    encode_request, parse_request, request_from_object, request_to_object,
};
use crate::api::{
    ChatRequest, Content, ContentPart, JsonObject, MaxTokensField, Role, Tool, ToolChoice,
};
use crate::error::{Reason, Rejection};

fn err(body: &str) -> Rejection {
    parse_request(body.as_bytes()).unwrap_err()
}

fn param(body: Value) -> Option<String> {
    parse_request(body.to_string().as_bytes())
        .unwrap_err()
        .param
}

fn obj(v: Value) -> JsonObject {
    match v {
        Value::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

fn parse(v: &Value) -> ChatRequest {
    request_from_object(obj(v.clone())).unwrap()
}

/// The body of tests/chat.rs `unknown_fields_pass_through`.
fn sample() -> Value {
    json!({"model":"fast","messages":[{"role":"system","content":"sys"},{"role":"user","name":"bob","content":[{"type":"text","text":"part one"}]},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"hello x"}],"seed":42,"tools":[{"type":"function","function":{"name":"get_weather","description":"w","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}],"tool_choice":"auto","response_format":{"type":"json_object"},"logit_bias":{"50256":-100},"max_tokens":33,"temperature":0.5,"top_p":0.25,"stop":["END"],"user":"end-user-1","x_vendor_extension":{"nested":[1,2,{"deep":true}]}})
}

/// Asserts that `body` comes back as sent from a non-streamed encode, and with only
/// `stream`/`stream_options` changed from a streamed one.
fn assert_round_trip(body: &Value) {
    let req = parse(body);
    let model = body["model"].as_str().unwrap();
    let mut want = body.clone();
    want["stream"] = json!(false);
    want.as_object_mut().unwrap().remove("stream_options");
    assert_eq!(Value::Object(request_to_object(&req, model, false)), want);
    want["stream"] = json!(true);
    let mut opts = body
        .get("stream_options")
        .cloned()
        .unwrap_or_else(|| json!({}));
    opts["include_usage"] = json!(true);
    want["stream_options"] = opts;
    assert_eq!(Value::Object(request_to_object(&req, model, true)), want);
    let bytes: Value = serde_json::from_slice(&encode_request(&req, model, true)).unwrap();
    assert_eq!(bytes, want, "encode_request and request_to_object differ");
}

#[test]
fn names_the_bad_field() {
    assert_eq!(err("{").reason, Reason::InvalidRequest);
    assert_eq!(
        err(r#"{"messages":[{"role":"user"}]}"#).param.as_deref(),
        Some("model")
    );
    assert_eq!(
        err(r#"{"model":"m","messages":[]}"#).param.as_deref(),
        Some("messages")
    );
    assert_eq!(
        err(r#"{"model":"m","messages":[{"content":"x"}]}"#)
            .param
            .as_deref(),
        Some("messages[0].role")
    );
    assert_eq!(
        err(r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":"x"}"#)
            .param
            .as_deref(),
        Some("max_tokens")
    );
}

#[test]
fn keeps_unknown_fields() {
    let r = parse_request(
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":7,"stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .unwrap();
    assert!(r.stream && r.include_usage);
    assert_eq!(r.extra["seed"], 7);
    assert_eq!(r.extra["stream_options"], json!({"include_usage": true}));
}

#[test]
fn keeps_the_old_messages() {
    let e = err("[1]");
    assert_eq!(
        (e.message.as_str(), e.param),
        ("the body must be a JSON object", None)
    );
    assert!(err("{").message.starts_with("the body is not valid JSON: "));
    let cases: &[(Value, &str, &str)] = &[
        (
            json!({"messages": [{"role": "user"}]}),
            "model",
            "`model` is required",
        ),
        (
            json!({"model": " ", "messages": [{"role": "user"}]}),
            "model",
            "`model` is required",
        ),
        (
            json!({"model": 1, "messages": [{"role": "user"}]}),
            "model",
            "`model` must be a string",
        ),
        (json!({"model": "m"}), "messages", "`messages` is required"),
        (
            json!({"model": "m", "messages": {}}),
            "messages",
            "`messages` must be an array",
        ),
        (
            json!({"model": "m", "messages": []}),
            "messages",
            "`messages` must not be empty",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}, 3]}),
            "messages[1]",
            "`messages[1]` must be an object",
        ),
        (
            json!({"model": "m", "messages": [{"role": ""}]}),
            "messages[0].role",
            "`messages[0].role` must be a non-empty string",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}),
            "stream",
            "`stream` must be a boolean",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}], "max_tokens": -1}),
            "max_tokens",
            "`max_tokens` must be a non-negative integer",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": 1.5}),
            "max_completion_tokens",
            "`max_completion_tokens` must be a non-negative integer",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}], "temperature": "hot"}),
            "temperature",
            "`temperature` must be a number",
        ),
    ];
    for (body, p, message) in cases {
        let e = parse_request(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidRequest, "{body}");
        assert_eq!(
            (e.param.as_deref(), e.message.as_str()),
            (Some(*p), *message),
            "{body}"
        );
    }
}

#[test]
fn old_checks_come_before_the_typed_ones() {
    // A bad content in messages[0] and a bad role in messages[1]: the old check answers.
    assert_eq!(
        param(json!({"model": "m", "messages": [{"role": "user", "content": 1}, {}]})).as_deref(),
        Some("messages[1].role")
    );
    assert_eq!(
        param(
            json!({"model": "m", "messages": [{"role": "user", "content": 1}], "temperature": "x"})
        )
        .as_deref(),
        Some("temperature")
    );
}

#[test]
fn checks_the_typed_fields() {
    let m = |extra: Value| {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in obj(extra) {
            b[k] = v;
        }
        param(b)
    };
    let msg =
        |message: Value| param(json!({"model": "m", "messages": [{"role": "user"}, message]}));
    let call = |c: Value| msg(json!({"role": "assistant", "tool_calls": [c]}));
    assert_eq!(
        msg(json!({"role": "user", "content": 5})).as_deref(),
        Some("messages[1].content")
    );
    assert_eq!(
        msg(json!({"role": "user", "content": {}})).as_deref(),
        Some("messages[1].content")
    );
    assert_eq!(
        msg(json!({"role": "user", "content": [{"type": "text", "text": "a"}, "b"]})).as_deref(),
        Some("messages[1].content[1]")
    );
    assert_eq!(
        msg(json!({"role": "user", "content": [{"text": "a"}]})).as_deref(),
        Some("messages[1].content[0]")
    );
    assert_eq!(
        msg(json!({"role": "user", "content": [{"type": 1}]})).as_deref(),
        Some("messages[1].content[0]")
    );
    assert_eq!(
        msg(json!({"role": "assistant", "tool_calls": {}})).as_deref(),
        Some("messages[1].tool_calls")
    );
    let good = json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}});
    let good = json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [good]}]});
    assert!(request_from_object(obj(good)).is_ok());
    for bad in [
        json!("c"),
        json!({"type": "function", "function": {"name": "f", "arguments": "{}"}}),
        json!({"id": 1, "type": "function", "function": {"name": "f", "arguments": "{}"}}),
        json!({"id": "c", "type": "function"}),
        json!({"id": "c", "function": {"arguments": "{}"}}),
        json!({"id": "c", "function": {"name": "f"}}),
        json!({"id": "c", "function": {"name": "f", "arguments": {"city": "Oslo"}}}),
    ] {
        assert_eq!(
            call(bad.clone()).as_deref(),
            Some("messages[1].tool_calls[0]"),
            "{bad}"
        );
    }
    let e = parse_request(
        json!({"model": "m", "messages": [{"role": "user", "content": 5}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap_err();
    assert_eq!(e.reason, Reason::InvalidRequest);
    assert!(
        e.message.starts_with("`messages[0].content` must be"),
        "{}",
        e.message
    );
    assert_eq!(m(json!({"tools": {}})).as_deref(), Some("tools"));
    assert_eq!(
        m(json!({"tools": [{"type": "function", "function": {"name": "f"}}, 1]})).as_deref(),
        Some("tools[1]")
    );
    assert_eq!(m(json!({"top_p": "x"})).as_deref(), Some("top_p"));
    assert_eq!(m(json!({"stop": 1})).as_deref(), Some("stop"));
    assert_eq!(m(json!({"stop": ["a", 1]})).as_deref(), Some("stop"));
    assert_eq!(m(json!({"tool_choice": 1})).as_deref(), Some("tool_choice"));
    assert_eq!(
        m(json!({"tool_choice": ["auto"]})).as_deref(),
        Some("tool_choice")
    );
}

#[test]
fn accepts_what_openai_accepts() {
    let ok = |b: Value| {
        let r = request_from_object(obj(b.clone()));
        assert!(r.is_ok(), "{b}: {:?}", r.err());
    };
    ok(
        json!({"model": "m", "messages": [{"role": "user", "content": null}], "tools": null,
        "top_p": null, "stop": null, "tool_choice": null, "temperature": null, "max_tokens": null,
        "stream": null}),
    );
    ok(
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio",
        "input_audio": {"data": "AAAA", "format": "wav"}}, {"type": "file", "file": {"file_id": "f"}}]}]}),
    );
    ok(
        json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": null}, {"role": "assistant", "tool_calls": []}]}),
    );
    ok(
        json!({"model": "m", "messages": [{"role": "user", "content": []}], "stop": "x", "tools": [], "tool_choice": {"type": "allowed_tools"}}),
    );
}

#[test]
fn reads_the_typed_fields() {
    let r = parse(&sample());
    assert_eq!(r.model, "fast");
    assert!(!r.stream && !r.include_usage);
    let roles: Vec<_> = r.messages.iter().map(|m| m.role.clone()).collect();
    assert_eq!(
        roles,
        [Role::System, Role::User, Role::Assistant, Role::Tool]
    );
    assert_eq!(r.messages[0].content, Some(Content::Text("sys".into())));
    assert_eq!(r.messages[1].name.as_deref(), Some("bob"));
    assert_eq!(
        r.messages[1].content,
        Some(Content::Parts(vec![ContentPart::Text {
            text: "part one".into(),
            extra: JsonObject::new()
        }]))
    );
    let a = &r.messages[2];
    assert_eq!(a.content, None);
    assert_eq!(
        (
            a.tool_calls[0].id.as_str(),
            a.tool_calls[0].name.as_str(),
            a.tool_calls[0].arguments.as_str()
        ),
        ("call_1", "get_weather", r#"{"city":"Oslo"}"#)
    );
    assert!(a.tool_calls[0].extra.is_empty() && a.extra.is_empty());
    assert_eq!(r.messages[3].tool_call_id.as_deref(), Some("call_1"));
    let Tool::Function(f) = &r.tools[0] else {
        panic!("{:?}", r.tools)
    };
    assert_eq!(
        (f.name.as_str(), f.description.as_deref()),
        ("get_weather", Some("w"))
    );
    assert_eq!(f.parameters.as_ref().unwrap()["required"], json!(["city"]));
    assert_eq!(r.tool_choice, Some(ToolChoice::Auto));
    assert_eq!(
        (r.max_tokens, r.max_tokens_field),
        (Some(33), MaxTokensField::MaxTokens)
    );
    assert_eq!((r.temperature, r.top_p), (Some(0.5), Some(0.25)));
    assert_eq!(r.stop, ["END"]);
    let mut keys: Vec<_> = r.extra.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "logit_bias",
            "response_format",
            "seed",
            "user",
            "x_vendor_extension"
        ]
    );
}

#[test]
fn round_trips_the_sample() {
    assert_round_trip(&sample());
}

#[test]
fn round_trips_variants() {
    let mut b = sample();
    b["messages"] = json!([
        {"role": "developer", "content": "be brief", "x_msg": {"a": 1}},
        {"role": "user", "content": [
            {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
            {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}, "x_part": true},
            {"type": "image_url", "image_url": {"url": "https://x/dog.png", "x_inner": 1}},
            {"type": "image_url", "image_url": "https://x/bare.png"},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        ]},
        {"role": "assistant", "content": "thinking done", "reasoning_content": "let me see",
         "refusal": null, "tool_calls": [
            {"id": "c1", "type": "function", "index": 0, "function": {"name": "f", "arguments": "{}", "x_fn": 2}},
            {"id": "c2", "type": "custom", "function": {"name": "g", "arguments": ""}, "custom": {"input": "x"}}
         ]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}], "x_tool": null},
        {"role": "assistant", "content": null, "tool_calls": []},
        {"role": "user", "name": null, "content": []},
        {"role": "critic", "content": "hm"}
    ]);
    b["tools"] = json!([
        {"type": "function", "function": {"name": "f", "description": "d", "strict": true,
            "parameters": {"type": "object", "additionalProperties": false}}},
        {"type": "function", "function": {"name": "g"}},
        {"type": "function", "function": {"name": "h", "parameters": null, "description": null}},
        {"type": "function", "function": {"name": "k"}, "x_tool_level": 1},
        {"type": "custom", "custom": {"name": "c"}},
        {"type": "web_search"}
    ]);
    assert_round_trip(&b);
    let r = parse(&b);
    assert_eq!(r.messages[0].role, Role::Developer);
    assert_eq!(r.messages[0].extra["x_msg"], json!({"a": 1}));
    let Some(Content::Parts(parts)) = &r.messages[1].content else {
        panic!()
    };
    assert!(
        matches!(&parts[0], ContentPart::Text { extra, .. } if extra.contains_key("cache_control"))
    );
    assert_eq!(
        parts[1],
        ContentPart::Image {
            url: "https://x/cat.png".into(),
            detail: Some("low".into()),
            extra: JsonObject::new()
        }
    );
    assert!(
        matches!(&parts[2], ContentPart::Image { detail: None, extra, .. } if extra["x_part"] == true)
    );
    assert!(matches!(&parts[3], ContentPart::Other(_)));
    assert!(matches!(&parts[4], ContentPart::Other(_)));
    assert!(matches!(&parts[5], ContentPart::Other(_)));
    let a = &r.messages[2];
    assert_eq!(a.reasoning.len(), 1);
    assert_eq!(a.reasoning[0].text, "let me see");
    assert_eq!(a.extra["refusal"], Value::Null);
    assert_eq!(a.tool_calls[0].extra["index"], 0);
    assert_eq!(a.tool_calls[0].extra["function"], json!({"x_fn": 2}));
    assert_eq!(a.tool_calls[1].extra["type"], "custom");
    assert_eq!(r.messages[6].role, Role::Other("critic".into()));
    let Tool::Function(f) = &r.tools[0] else {
        panic!()
    };
    assert_eq!(f.extra["strict"], true);
    assert!(
        matches!(&r.tools[1], Tool::Function(g) if g.parameters.is_none() && g.description.is_none())
    );
    assert!(matches!(&r.tools[3], Tool::Other(_)));
    assert!(matches!(&r.tools[4], Tool::Other(_)));
}

#[test]
fn round_trips_caps_and_choices() {
    let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in obj(extra) {
            b[k] = v;
        }
        b
    };
    let b = with(json!({"max_completion_tokens": 7}));
    assert_round_trip(&b);
    let r = parse(&b);
    assert_eq!(
        (r.max_tokens, r.max_tokens_field),
        (Some(7), MaxTokensField::MaxCompletionTokens)
    );

    let b = with(json!({"max_completion_tokens": 7, "max_tokens": 9}));
    assert_round_trip(&b);
    let r = parse(&b);
    assert_eq!(
        (r.max_tokens, r.max_tokens_field),
        (Some(7), MaxTokensField::MaxCompletionTokens)
    );
    assert_eq!(r.extra["max_tokens"], 9);

    let b = with(json!({"max_completion_tokens": null, "max_tokens": 9}));
    assert_round_trip(&b);
    assert_eq!(parse(&b).max_tokens, Some(9));

    let b = with(json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}));
    assert_round_trip(&b);
    assert_eq!(
        parse(&b).tool_choice,
        Some(ToolChoice::Function("f".into()))
    );
    for other in [
        json!("any"),
        json!({"type": "function", "function": {"name": "f"}, "x": 1}),
        json!({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
    ] {
        let b = with(json!({ "tool_choice": other.clone() }));
        assert_round_trip(&b);
        assert_eq!(parse(&b).tool_choice, Some(ToolChoice::Other(other)));
    }
    for (choice, want) in [
        ("none", ToolChoice::None),
        ("required", ToolChoice::Required),
    ] {
        let b = with(json!({ "tool_choice": choice }));
        assert_round_trip(&b);
        assert_eq!(parse(&b).tool_choice, Some(want));
    }
    // Nulls and empty lists of typed fields, integral floats, stream options with more keys.
    assert_round_trip(&with(
        json!({"temperature": null, "top_p": null, "stop": null,
        "tools": null, "tool_choice": null, "max_tokens": null, "stream": true}),
    ));
    assert_round_trip(&with(
        json!({"stop": [], "tools": [], "temperature": 1, "top_p": 0}),
    ));
    assert_round_trip(&with(
        json!({"stream": true, "stream_options": {"include_usage": false, "x_opt": 1}}),
    ));
    assert_round_trip(&with(
        json!({"seed": 1, "n": 2, "logprobs": true, "top_logprobs": 3,
        "parallel_tool_calls": false, "service_tier": "flex", "metadata": {"k": "v"}}),
    ));
}

#[test]
fn encodes_what_is_not_a_round_trip() {
    let b = json!({"model": "alias", "messages": [
        {"role": "user", "content": null}, {"role": "assistant"}, {"role": "tool", "tool_call_id": "c"}
    ], "stop": "END", "stream": true, "stream_options": "odd"});
    let r = parse(&b);
    assert_eq!(r.stop, ["END"]);
    assert!(r.stream && !r.include_usage);
    let out = Value::Object(request_to_object(&r, "gpt-4o", true));
    assert_eq!(
        out,
        json!({"model": "gpt-4o", "messages": [
            {"role": "user"}, {"role": "assistant", "content": null}, {"role": "tool", "tool_call_id": "c"}
        ], "stop": ["END"], "stream": true, "stream_options": {"include_usage": true}})
    );
}

#[test]
fn a_typed_field_set_later_wins_over_extra() {
    let b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "temperature": null, "tools": [], "max_tokens": 5, "max_completion_tokens": 6});
    let mut r = parse(&b);
    r.temperature = Some(0.2);
    r.tools = vec![Tool::Other(obj(json!({"type": "web_search"})))];
    r.max_tokens_field = MaxTokensField::MaxTokens;
    r.max_tokens = Some(4);
    r.messages[0].reasoning.push(crate::api::Reasoning {
        text: "a".into(),
        ..Default::default()
    });
    r.messages[0].reasoning.push(crate::api::Reasoning {
        text: "b".into(),
        ..Default::default()
    });
    let bytes = encode_request(&r, "m", false);
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.matches("\"temperature\"").count(), 1, "{text}");
    assert_eq!(text.matches("\"max_tokens\"").count(), 1, "{text}");
    let out: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(out["temperature"], 0.2);
    assert_eq!(out["tools"], json!([{"type": "web_search"}]));
    assert_eq!(out["max_tokens"], 4);
    assert!(out.get("max_completion_tokens").is_none());
    assert_eq!(out["messages"][0]["reasoning_content"], "ab");
}

#[test]
fn a_request_built_in_code_encodes() {
    let mut r = ChatRequest::new("m", vec![crate::api::Message::text(Role::User, "hi")]);
    r.max_tokens = Some(3);
    r.max_tokens_field = MaxTokensField::MaxCompletionTokens;
    r.tool_choice = Some(ToolChoice::Function("f".into()));
    assert_eq!(
        Value::Object(request_to_object(&r, "up", false)),
        json!({"model": "up", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 3, "stream": false,
            "tool_choice": {"type": "function", "function": {"name": "f"}}})
    );
}
