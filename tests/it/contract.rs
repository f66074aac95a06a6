//! The provider contract: the same scenarios, through the gateway's OpenAI-compatible API,
//! against every provider kind: `openai` (the fake in `common::upstream`), `anthropic` (the
//! fake in `common::anthropic_upstream`) and `mock`. Each kind is one row of [`KINDS`], naming
//! the models its own fake answers each way; a scenario a kind cannot play (a mock has no
//! upstream to fail and no keys) is skipped for it, with a notice.
//!
//! | scenario | what every provider kind must do |
//! |---|---|
//! | `plain_completion` | 200, content, `finish_reason: stop`, usage > 0, resolved model, ledger row with the same tokens |
//! | `stream` | chunks then `[DONE]`; one usage chunk, last, when `include_usage` (none otherwise); ledger row |
//! | `upstream_5xx` | `upstream_error` (502) alone; in a chain it falls back (`fallback_total{reason="upstream_5xx"}`) |
//! | `caller_4xx` | `upstream_rejected` (400), also in a chain: no fallback |
//! | `rate_limited_key` | a 429 key cools down (`temporary`), the request succeeds on the next key, later requests skip it |
//! | `unauthorized_key` | a 401 key is disabled (`permanent`), likewise |
//! | `embeddings` | `POST /v1/embeddings`: vectors in OpenAI's shape, ledger row with the input tokens; a 5xx falls back along a chain. A kind that cannot embed answers `invalid_request` naming `model`, also in a chain: no fallback |
//!
//! Tests are named `<kind>::<scenario>` (`cargo test --test contract anthropic::`).

use serde_json::{json, Value};

use crate::common::anthropic_upstream::{self as claude_fake, AnthropicUpstream};
use crate::common::upstream::UPSTREAM_KEY;
use crate::common::*;

/// One provider kind and the models (`provider/model`) and keys its fake answers each way.
struct Kind {
    name: &'static str,
    /// Answers completions and streams.
    ok: &'static str,
    /// Answers with a 5xx.
    fail_5xx: Option<&'static str>,
    /// Answers with a 4xx the caller caused.
    fail_4xx: Option<&'static str>,
    /// `ok`'s model behind the pool [`rate_limited_key`, good key].
    rate_limited: Option<KeyCase>,
    /// `ok`'s model behind the pool [`unauthorized_key`, good key].
    unauthorized: Option<KeyCase>,
    /// Whether `ok` serves embeddings.
    embeds: bool,
}

/// A pool whose first key is refused and whose second is good.
struct KeyCase {
    model: &'static str,
    bad_key: &'static str,
    good_key: &'static str,
}

const OPENAI: Kind = Kind {
    name: "openai",
    ok: "up/ok",
    fail_5xx: Some("up/fail500"),
    fail_4xx: Some("up/fail400"),
    rate_limited: Some(KeyCase {
        model: "c_limited/ok",
        bad_key: "sk-rate-limited-c1",
        good_key: UPSTREAM_KEY,
    }),
    unauthorized: Some(KeyCase {
        model: "c_revoked/ok",
        bad_key: "sk-revoked-c1",
        good_key: UPSTREAM_KEY,
    }),
    embeds: true,
};

const ANTHROPIC: Kind = Kind {
    name: "anthropic",
    ok: "claude/claude-ok",
    fail_5xx: Some("claude/claude-overloaded"),
    fail_4xx: Some("claude/claude-invalid"),
    rate_limited: Some(KeyCase {
        model: "c_limited/claude-ok",
        bad_key: "sk-ant-rate-limited-c1",
        good_key: claude_fake::GOOD_KEY,
    }),
    unauthorized: Some(KeyCase {
        model: "c_revoked/claude-ok",
        bad_key: "sk-ant-revoked-c1",
        good_key: claude_fake::GOOD_KEY,
    }),
    embeds: false,
};

const MOCK: Kind = Kind {
    name: "mock",
    ok: "mock/echo",
    fail_5xx: None,
    fail_4xx: None,
    rate_limited: None,
    unauthorized: None,
    embeds: true,
};

