#!/usr/bin/env python3
"""Check that the unmodified `openai` SDK reaches Claude models through tollgate: the gateway's
`anthropic` provider in front of the tests' fake Messages API (tests/common/anthropic_upstream).

    $TOLLGATE_PYTHON tests/sdk/openai_sdk_anthropic_check.py BASE_URL API_KEY PREFIX EXPECT_JSON

BASE_URL is tollgate's API root with /v1, API_KEY a tollgate credential, PREFIX names this run:
each request carries `x-request-id: PREFIX-<check>` and the marker `PREFIX-<check>` in its user
message, so the Rust test can find its ledger row and what the fake received. EXPECT_JSON holds
the fake's constants (texts, tool id and input, thinking) and the expected usage.

Prints one line per check, then `openai sdk: N passed, M failed`.
Exit status: 0 all passed, 1 a check failed, 2 bad usage or no openai package.
"""

import json
import sys
import traceback

try:
    import openai
except ImportError:
    print("openai sdk: the `openai` package is not installed for " + sys.executable)
    sys.exit(2)

TIMEOUT_SECS = 30
SYSTEM = "You are a test."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def eq(got, want, what):
    check(got == want, f"{what}: got {got!r}, want {want!r}")


class Run:
    def __init__(self, client, prefix, expect):
        self.client, self.prefix, self.x = client, prefix, expect

    def messages(self, name):
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"hello {self.prefix}-{name}"}]

    def create(self, name, model, **kwargs):
        kwargs.setdefault("messages", self.messages(name))
        return self.client.chat.completions.create(
            model=model, extra_headers={"x-request-id": f"{self.prefix}-{name}"}, **kwargs)

    def stream(self, name, model, **kwargs):
        """Streams; returns (chunks, text, reasoning, finish_reasons, tool_calls by index)."""
        chunks, text, reasoning, finish, tools = [], [], [], [], {}
        with self.create(name, model, stream=True, **kwargs) as stream:
            for chunk in stream:
                chunks.append(chunk)
                for choice in chunk.choices or []:
                    d = choice.delta
                    if d is not None and d.content:
                        text.append(d.content)
                    r = (d.model_extra or {}).get("reasoning_content") if d is not None else None
                    if r:
                        reasoning.append(r)
                    for tc in (d.tool_calls or []) if d is not None else []:
                        t = tools.setdefault(tc.index, {"id": None, "name": None, "args": []})
                        if tc.id:
                            t["id"] = tc.id
                        if tc.function is not None and tc.function.name:
                            t["name"] = tc.function.name
                        if tc.function is not None and tc.function.arguments:
                            t["args"].append(tc.function.arguments)
                    if choice.finish_reason is not None:
                        finish.append(choice.finish_reason)
        return chunks, text, reasoning, finish, tools


def check_usage(usage, want, where):
    check(usage is not None, f"{where}: usage missing")
    eq(usage.prompt_tokens, want["prompt"], f"{where}: usage.prompt_tokens")
    eq(usage.completion_tokens, want["completion"], f"{where}: usage.completion_tokens")
    eq(usage.total_tokens, want["prompt"] + want["completion"], f"{where}: usage.total_tokens")


def check_ok(run):
    x = run.x
    resp = run.create("whole", "claude/claude-ok")
    eq(resp.object, "chat.completion", "object")
    eq(resp.model, "claude/claude-ok", "model")
    msg = resp.choices[0].message
    eq(msg.role, "assistant", "role")
    eq(msg.content, x["ok_text"], "content")
    eq(resp.choices[0].finish_reason, "stop", "finish_reason")
    check_usage(resp.usage, x["ok_usage"], "non-streaming")
    details = resp.usage.prompt_tokens_details
    eq(details.cached_tokens if details else None, x["ok_cached"], "prompt_tokens_details.cached_tokens")
    return f"content={msg.content!r} usage={resp.usage.prompt_tokens}/{resp.usage.completion_tokens}"


def check_ok_stream(run):
    x = run.x
    chunks, text, _, finish, _ = run.stream("streamed", "claude/claude-ok",
                                            stream_options={"include_usage": True})
    check(len(text) >= 3, f"expected >= 3 content chunks, got {text!r}")
    eq("".join(text), x["ok_text"], "streamed content")
    eq(finish, ["stop"], "finish_reasons")
    check(all(c.model == "claude/claude-ok" for c in chunks), "a chunk names another model")
    with_usage = [i for i, c in enumerate(chunks) if c.usage is not None]
    eq(with_usage, [len(chunks) - 1], "chunks carrying usage")
    check(not chunks[-1].choices, "the usage chunk should have no choices")
    check_usage(chunks[-1].usage, x["ok_usage"], "usage chunk")
    return f"{len(text)} content chunks"


