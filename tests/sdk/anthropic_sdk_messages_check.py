#!/usr/bin/env python3
"""Drive tollgate's `/v1/messages` with the official, unmodified `anthropic` SDK: a Claude model
(passed through to the tests' fake Anthropic API) and mock and OpenAI-compatible models
(translated), whole and streamed, with a tool, with thinking, count_tokens, and errors as the
SDK's typed exceptions.

    $TOLLGATE_PYTHON tests/sdk/anthropic_sdk_messages_check.py BASE_URL API_KEY EXPECT_JSON

BASE_URL is tollgate's HTTP root; API_KEY a tollgate key; EXPECT_JSON the fakes' constants,
written by the Rust test (tests/it/messages.rs) so there is one source of truth.

Prints one line per check, then `anthropic sdk messages: N passed, M failed`.
Exit status: 0 all passed, 1 a check failed, 2 bad usage or no anthropic package.
"""

import json
import sys
import traceback

try:
    import anthropic
except ImportError:
    print("anthropic sdk messages: the `anthropic` package is not installed for " + sys.executable)
    sys.exit(2)

TIMEOUT_SECS = 30
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
THINKING = {"type": "enabled", "budget_tokens": 1024}


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def eq(got, want, what):
    check(got == want, f"{what}: got {got!r}, want {want!r}")


def texts(message):
    return "".join(b.text for b in message.content if b.type == "text")


def claude_create(c, x):
    m = c.messages.create(model="claude/claude-ok", max_tokens=64, messages=PROMPT,
                          system=[{"type": "text", "text": "You are a test.",
                                   "cache_control": {"type": "ephemeral"}}])
    eq(m.type, "message", "type")
    eq(m.model, "claude/claude-ok", "model is tollgate's name")
    eq(texts(m), x["ok_text"], "text")
    eq(m.stop_reason, "end_turn", "stop_reason")


def claude_stream(c, x):
    with c.messages.stream(model="claude/claude-ok", max_tokens=64, messages=PROMPT) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    eq(text, x["ok_text"], "streamed text")
    eq(final.model, "claude/claude-ok", "model")
    check(final.usage.output_tokens > 0, "usage.output_tokens")


def claude_tool_round_trip(c, x):
    m = c.messages.create(model="claude/claude-tools", max_tokens=256, messages=PROMPT,
                          tools=[WEATHER_TOOL], tool_choice={"type": "auto"})
    eq(m.stop_reason, "tool_use", "stop_reason")
    uses = [b for b in m.content if b.type == "tool_use"]
    eq(len(uses), 1, "tool_use blocks")
    eq(uses[0].id, x["tool_id"], "tool_use.id")
    eq(uses[0].input, x["tool_input"], "tool_use.input")
    turns = PROMPT + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": "7 degrees"}]},
    ]
    m2 = c.messages.create(model="claude/claude-tools", max_tokens=256, messages=turns,
                           tools=[WEATHER_TOOL])
    eq(texts(m2), x["tool_answer"], "answer after the tool result")


def claude_tool_stream(c, x):
    with c.messages.stream(model="claude/claude-tools", max_tokens=256, messages=PROMPT,
                           tools=[WEATHER_TOOL]) as s:
        final = s.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    eq([u.input for u in uses], [x["tool_input"]], "streamed tool input (input_json_delta)")
    eq(final.stop_reason, "tool_use", "stop_reason")


def claude_thinking_stream(c, x):
    with c.messages.stream(model="claude/claude-thinking", max_tokens=2048, messages=PROMPT,
                           thinking=THINKING) as s:
        final = s.get_final_message()
    kinds = [b.type for b in final.content]
    eq(kinds, ["thinking", "text"], "block kinds")
    eq(final.content[0].thinking, x["thinking"], "thinking text")
    eq(final.content[0].signature, x["thinking_signature"], "signature")
    eq(texts(final), x["thinking_answer"], "text")


def mock_create_with_tool(c, x):
    m = c.messages.create(model="mock/echo", max_tokens=64, messages=PROMPT,
                          tools=[WEATHER_TOOL], metadata={"user_id": "sdk-user"},
                          stop_sequences=["never"])
    eq(m.type, "message", "type")
    eq(m.model, "mock/echo", "model")
    check(texts(m).startswith("Say"), f"mock echoes the prompt: {texts(m)!r}")
    check(m.usage.input_tokens > 0 and m.usage.output_tokens > 0, "usage")


def mock_stream_with_thinking(c, x):
    with c.messages.stream(model="mock/echo", max_tokens=2048, messages=PROMPT,
                           thinking=THINKING) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text.startswith("Say"), f"first text delta kept: {text!r}")
    eq(texts(final), text, "final text")
    eq(final.stop_reason, "end_turn", "stop_reason")


def openai_create_and_stream(c, x):
    m = c.messages.create(model="up/ok", max_tokens=64, messages=PROMPT)
    eq(texts(m), x["openai_text"], "text from the OpenAI upstream")
    with c.messages.stream(model="up/stream", max_tokens=64, messages=PROMPT) as s:
        text = "".join(s.text_stream)
    eq(text, x["stream_text"], "streamed text from the OpenAI upstream")


def count_tokens(c, x):
    n = c.messages.count_tokens(model="claude/claude-ok", messages=PROMPT)
    eq(n.input_tokens, 42, "native count")
    n = c.messages.count_tokens(model="mock/echo", messages=PROMPT)
    check(n.input_tokens > 0, f"estimated count: {n.input_tokens}")


def errors(c, x, base_url):
    try:
        c.messages.create(model="nope/none", max_tokens=8, messages=PROMPT)
        raise CheckFailed("unknown model accepted")
    except anthropic.NotFoundError as e:
        eq(e.status_code, 404, "status")
        eq(e.body["error"]["type"], "not_found_error", "error.type")
    bad = anthropic.Anthropic(base_url=base_url, api_key="tg-wrong", max_retries=0,
                              timeout=TIMEOUT_SECS)
    try:
        bad.messages.create(model="mock/echo", max_tokens=8, messages=PROMPT)
        raise CheckFailed("bad key accepted")
    except anthropic.AuthenticationError as e:
        eq(e.status_code, 401, "status")
    try:
        c.messages.create(model="claude/claude-invalid", max_tokens=8, messages=PROMPT)
        raise CheckFailed("upstream 400 accepted")
    except anthropic.BadRequestError as e:
        eq(e.status_code, 400, "status")


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    base_url, key, x = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    c = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=TIMEOUT_SECS)
    checks = [
        ("claude: create (passed through)", lambda: claude_create(c, x)),
        ("claude: stream", lambda: claude_stream(c, x)),
        ("claude: tool use and tool result", lambda: claude_tool_round_trip(c, x)),
        ("claude: streamed tool use", lambda: claude_tool_stream(c, x)),
        ("claude: streamed thinking with signature", lambda: claude_thinking_stream(c, x)),
        ("mock: create with a tool (translated)", lambda: mock_create_with_tool(c, x)),
        ("mock: stream with thinking", lambda: mock_stream_with_thinking(c, x)),
        ("openai: create and stream (translated)", lambda: openai_create_and_stream(c, x)),
        ("count_tokens", lambda: count_tokens(c, x)),
        ("errors as typed exceptions", lambda: errors(c, x, base_url)),
    ]
    passed = failed = 0
    for name, fn in checks:
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed += 1
            print(f"FAIL {name}: {e}")
            traceback.print_exc(file=sys.stdout)
    print(f"anthropic sdk messages: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
