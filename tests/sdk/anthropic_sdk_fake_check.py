#!/usr/bin/env python3
"""Check the tests' fake Anthropic Messages API (tests/common/anthropic_upstream.rs) with the
official `anthropic` SDK: if the SDK parses everything the fake says, the fake speaks the wire.

    $TOLLGATE_PYTHON tests/sdk/anthropic_sdk_fake_check.py BASE_URL EXPECT_JSON

BASE_URL is the fake's root (http://127.0.0.1:PORT); EXPECT_JSON the fake's constants (texts,
usage, tool id and input, thinking), written by the Rust test so there is one source of truth.

Prints one line per check, then `anthropic sdk: N passed, M failed`.
Exit status: 0 all passed, 1 a check failed, 2 bad usage or no anthropic package.
"""

import json
import sys
import traceback

try:
    import anthropic
except ImportError:
    print("anthropic sdk: the `anthropic` package is not installed for " + sys.executable)
    sys.exit(2)

TIMEOUT_SECS = 30
MAX_TOKENS = 256
PROMPT = [{"role": "user", "content": "Say hello to the anthropic sdk check."}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def eq(got, want, what):
    check(got == want, f"{what}: got {got!r}, want {want!r}")


def client_for(base_url, api_key="sk-ant-good"):
    # No retries: a failure must show up as it is.
    return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0,
                               timeout=TIMEOUT_SECS)


def texts(message):
    return [b.text for b in message.content if b.type == "text"]


def check_usage(usage, want, where):
    eq(usage.input_tokens, want["input"], f"{where}: usage.input_tokens")
    eq(usage.output_tokens, want["output"], f"{where}: usage.output_tokens")
    eq(usage.cache_read_input_tokens or 0, want["cache_read"],
       f"{where}: usage.cache_read_input_tokens")
    eq(usage.cache_creation_input_tokens or 0, want["cache_creation"],
       f"{where}: usage.cache_creation_input_tokens")


def check_create(client, x):
    m = client.messages.create(model="claude-ok", max_tokens=MAX_TOKENS, messages=PROMPT,
                               system="You are a test.")
    eq(m.type, "message", "type")
    eq(m.role, "assistant", "role")
    check(m.id.startswith("msg_"), f"id should start with msg_: {m.id!r}")
    check(m.model.startswith("claude-ok"), f"model: {m.model!r}")
    eq(texts(m), [x["ok_text"]], "text blocks")
    eq(m.stop_reason, "end_turn", "stop_reason")
    check_usage(m.usage, x["ok_usage"], "create")
    check(str(m._request_id or "").startswith("req_"), f"request-id header: {m._request_id!r}")
    return f"text={texts(m)[0]!r} request_id={m._request_id}"


def check_stream(client, x):
    with client.messages.stream(model="claude-ok", max_tokens=MAX_TOKENS, messages=PROMPT) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    eq(pieces, x["ok_pieces"], "text_stream pieces")
    eq(texts(final), [x["ok_text"]], "final message text")
    eq(final.stop_reason, "end_turn", "final stop_reason")
    # input from message_start, output from message_delta (which carries output_tokens only).
    check_usage(final.usage, x["ok_usage"], "stream")
    return f"{len(pieces)} text deltas"


def check_tools(client, x):
    m = client.messages.create(model="claude-tools", max_tokens=MAX_TOKENS, messages=PROMPT,
                               tools=[WEATHER_TOOL], tool_choice={"type": "auto"})
    eq([b.type for b in m.content], ["text", "tool_use"], "content block types")
    eq(m.content[0].text, x["tool_preamble"], "text before the tool call")
    tool = m.content[1]
    eq(tool.id, x["tool_id"], "tool_use.id")
    eq(tool.name, WEATHER_TOOL["name"], "tool_use.name")
    eq(tool.input, x["tool_input"], "tool_use.input")
    eq(m.stop_reason, "tool_use", "stop_reason")
    check_usage(m.usage, x["tools_usage"], "tools")
    return f"tool_use {tool.name}({json.dumps(tool.input)})"


def check_tools_stream_and_answer(client, x):
    json_pieces = []
    with client.messages.stream(model="claude-tools", max_tokens=MAX_TOKENS, messages=PROMPT,
                                tools=[WEATHER_TOOL]) as s:
        for event in s:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                json_pieces.append(event.delta.partial_json)
        final = s.get_final_message()
    check(len([p for p in json_pieces if p]) >= 3,
          f"expected >= 3 non-empty input_json_delta pieces, got {json_pieces!r}")
    tools = [b for b in final.content if b.type == "tool_use"]
    eq(len(tools), 1, "tool_use blocks in the final message")
    eq(tools[0].input, x["tool_input"], "streamed tool_use.input")
    eq(final.stop_reason, "tool_use", "streamed stop_reason")
    # message_delta repeats every usage field here (the newer API's cumulative form).
    check_usage(final.usage, x["tools_usage"], "tools stream")

    # The second turn, built from what the SDK parsed: the fake accepts it only if the
    # tool_result answers the tool_use of the turn before.
    turn = [
        PROMPT[0],
        final.to_param(),
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tools[0].id, "content": "7 degrees"}]},
    ]
    answer = client.messages.create(model="claude-tools", max_tokens=MAX_TOKENS, messages=turn,
                                    tools=[WEATHER_TOOL])
    eq(texts(answer), [x["tool_answer"]], "answer after the tool result")
    eq(answer.stop_reason, "end_turn", "answer stop_reason")

    # A tool_result naming a tool_use that does not exist is refused, as by the real API.
    turn[2]["content"][0]["tool_use_id"] = "toolu_nosuch"
    try:
        client.messages.create(model="claude-tools", max_tokens=MAX_TOKENS, messages=turn,
                               tools=[WEATHER_TOOL])
    except anthropic.BadRequestError as e:
        eq(e.body["error"]["type"], "invalid_request_error", "error.type")
    else:
        raise CheckFailed("a tool_result with an unknown tool_use_id was accepted")
    return f"{len(json_pieces)} input_json_delta pieces; second turn answered"