/// Every row, for reading; the tests below are generated per row by [`contract_suite`].
#[allow(dead_code)]
const KINDS: [&Kind; 3] = [&OPENAI, &ANTHROPIC, &MOCK];

macro_rules! contract_suite {
    ($($module:ident => $kind:expr),* $(,)?) => {$(
        mod $module {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn plain_completion() { super::plain_completion(&$kind).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stream() { super::stream(&$kind).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn upstream_5xx() { super::upstream_5xx(&$kind).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn caller_4xx() { super::caller_4xx(&$kind).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rate_limited_key() {
                super::bad_key(&$kind, $kind.rate_limited.as_ref(), "temporary", "rate_limited").await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unauthorized_key() {
                super::bad_key(&$kind, $kind.unauthorized.as_ref(), "permanent", "unauthorized").await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embeddings() { super::embeddings(&$kind).await }
        }
    )*};
}

contract_suite!(openai => OPENAI, anthropic => ANTHROPIC, mock => MOCK);

// =============================================================================================
// the harness: a gateway configured for one kind

/// A gateway with only what `kind` needs (an `anthropic` provider in a config would keep the
/// other rows from starting on a build without it), and the kind's fake.
struct Harness {
    s: TestServer,
    claude: Option<AnthropicUpstream>,
}

fn provider_of(model: &str) -> &str {
    model.split_once('/').map(|(p, _)| p).unwrap_or(model)
}

fn model_of(model: &str) -> &str {
    model.split_once('/').map(|(_, m)| m).unwrap_or(model)
}

/// `[aliases.NAME]` falling back from `first` to mock/echo.
fn chain_to_mock(name: &str, first: &str) -> String {
    format!("[aliases.{name}]\ndescription = \"{first}, then mock\"\nchain = [\"{first}\", \"mock/echo\"]\n\n")
}

fn openai_pool(name: &str, keys: [&str; 2]) -> String {
    format!(
        "[providers.{name}]\nkind = \"openai\"\nbase_url = \"{{upstream}}\"\nkeys = [\"{}\", \"{}\"]\n\n",
        keys[0], keys[1]
    )
}

impl Harness {
    async fn start(kind: &'static Kind) -> Harness {
        // Health must not decide a scenario: every failure here is on purpose.
        let mut extra = String::from("[routing]\nunhealthy_after_failures = 100\n\n");
        let mut extra_upstream = String::new();
        let claude = match kind.name {
            "anthropic" => {
                let up = AnthropicUpstream::start().await;
                extra.push_str(&up.provider_toml("claude", &[claude_fake::GOOD_KEY]));
                for case in [&kind.rate_limited, &kind.unauthorized]
                    .into_iter()
                    .flatten()
                {
                    let name = provider_of(case.model);
                    extra.push_str(&up.provider_toml(name, &[case.bad_key, case.good_key]));
                }
                Some(up)
            }
            _ => {
                for case in [&kind.rate_limited, &kind.unauthorized]
                    .into_iter()
                    .flatten()
                {
                    let name = provider_of(case.model);
                    extra_upstream.push_str(&openai_pool(name, [case.bad_key, case.good_key]));
                }
                None
            }
        };
        if let Some(m) = kind.fail_5xx {
            extra.push_str(&chain_to_mock("contract_5xx", m));
        }
        if let Some(m) = kind.fail_4xx {
            extra.push_str(&chain_to_mock("contract_4xx", m));
        }
        let s = TestServer::sqlite(Opts {
            extra,
            extra_upstream,
            ..Opts::default()
        })
        .await;
        Harness { s, claude }
    }

    /// The requests for `model` (`provider/model`) marked `marker` that reached the kind's fake.
    fn seen(&self, model: &str, marker: &str) -> usize {
        self.keys_seen(model, marker).len()
    }

    /// The upstream keys of those requests, in arrival order.
    fn keys_seen(&self, model: &str, marker: &str) -> Vec<String> {
        let model = model_of(model);
        match &self.claude {
            Some(up) => up
                .find_all(model, marker)
                .iter()
                .map(|e| e.header("x-api-key").unwrap_or_default())
                .collect(),
            None => self
                .s
                .upstream
                .requests_for(model)
                .iter()
                .filter(|r| r.body["messages"].to_string().contains(marker))
                .map(|r| {
                    let auth = r.header("authorization").unwrap_or_default();
                    auth.strip_prefix("Bearer ").unwrap_or(&auth).to_owned()
                })
                .collect(),
        }
    }

    async fn shutdown(mut self) {
        self.s.shutdown().await;
    }
}

fn skip(kind: &Kind, scenario: &str) {
    eprintln!(
        "SKIPPED: the {} provider kind cannot play `{scenario}`",
        kind.name
    );
}

async fn ok_json(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts an OpenAI usage object with tokens on both sides; `(prompt, completion)`.
fn usage_of(v: &Value, what: &str) -> (i64, i64) {
    let p = v["prompt_tokens"].as_i64().unwrap_or(0);
    let c = v["completion_tokens"].as_i64().unwrap_or(0);
    assert!(p > 0 && c > 0, "{what}: usage must count both sides: {v}");
    assert_eq!(v["total_tokens"].as_i64(), Some(p + c), "{what}: {v}");
    (p, c)
}

fn chunks_of(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("not JSON ({err}): {e}")))
        .collect()
}

// =============================================================================================
// the scenarios

async fn plain_completion(kind: &'static Kind) {
    let h = Harness::start(kind).await;
    let before = h.s.metrics().await;
    let rid = new_request_id();
    let resp = h.s.chat(&chat_body(kind.ok, &rid), Some(&rid)).await;
    let resolved = resp
        .headers()
        .get("x-tollgate-resolved-model")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = ok_json(resp).await;
    assert_eq!(resolved.as_deref(), Some(kind.ok));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], kind.ok, "{body}");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!content.trim().is_empty(), "empty content: {body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let (p, c) = usage_of(&body["usage"], "completion");

    let row = h.s.ledger_row(&rid).await;
    assert_eq!(row.resolved_model.as_deref(), Some(kind.ok));
    assert_eq!(
        (row.outcome.as_str(), row.reason.as_str()),
        ("success", "success")
    );
    assert_eq!((row.prompt_tokens, row.completion_tokens), (p, c));
    assert!(!row.stream);
    h.s.expect_delta(
        &before,
        AVAILABILITY,
        &[("protocol", "http"), ("outcome", "success")],
        1.0,
    )
    .await;
    h.s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
    h.shutdown().await;
}

async fn stream(kind: &'static Kind) {
    let h = Harness::start(kind).await;
    for include_usage in [true, false] {
        let rid = new_request_id();
        let mut body = chat_body(kind.ok, &rid);
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = h.s.chat(&body, Some(&rid)).await;
        assert_eq!(resp.status(), 200);
        let (events, end) = SseReader::new(resp).collect().await;
        assert_eq!(end, SseEvent::End, "{events:?}");
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{events:?}"
        );
        let chunks = chunks_of(&events);
        assert!(chunks.iter().all(|c| c["model"] == kind.ok), "{chunks:#?}");
        let text: String = chunks
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect();
        assert!(!text.trim().is_empty(), "no streamed content: {events:?}");
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("stop")], "{events:?}");
        let usage: Vec<usize> = (0..chunks.len())
            .filter(|&i| !chunks[i]["usage"].is_null())
            .collect();
        let row = h.s.ledger_row(&rid).await;
        assert!(row.stream);
        assert_eq!(row.outcome, "success");
        assert!(
            row.prompt_tokens > 0 && row.completion_tokens > 0,
            "{row:?}"
        );
        if include_usage {
            assert_eq!(
                usage,
                [chunks.len() - 1],
                "one usage chunk, last: {events:?}"
            );
            let last = chunks.last().unwrap();
            assert_eq!(last["choices"], json!([]), "{last}");
            let (p, c) = usage_of(&last["usage"], "usage chunk");
            assert_eq!((row.prompt_tokens, row.completion_tokens), (p, c));
        } else {
            assert!(usage.is_empty(), "usage only when asked: {events:?}");
        }
    }
    h.shutdown().await;
}

