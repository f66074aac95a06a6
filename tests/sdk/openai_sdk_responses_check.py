#!/usr/bin/env python3
"""Check tollgate's `POST /v1/responses` with the official `openai` SDK, unmodified.

    $TOLLGATE_PYTHON tests/sdk/openai_sdk_responses_check.py BASE_URL API_KEY EXPECT_JSON

BASE_URL is the API root including /v1, API_KEY a valid tollgate credential, EXPECT_JSON what
the test's fakes answer (tool id, tool input, texts, usage). The models are those of
tests/it/responses.rs: `mock/echo` (translated), `claude/claude-tools` and `claude/claude-ok`
(the fake Anthropic API, translated), `gpt/gpt-ok` (the fake Responses API, passed through).

Every streamed event must parse as the SDK's own typed event class (not a bare model), and be
numbered by `sequence_number` from 0.

Prints one line per check, then `openai sdk responses: N passed, M failed`.
Exit status: 0 all passed, 1 a check failed, 2 bad usage or no openai package.
"""

import json
import sys
import traceback

try:
    import openai
    from openai.types.responses import (
        Response,
        ResponseCompletedEvent,
        ResponseCreatedEvent,
        ResponseErrorEvent,
        ResponseFailedEvent,
        ResponseFunctionToolCall,
        ResponseIncompleteEvent,
        ResponseOutputMessage,
        ResponseTextDeltaEvent,
    )
except ImportError:
    print("openai sdk responses: the `openai` package is not installed for " + sys.executable)
    sys.exit(2)

TIMEOUT_SECS = 30

TOOLS = [{
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}]


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def check_response(r, model, where):
    check(isinstance(r, Response), f"{where}: not a Response: {type(r)}")
    check(r.object == "response", f"{where}: object {r.object!r}")
    check(r.id.startswith("resp_"), f"{where}: id {r.id!r}")
    check(r.model == model, f"{where}: model {r.model!r}, want {model!r}")
    check(r.usage is not None and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens,
          f"{where}: usage {r.usage!r}")


def collect(stream, where):
    events = list(stream)
    check(events, f"{where}: no events")
    for i, ev in enumerate(events):
        check(type(ev).__name__ not in ("BaseModel", "dict"), f"{where}: untyped event {ev!r}")
        check(ev.sequence_number == i, f"{where}: event {i} numbered {ev.sequence_number}")
    check(isinstance(events[0], ResponseCreatedEvent), f"{where}: first event {type(events[0]).__name__}")
    return events


def check_mock_whole(client, expect):
    r = client.responses.create(model="mock/echo", input="alpha beta", instructions="Be brief.",
                                max_output_tokens=4, metadata={"k": "v"})
    check_response(r, "mock/echo", "mock")
    check(r.output_text == "alpha beta alpha beta", f"mock: output_text {r.output_text!r}")
    check(isinstance(r.output[0], ResponseOutputMessage), f"mock: {r.output[0]!r}")
    check(r.instructions == "Be brief." and r.metadata == {"k": "v"}, f"mock: echo {r!r}")
    check(r.usage.output_tokens == 4, f"mock: usage {r.usage!r}")


def check_mock_stream(client, expect):
    events = collect(client.responses.create(model="mock/echo", input="one two", stream=True), "mock stream")
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    last = events[-1]
    check(isinstance(last, ResponseCompletedEvent), f"mock stream: last {type(last).__name__}")
    check(last.response.output_text == text and text, f"mock stream: {text!r} vs {last.response.output_text!r}")
    check(last.response.usage.output_tokens > 0, f"mock stream: usage {last.response.usage!r}")
    kinds = [e.type for e in events]
    for k in ["response.in_progress", "response.output_item.added", "response.content_part.added",
              "response.output_text.done", "response.content_part.done", "response.output_item.done"]:
        check(k in kinds, f"mock stream: no {k} in {kinds}")


