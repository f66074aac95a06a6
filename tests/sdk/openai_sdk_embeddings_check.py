#!/usr/bin/env python3
"""Check tollgate's `POST /v1/embeddings` with the official `openai` SDK, unmodified.

    $TOLLGATE_PYTHON tests/sdk/openai_sdk_embeddings_check.py BASE_URL API_KEY MODEL

BASE_URL is the API root including /v1 (http://127.0.0.1:PORT/v1), API_KEY a valid tollgate
credential, MODEL a model that embeds deterministically (e.g. mock/echo).

The SDK asks for base64 when the caller names no encoding_format and decodes it itself, so
the default call checks tollgate's base64 (little-endian f32) and `encoding_format="float"`
checks the float list; both must give the same vectors.

Prints one line per check, then `openai sdk embeddings: N passed, M failed`.
Exit status: 0 all passed, 1 a check failed, 2 bad usage or no openai package.
"""

import array
import base64
import math
import struct
import sys
import traceback

try:
    import openai
except ImportError:
    print("openai sdk embeddings: the `openai` package is not installed for " + sys.executable)
    sys.exit(2)

TIMEOUT_SECS = 30


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def check_list(resp, n, model, where):
    check(resp.object == "list", f"{where}: object should be list, got {resp.object!r}")
    check(resp.model == model, f"{where}: model should be the requested {model!r}, got {resp.model!r}")
    check(len(resp.data) == n, f"{where}: {n} embeddings expected, got {len(resp.data)}")
    for i, item in enumerate(resp.data):
        check(item.object == "embedding", f"{where}: data[{i}].object is {item.object!r}")
        check(item.index == i, f"{where}: data[{i}].index is {item.index}")
        check(isinstance(item.embedding, list) and item.embedding, f"{where}: data[{i}] has no vector")
        check(all(isinstance(x, float) for x in item.embedding), f"{where}: data[{i}] holds non-floats")
    check(resp.usage.prompt_tokens > 0, f"{where}: usage.prompt_tokens is {resp.usage.prompt_tokens}")
    check(resp.usage.total_tokens == resp.usage.prompt_tokens,
          f"{where}: total_tokens {resp.usage.total_tokens} != prompt_tokens {resp.usage.prompt_tokens}")


def check_default_base64(client, model):
    resp = client.embeddings.create(model=model, input="hello embeddings")
    check_list(resp, 1, model, "default (base64)")
    v = resp.data[0].embedding
    norm = math.sqrt(sum(x * x for x in v))
    check(abs(norm - 1.0) < 1e-4, f"the mock's vector should be a unit vector, norm {norm}")


def as_f32(values):
    """Floats rounded to f32, as the gateway holds them (a JSON float is read as a double)."""
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def check_float_equals_base64(client, model):
    texts = ["first text", "second text", "third"]
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    check_list(floats, 3, model, "float")
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=model, input=texts)
    check_list(decoded, 3, model, "default (base64)")
    # An explicit base64 is left to the caller to decode: little-endian f32.
    raw = client.embeddings.create(model=model, input=texts, encoding_format="base64")
    check(len(raw.data) == 3, f"base64: 3 embeddings expected, got {len(raw.data)}")
    for i in range(3):
        want = as_f32(floats.data[i].embedding)
        check(decoded.data[i].embedding == want, f"data[{i}]: SDK-decoded base64 differs from float")
        b = raw.data[i].embedding
        check(isinstance(b, str), f"data[{i}]: explicit base64 should be a string, got {type(b)}")
        unpacked = list(array.array("f", base64.b64decode(b)))
        check(unpacked == want, f"data[{i}]: explicit base64 differs from float")
    check(floats.data[0].embedding != floats.data[1].embedding, "different texts gave the same vector")


def check_dimensions_and_tokens(client, model):
    resp = client.embeddings.create(model=model, input="sized", dimensions=7, encoding_format="float")
    check(len(resp.data[0].embedding) == 7, f"dimensions=7 gave {len(resp.data[0].embedding)} values")
    resp = client.embeddings.create(model=model, input=[[1, 2, 3], [4, 5]])
    check_list(resp, 2, model, "token arrays")
    check(resp.usage.prompt_tokens == 5, f"token arrays: 5 prompt tokens expected, got {resp.usage.prompt_tokens}")


def check_errors(client, model):
    try:
        client.embeddings.create(model=model, input=[])
        raise CheckFailed("empty input was accepted")
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(body.get("code") == "invalid_request", f"empty input: code {body.get('code')!r}")
        check(body.get("param") == "input", f"empty input: param {body.get('param')!r}")
    try:
        client.embeddings.create(model="no-such/model", input="x")
        raise CheckFailed("an unknown model was accepted")
    except openai.NotFoundError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(body.get("code") == "model_not_found", f"unknown model: code {body.get('code')!r}")


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    base_url, api_key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=TIMEOUT_SECS)
    checks = [check_default_base64, check_float_equals_base64, check_dimensions_and_tokens, check_errors]
    failed = 0
    for c in checks:
        try:
            c(client, model)
            print(f"ok   {c.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL {c.__name__}")
            traceback.print_exc(file=sys.stdout)
    print(f"openai sdk embeddings: {len(checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