async fn upstream_5xx(kind: &'static Kind) {
    let Some(failing) = kind.fail_5xx else {
        return skip(kind, "upstream_5xx");
    };
    let h = Harness::start(kind).await;
    let before = h.s.metrics().await;
    let rid = new_request_id();
    let resp = h.s.chat(&chat_body(failing, &rid), Some(&rid)).await;
    expect_http_error(resp, 502, "upstream_error").await;
    assert_eq!(h.seen(failing, &rid), 1);
    let row = h.s.ledger_row(&rid).await;
    assert_eq!(
        (row.outcome.as_str(), row.reason.as_str()),
        ("failure", "upstream_error")
    );

    let rid = new_request_id();
    let body = ok_json(h.s.chat(&chat_body("contract_5xx", &rid), Some(&rid)).await).await;
    assert_eq!(body["model"], "mock/echo", "{body}");
    assert_eq!(
        h.seen(failing, &rid),
        1,
        "the failing entry was tried first"
    );
    assert_eq!(
        h.s.ledger_row(&rid).await.resolved_model.as_deref(),
        Some("mock/echo")
    );
    h.s.assert_delta_now(
        &before,
        "tollgate_fallback_total",
        &[
            ("from_model", failing),
            ("to_model", "mock/echo"),
            ("reason", "upstream_5xx"),
        ],
        1.0,
    )
    .await;
    h.shutdown().await;
}

