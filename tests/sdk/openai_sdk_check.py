#!/usr/bin/env python3
"""Check tollgate's OpenAI-compatible HTTP API with the official `openai` SDK.

    $TOLLGATE_PYTHON tests/sdk/openai_sdk_check.py BASE_URL API_KEY MODEL

BASE_URL is the API root including /v1 (http://127.0.0.1:PORT/v1), API_KEY a
valid tollgate credential, MODEL a model or alias that key may use (and that
returns at least two content chunks when streamed, e.g. mock/echo).

Prints one line per check, then `openai sdk: N passed, M failed`.
Exit status: 0 all passed, 1 a check failed, 2 bad usage or no openai package.
"""

import sys
import traceback

try:
    import openai
except ImportError:
    print("openai sdk: the `openai` package is not installed for " + sys.executable)
    sys.exit(2)

TIMEOUT_SECS = 30
PROMPT = [{"role": "user", "content": "Say hello to the openai sdk check."}]


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def client_for(base_url, api_key):
    # No retries: a failure must show up as it is, not be papered over.
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=TIMEOUT_SECS)


def collect_stream(client, model, **kwargs):
    """Streams a chat completion; returns (chunks, text, content_chunk_count, finish_reasons)."""
    chunks = []
    text = []
    content_chunks = 0
    finish_reasons = []
    stream = client.chat.completions.create(model=model, messages=PROMPT, stream=True, **kwargs)
    with stream:
        for chunk in stream:
            chunks.append(chunk)
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    content_chunks += 1
                    text.append(choice.delta.content)
                if choice.finish_reason is not None:
                    finish_reasons.append(choice.finish_reason)
    return chunks, "".join(text), content_chunks, finish_reasons


def check_usage(usage, where):
    check(usage is not None, f"{where}: usage missing")
    check(isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0,
          f"{where}: usage.prompt_tokens should be > 0, got {usage.prompt_tokens!r}")
    check(isinstance(usage.completion_tokens, int) and usage.completion_tokens > 0,
          f"{where}: usage.completion_tokens should be > 0, got {usage.completion_tokens!r}")
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
          f"{where}: usage.total_tokens {usage.total_tokens} != prompt + completion "
          f"({usage.prompt_tokens} + {usage.completion_tokens})")


def check_non_streaming(client, model):
    resp = client.chat.completions.create(model=model, messages=PROMPT)
    check(resp.object == "chat.completion", f"object should be chat.completion, got {resp.object!r}")
    check(bool(resp.id), "response id is empty")
    check(isinstance(resp.model, str) and resp.model, f"model missing from response: {resp.model!r}")
    check(len(resp.choices) >= 1, "no choices")
    msg = resp.choices[0].message
    check(msg.role == "assistant", f"message role should be assistant, got {msg.role!r}")
    check(isinstance(msg.content, str) and msg.content.strip(), f"content is empty: {msg.content!r}")
    check(resp.choices[0].finish_reason is not None, "finish_reason missing")
    check_usage(resp.usage, "non-streaming")
    return f"model={resp.model} completion_tokens={resp.usage.completion_tokens}"


def check_streaming_with_usage(client, model):
    chunks, text, content_chunks, finish = collect_stream(
        client, model, stream_options={"include_usage": True})
    check(content_chunks >= 2, f"expected >= 2 content chunks, got {content_chunks}")
    check(text.strip(), "concatenated streamed text is empty")
    check(finish, "no chunk carried a finish_reason")
    check(all(isinstance(c.model, str) and c.model for c in chunks), "a chunk has no model")
    with_usage = [i for i, c in enumerate(chunks) if c.usage is not None]
    check(with_usage, "include_usage: no chunk carried usage")
    check(with_usage == [len(chunks) - 1],
          f"include_usage: usage should be on the final chunk only, found on chunks {with_usage} "
          f"of {len(chunks)}")
    last = chunks[-1]
    check(not last.choices, f"include_usage: the usage chunk should have empty choices, "
          f"got {len(last.choices)}")
    check_usage(last.usage, "streaming usage chunk")
    return f"{content_chunks} content chunks, completion_tokens={last.usage.completion_tokens}"


def check_streaming_without_usage(client, model):
    chunks, text, content_chunks, finish = collect_stream(client, model)
    check(content_chunks >= 2, f"expected >= 2 content chunks, got {content_chunks}")
    check(text.strip(), "concatenated streamed text is empty")
    check(finish, "no chunk carried a finish_reason")
    usage_only = [i for i, c in enumerate(chunks) if not c.choices]
    check(not usage_only, f"without include_usage the client got choice-less (usage-only) "
          f"chunks at {usage_only} of {len(chunks)}")
    with_usage = [i for i, c in enumerate(chunks) if c.usage is not None]
    check(not with_usage, f"without include_usage chunks {with_usage} carried usage")
    return f"{content_chunks} content chunks, no usage chunk"


def check_models_list(client, model):
    ids = [m.id for m in client.models.list()]
    check(model in ids, f"{model!r} not in models.list(): {ids}")
    return f"{len(ids)} models"


def check_invalid_key(base_url, model):
    bad = client_for(base_url, "tg-invalid-key-for-sdk-check")
    try:
        bad.chat.completions.create(model=model, messages=PROMPT)
    except openai.AuthenticationError as e:
        body = e.body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]  # tolerate SDKs that do not unwrap `error`
        check(isinstance(body, dict), f"error body is not a JSON object: {e.body!r}")
        check(body.get("code") == "auth_rejected",
              f"error.code should be auth_rejected, got {body.get('code')!r} (body {e.body!r})")
        check(e.status_code == 401, f"status should be 401, got {e.status_code}")
        return "AuthenticationError, code=auth_rejected"
    except openai.APIStatusError as e:
        raise CheckFailed(f"expected AuthenticationError, got {type(e).__name__} "
                          f"(HTTP {e.status_code}): {e.body!r}")
    raise CheckFailed("an invalid key was accepted")


def main(argv):
    if len(argv) != 4:
        print("usage: openai_sdk_check.py BASE_URL API_KEY MODEL", file=sys.stderr)
        return 2
    base_url, api_key, model = argv[1], argv[2], argv[3]
    client = client_for(base_url, api_key)
    checks = [
        ("chat completion", lambda: check_non_streaming(client, model)),
        ("stream with include_usage", lambda: check_streaming_with_usage(client, model)),
        ("stream without include_usage", lambda: check_streaming_without_usage(client, model)),
        ("models.list", lambda: check_models_list(client, model)),
        ("invalid key", lambda: check_invalid_key(base_url, model)),
    ]
    print(f"openai sdk {openai.__version__} against {base_url} model={model}")
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
        except openai.OpenAIError as e:
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e} ({e.__cause__ or e.__context__})")
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