def check_tool_call(run):
    x = run.x
    resp = run.create("tools-whole", "claude/claude-tools", tools=[WEATHER_TOOL], tool_choice="auto")
    choice = resp.choices[0]
    eq(choice.finish_reason, "tool_calls", "finish_reason")
    calls = choice.message.tool_calls or []
    eq(len(calls), 1, "tool calls")
    eq(calls[0].id, x["tool_id"], "tool call id")
    eq(calls[0].type, "function", "tool call type")
    eq(calls[0].function.name, "get_weather", "function name")
    eq(json.loads(calls[0].function.arguments), x["tool_input"], "arguments")
    eq(choice.message.content, x["tool_preamble"], "content beside the tool call")
    return f"{calls[0].function.name}({calls[0].function.arguments})"


def check_tool_call_stream_and_answer(run):
    x = run.x
    _, text, _, finish, tools = run.stream("tools-streamed", "claude/claude-tools",
                                           tools=[WEATHER_TOOL])
    eq(finish, ["tool_calls"], "finish_reasons")
    eq(sorted(tools), [0], "tool call indexes")
    t = tools[0]
    eq(t["id"], x["tool_id"], "streamed tool call id")
    eq(t["name"], "get_weather", "streamed function name")
    check(len(t["args"]) >= 2, f"arguments should arrive in pieces, got {t['args']!r}")
    args = "".join(t["args"])
    eq(json.loads(args), x["tool_input"], "assembled arguments")
    eq("".join(text), x["tool_preamble"], "streamed content beside the tool call")

    # The second turn as an OpenAI client sends it: the assistant's tool_calls (content None,
    # as most clients leave it) and the tool's answer. The fake accepts it only if tollgate
    # turned it into a tool_use / tool_result pair.
    call = {"id": t["id"], "type": "function",
            "function": {"name": t["name"], "arguments": args}}
    turn = run.messages("answer-whole") + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": t["id"], "content": "7 degrees"},
    ]
    resp = run.create("answer-whole", "claude/claude-tools", messages=turn, tools=[WEATHER_TOOL])
    eq(resp.choices[0].message.content, x["tool_answer"], "answer after the tool result")
    eq(resp.choices[0].finish_reason, "stop", "answer finish_reason")

    # The same turn streamed, with the assistant's text kept beside its tool call.
    turn = run.messages("answer-streamed") + [
        {"role": "assistant", "content": x["tool_preamble"], "tool_calls": [call]},
        {"role": "tool", "tool_call_id": t["id"], "content": "7 degrees"},
    ]
    _, text, _, finish, _ = run.stream("answer-streamed", "claude/claude-tools",
                                       messages=turn, tools=[WEATHER_TOOL])
    eq("".join(text), x["tool_answer"], "streamed answer after the tool result")
    eq(finish, ["stop"], "streamed answer finish_reasons")
    return f"arguments in {len(t['args'])} pieces; second turn answered"


def check_thinking(run):
    x = run.x
    resp = run.create("think-whole", "claude/claude-thinking")
    msg = resp.choices[0].message
    eq((msg.model_extra or {}).get("reasoning_content"), x["thinking"], "reasoning_content")
    eq(msg.content, x["thinking_answer"], "content after thinking")
    _, text, reasoning, finish, _ = run.stream("think-streamed", "claude/claude-thinking")
    check(len(reasoning) >= 2, f"reasoning should arrive in pieces, got {reasoning!r}")
    eq("".join(reasoning), x["thinking"], "streamed reasoning_content")
    eq("".join(text), x["thinking_answer"], "streamed content")
    eq(finish, ["stop"], "finish_reasons")
    return f"{len(reasoning)} reasoning deltas"


def main(argv):
    if len(argv) != 5:
        print("usage: openai_sdk_anthropic_check.py BASE_URL API_KEY PREFIX EXPECT_JSON",
              file=sys.stderr)
        return 2
    base_url, api_key, prefix, expect = argv[1], argv[2], argv[3], json.loads(argv[4])
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                           timeout=TIMEOUT_SECS)
    run = Run(client, prefix, expect)
    checks = [
        ("chat completion", lambda: check_ok(run)),
        ("stream with include_usage", lambda: check_ok_stream(run)),
        ("tool call", lambda: check_tool_call(run)),
        ("streamed tool call, then the tool result", lambda: check_tool_call_stream_and_answer(run)),
        ("thinking as reasoning_content", lambda: check_thinking(run)),
    ]
    print(f"openai sdk {openai.__version__} against {base_url} (claude via tollgate)")
    passed = failed = 0
    for name, fn in checks:
        try:
            detail = fn()
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        except openai.APIStatusError as e:
            failed += 1
            print(f"FAIL {name}: {type(e).__name__} (HTTP {e.status_code}): {e.body!r}")
        except Exception as e:  # noqa: BLE001 - anything else is a failed check too
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"ok   {name}" + (f" ({detail})" if detail else ""))
    print(f"openai sdk: {passed} passed, {failed} failed")
    sys.stdout.flush()
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