fn embed_request(h: &Harness, model: &str, rid: &str) -> reqwest::RequestBuilder {
    h.s.client
        .post(h.s.url("/v1/embeddings"))
        .bearer_auth(ALICE_KEY)
        .header("x-request-id", rid)
        .json(&json!({"model": model, "input": [format!("first {rid}"), "second"]}))
}

async fn embeddings(kind: &'static Kind) {
    let h = Harness::start(kind).await;
    let before = h.s.metrics().await;
    let rid = new_request_id();
    let resp = embed_request(&h, kind.ok, &rid).send().await.unwrap();
    if !kind.embeds {
        let body = expect_http_error(resp, 400, "invalid_request").await;
        assert_eq!(body["error"]["param"], "model", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("does not serve embeddings"), "{body}");
        if let Some(failing) = kind.fail_5xx {
            // In a chain, the request is wrong for the target: no fallback to mock/echo.
            let rid = new_request_id();
            let resp = embed_request(&h, "contract_5xx", &rid)
                .send()
                .await
                .unwrap();
            expect_http_error(resp, 400, "invalid_request").await;
            let row = h.s.ledger_row(&rid).await;
            assert_eq!(row.resolved_model, None, "{failing}: {row:?}");
        }
        h.s.expect_delta(
            &before,
            AVAILABILITY,
            &[("protocol", "http"), ("reason", "invalid_request")],
            1.0 + f64::from(u8::from(kind.fail_5xx.is_some())),
        )
        .await;
        h.s.assert_delta_now(
            &before,
            AVAILABILITY,
            &[],
            1.0 + f64::from(u8::from(kind.fail_5xx.is_some())),
        )
        .await;
        return h.shutdown().await;
    }
    let resolved = resp
        .headers()
        .get("x-tollgate-resolved-model")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = ok_json(resp).await;
    assert_eq!(resolved.as_deref(), Some(kind.ok));
    assert_eq!(body["object"], "list", "{body}");
    assert_eq!(body["model"], kind.ok, "{body}");
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2, "{body}");
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i, "{body}");
        assert!(
            item["embedding"].as_array().is_some_and(|v| !v.is_empty()),
            "{body}"
        );
    }
    let p = body["usage"]["prompt_tokens"].as_i64().unwrap_or(0);
    assert!(p > 0, "{body}");
    assert_eq!(body["usage"]["total_tokens"].as_i64(), Some(p), "{body}");
    let row = h.s.ledger_row(&rid).await;
    assert_eq!(row.resolved_model.as_deref(), Some(kind.ok));
    assert_eq!((row.prompt_tokens, row.completion_tokens), (p, 0));

    if let Some(failing) = kind.fail_5xx {
        let rid = new_request_id();
        let resp = embed_request(&h, "contract_5xx", &rid)
            .send()
            .await
            .unwrap();
        let body = ok_json(resp).await;
        assert_eq!(body["model"], "contract_5xx", "{body}");
        assert_eq!(
            h.s.ledger_row(&rid).await.resolved_model.as_deref(),
            Some("mock/echo")
        );
        h.s.assert_delta_now(
            &before,
            "tollgate_fallback_total",
            &[
                ("from_model", failing),
                ("to_model", "mock/echo"),
                ("reason", "upstream_5xx"),
            ],
            1.0,
        )
        .await;
    }
    let sent = 1.0 + f64::from(u8::from(kind.fail_5xx.is_some()));
    h.s.expect_delta(
        &before,
        AVAILABILITY,
        &[("protocol", "http"), ("outcome", "success")],
        sent,
    )
    .await;
    h.s.assert_delta_now(&before, AVAILABILITY, &[], sent).await;
    h.shutdown().await;
}