def check_thinking(client, x):
    m = client.messages.create(model="claude-thinking", max_tokens=MAX_TOKENS, messages=PROMPT)
    eq([b.type for b in m.content], ["thinking", "text"], "content block types")
    eq(m.content[0].thinking, x["thinking"], "thinking")
    eq(m.content[0].signature, x["thinking_signature"], "signature")
    eq(m.content[1].text, x["thinking_answer"], "text after thinking")

    thinking_pieces, signatures = [], []
    with client.messages.stream(model="claude-thinking", max_tokens=MAX_TOKENS,
                                messages=PROMPT) as s:
        for event in s:
            if event.type == "content_block_delta":
                if event.delta.type == "thinking_delta":
                    thinking_pieces.append(event.delta.thinking)
                elif event.delta.type == "signature_delta":
                    signatures.append(event.delta.signature)
        final = s.get_final_message()
    check(len(thinking_pieces) >= 2, f"expected >= 2 thinking deltas, got {thinking_pieces!r}")
    eq(signatures, [x["thinking_signature"]], "signature deltas")
    eq(final.content[0].thinking, x["thinking"], "streamed thinking")
    eq(final.content[0].signature, x["thinking_signature"], "streamed signature")
    eq(texts(final), [x["thinking_answer"]], "streamed text after thinking")
    return f"{len(thinking_pieces)} thinking deltas"


def check_max_tokens(client, x):
    m = client.messages.create(model="claude-max", max_tokens=MAX_TOKENS, messages=PROMPT)
    eq(m.stop_reason, "max_tokens", "stop_reason")
    eq(texts(m), [x["max_text"]], "text")
    return "stop_reason=max_tokens"


def expect_status_error(fn, cls, status, error_type):
    try:
        fn()
    except cls as e:
        eq(e.status_code, status, "status")
        eq(e.body["error"]["type"], error_type, "error.type")
        eq(e.body["type"], "error", "body type")
        check(str(e.request_id or "").startswith("req_"), f"request-id: {e.request_id!r}")
        return e
    raise CheckFailed(f"expected {cls.__name__} ({status} {error_type})")


def check_errors(base_url, x):
    good = client_for(base_url)

    def create(client, model):
        return lambda: client.messages.create(model=model, max_tokens=MAX_TOKENS,
                                              messages=PROMPT)

    expect_status_error(create(good, "claude-overloaded"), anthropic.APIStatusError, 529,
                        "overloaded_error")
    e = expect_status_error(create(good, "claude-invalid"), anthropic.BadRequestError, 400,
                            "invalid_request_error")
    eq(e.body["error"]["message"], x["invalid_message"], "error.message")
    e = expect_status_error(create(client_for(base_url, "sk-ant-rate-limited-1"), "claude-ok"),
                            anthropic.RateLimitError, 429, "rate_limit_error")
    eq(e.response.headers.get("retry-after"), "60", "retry-after")
    expect_status_error(create(client_for(base_url, "sk-ant-wrong"), "claude-ok"),
                        anthropic.AuthenticationError, 401, "authentication_error")
    expect_status_error(create(client_for(base_url, "sk-ant-good-2"), "claude-nosuch"),
                        anthropic.NotFoundError, 404, "not_found_error")
    return "529, 400, 429 + retry-after, 401, 404"


def check_midstream_error(client, x):
    seen = []
    try:
        with client.messages.stream(model="claude-midstream-error", max_tokens=MAX_TOKENS,
                                    messages=PROMPT) as s:
            for text in s.text_stream:
                seen.append(text)
    except anthropic.APIStatusError as e:
        eq(seen, [x["midstream_text"]], "text before the error event")
        eq(e.body["error"]["type"], "overloaded_error", "error event type")
        return f"error event after {seen!r}"
    raise CheckFailed(f"the stream ended without an error (saw {seen!r})")


def main(argv):
    if len(argv) != 3:
        print("usage: anthropic_sdk_fake_check.py BASE_URL EXPECT_JSON", file=sys.stderr)
        return 2
    base_url, x = argv[1], json.loads(argv[2])
    client = client_for(base_url)
    checks = [
        ("messages.create", lambda: check_create(client, x)),
        ("messages.stream", lambda: check_stream(client, x)),
        ("tool use", lambda: check_tools(client, x)),
        ("streamed tool use, then the tool result",
         lambda: check_tools_stream_and_answer(client, x)),
        ("thinking", lambda: check_thinking(client, x)),
        ("max_tokens", lambda: check_max_tokens(client, x)),
        ("error responses", lambda: check_errors(base_url, x)),
        ("error event mid-stream", lambda: check_midstream_error(client, x)),
    ]
    print(f"anthropic sdk {anthropic.__version__} against {base_url}")
    passed = failed = 0
    for name, fn in checks:
        try:
            detail = fn()
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        except anthropic.APIStatusError as e:
            failed += 1
            print(f"FAIL {name}: {type(e).__name__} (HTTP {e.status_code}): {e.body!r}")
        except Exception as e:  # noqa: BLE001 - anything else is a failed check too
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"ok   {name}" + (f" ({detail})" if detail else ""))
    print(f"anthropic sdk: {passed} passed, {failed} failed")
    sys.stdout.flush()
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