def check_claude_tool_round_trip(client, expect):
    r = client.responses.create(model="claude/claude-tools", input="weather in Oslo?", tools=TOOLS)
    check_response(r, "claude/claude-tools", "claude tools")
    calls = [o for o in r.output if isinstance(o, ResponseFunctionToolCall)]
    check(len(calls) == 1, f"claude tools: calls {r.output!r}")
    call = calls[0]
    check(call.call_id == expect["tool_id"] and call.name == "get_weather", f"claude tools: {call!r}")
    check(json.loads(call.arguments) == expect["tool_input"], f"claude tools: arguments {call.arguments!r}")
    check(r.output_text == expect["tool_preamble"], f"claude tools: text {r.output_text!r}")
    follow = [{"role": "user", "content": "weather in Oslo?"}]
    follow += [o.model_dump(exclude_none=True) for o in r.output]
    follow.append({"type": "function_call_output", "call_id": call.call_id, "output": "7 degrees"})
    r2 = client.responses.create(model="claude/claude-tools", input=follow, tools=TOOLS)
    check(r2.output_text == expect["tool_answer"], f"claude round trip: {r2.output_text!r}")


def check_claude_tool_stream(client, expect):
    events = collect(client.responses.create(model="claude/claude-tools", input="weather?", tools=TOOLS,
                                             stream=True), "claude tool stream")
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    check(json.loads(args) == expect["tool_input"], f"claude tool stream: arguments {args!r}")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    check(len(done) == 1 and done[0].arguments == args, f"claude tool stream: done {done!r}")
    last = events[-1]
    check(isinstance(last, ResponseCompletedEvent), f"claude tool stream: last {type(last).__name__}")
    calls = [o for o in last.response.output if isinstance(o, ResponseFunctionToolCall)]
    check(calls and calls[0].call_id == expect["tool_id"], f"claude tool stream: {last.response.output!r}")


def check_passthrough(client, expect):
    r = client.responses.create(model="gpt/gpt-ok", input="hi", store=True)
    check(r.model == "gpt/gpt-ok", f"passthrough: model {r.model!r}")
    check(r.output_text == expect["gpt_text"], f"passthrough: text {r.output_text!r}")
    i, c, o = expect["gpt_usage"]
    check((r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens, r.usage.output_tokens) == (i, c, o),
          f"passthrough: usage {r.usage!r}")
    events = collect(client.responses.create(model="gpt/gpt-ok", input="hi", stream=True), "passthrough stream")
    check(isinstance(events[-1], ResponseCompletedEvent), f"passthrough stream: last {events[-1]!r}")
    check(events[-1].response.model == "gpt/gpt-ok", f"passthrough stream: model {events[-1].response.model!r}")


def check_terminal_events(client, expect):
    events = collect(client.responses.create(model="claude/claude-max", input="long", stream=True,
                                             max_output_tokens=10), "incomplete stream")
    last = events[-1]
    check(isinstance(last, ResponseIncompleteEvent), f"incomplete stream: last {last!r}")
    check(last.response.incomplete_details.reason == "max_output_tokens", f"incomplete stream: {last!r}")
    events = collect(client.responses.create(model="claude/claude-midstream-error", input="x", stream=True),
                     "failed stream")
    last = events[-1]
    check(isinstance(last, ResponseFailedEvent), f"failed stream: last {last!r}")
    check(last.response.status == "failed" and last.response.error.message, f"failed stream: {last!r}")
    events = collect(client.responses.create(model="gpt/gpt-failed", input="x", stream=True),
                     "failed pass-through")
    check(isinstance(events[-1], ResponseErrorEvent), f"failed pass-through: last {events[-1]!r}")


def check_errors(client, expect):
    try:
        client.responses.create(model="mock/echo", input="hi", previous_response_id="resp_1")
        raise CheckFailed("previous_response_id to the mock was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "no conversation state" in str(e), f"errors: {e}")
        check(e.code == "invalid_request", f"errors: code {e.code!r}")
    try:
        client.responses.create(model="nope/none", input="hi")
        raise CheckFailed("an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.code == "model_not_found", f"errors: code {e.code!r}")
    bad = openai.OpenAI(base_url=client.base_url, api_key="tg-wrong", max_retries=0, timeout=TIMEOUT_SECS)
    try:
        bad.responses.create(model="mock/echo", input="hi")
        raise CheckFailed("a bad key was accepted")
    except openai.AuthenticationError:
        pass


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    base_url, api_key, expect = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=TIMEOUT_SECS)
    checks = [check_mock_whole, check_mock_stream, check_claude_tool_round_trip, check_claude_tool_stream,
              check_passthrough, check_terminal_events, check_errors]
    failed = 0
    for c in checks:
        try:
            c(client, expect)
            print(f"ok   {c.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL {c.__name__}")
            traceback.print_exc(file=sys.stdout)
    print(f"openai sdk responses: {len(checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