async fn caller_4xx(kind: &'static Kind) {
    let Some(failing) = kind.fail_4xx else {
        return skip(kind, "caller_4xx");
    };
    let h = Harness::start(kind).await;
    let before = h.s.metrics().await;
    for model in [failing, "contract_4xx"] {
        let rid = new_request_id();
        let resp = h.s.chat(&chat_body(model, &rid), Some(&rid)).await;
        expect_http_error(resp, 400, "upstream_rejected").await;
        assert_eq!(h.seen(failing, &rid), 1, "{model}");
        let row = h.s.ledger_row(&rid).await;
        assert_eq!(
            (row.outcome.as_str(), row.reason.as_str()),
            ("excluded", "upstream_rejected"),
            "{model}"
        );
    }
    h.s.assert_delta_now(
        &before,
        "tollgate_fallback_total",
        &[("from_model", failing)],
        0.0,
    )
    .await;
    h.shutdown().await;
}

/// The `/v1/health` entry of `provider`'s key whose hint is `...` + the key's last 4 characters.
async fn key_state(s: &TestServer, provider: &str, key: &str) -> Value {
    let hint = format!("...{}", &key[key.len() - 4..]);
    let v = ok_json(s.client.get(s.url("/v1/health")).send().await.unwrap()).await;
    let p = v["providers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["provider"] == provider))
        .unwrap_or_else(|| panic!("provider {provider} missing from /v1/health: {v}"));
    p["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["hint"] == hint.as_str()).cloned())
        .unwrap_or_else(|| panic!("no key {hint} in {p}"))
}

async fn bad_key(kind: &'static Kind, case: Option<&KeyCase>, state: &str, reason: &str) {
    let Some(case) = case else {
        return skip(kind, &format!("a {reason} key"));
    };
    let h = Harness::start(kind).await;
    let provider = provider_of(case.model);
    let rid = new_request_id();
    ok_json(h.s.chat(&chat_body(case.model, &rid), Some(&rid)).await).await;
    assert_eq!(
        h.keys_seen(case.model, &rid),
        [case.bad_key, case.good_key],
        "the keys tried, in order"
    );
    let k = key_state(&h.s, provider, case.bad_key).await;
    assert_eq!(k["state"], state, "{k}");
    assert_eq!(k["reason"], reason, "{k}");
    assert_eq!(
        key_state(&h.s, provider, case.good_key).await["state"],
        "valid"
    );
    assert_eq!(h.s.ledger_row(&rid).await.outcome, "success");

    // Whatever key a later request's walk starts at, it never tries the bad key again.
    for _ in 0..2 {
        let rid = new_request_id();
        ok_json(h.s.chat(&chat_body(case.model, &rid), Some(&rid)).await).await;
        assert_eq!(h.keys_seen(case.model, &rid), [case.good_key]);
    }
    h.shutdown().await;
}
