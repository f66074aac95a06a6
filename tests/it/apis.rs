//! Every inbound API refuses and fails alike: for chat completions, Messages, Responses and
//! embeddings, a bad key, an unknown model, a budget refusal and an upstream 5xx each answer in
//! that API's own error shape with the status of the `Reason` table, move
//! `tollgate_chat_availability_total` by exactly one (under that `api` and reason, and nowhere
//! else), and write exactly one ledger row carrying the `api`.

use serde_json::{json, Value};

use crate::common::responses_upstream::ResponsesUpstream;
use crate::common::*;

/// One inbound API under test: its path, its `api` label, how to name a model in a minimal
/// body, and whether it answers errors in Anthropic's shape.
struct InboundApi {
    path: &'static str,
    api: &'static str,
    anthropic_shape: bool,
}

const APIS: &[InboundApi] = &[
    InboundApi {
        path: "/v1/chat/completions",
        api: "chat_completions",
        anthropic_shape: false,
    },
    InboundApi {
        path: "/v1/messages",
        api: "messages",
        anthropic_shape: true,
    },
    InboundApi {
        path: "/v1/responses",
        api: "responses",
        anthropic_shape: false,
    },
    InboundApi {
        path: "/v1/embeddings",
        api: "embeddings",
        anthropic_shape: false,
    },
];

impl InboundApi {
    fn body(&self, model: &str) -> Value {
        match self.api {
            "chat_completions" => {
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
            }
            "messages" => json!({"model": model, "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}]}),
            _ => json!({"model": model, "input": "hi"}),
        }
    }

    /// The model whose upstream answers 500 (Responses to an OpenAI provider is passed
    /// through to `/v1/responses`, so it has its own fake).
    fn failing_model(&self) -> &'static str {
        if self.api == "responses" {
            "resp/gpt-fail500"
        } else {
            "up/fail500"
        }
    }
}

/// One refusal or failure, and what every API must say for it.
struct Case {
    what: &'static str,
    reason: &'static str,
    status: u16,
    /// Anthropic's `error.type` for it.
    anthropic_type: &'static str,
}

const BAD_KEY: Case = Case {
    what: "a bad key",
    reason: "auth_rejected",
    status: 401,
    anthropic_type: "authentication_error",
};
const UNKNOWN_MODEL: Case = Case {
    what: "an unknown model",
    reason: "model_not_found",
    status: 404,
    anthropic_type: "not_found_error",
};
const BUDGET: Case = Case {
    what: "a budget refusal",
    reason: "budget_exceeded",
    status: 429,
    anthropic_type: "rate_limit_error",
};
const UPSTREAM_5XX: Case = Case {
    what: "an upstream 5xx",
    reason: "upstream_error",
    status: 502,
    anthropic_type: "overloaded_error",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_refuses_and_fails_in_its_own_shape_counted_once() {
    let resp_up = ResponsesUpstream::start().await;
    let opts = Opts {
        extra: format!(
            "{}[service_types.poor]\nmodels = [\"*\"]\n\n[service_types.poor.budget]\nlimit_usd = 0.0\nperiod = \"monthly\"\n\n",
            resp_up.provider_toml("resp")
        ),
        ..Opts::default()
    };
    let mut s = TestServer::sqlite(opts).await;

    for api in APIS {
        for (case, model, key, service_type) in [
            (&BAD_KEY, "up/ok", "tg-not-a-key", None),
            (&UNKNOWN_MODEL, "nope/none", ALICE_KEY, None),
            (&BUDGET, "up/ok", ALICE_KEY, Some("poor")),
            (&UPSTREAM_5XX, api.failing_model(), ALICE_KEY, None),
        ] {
            let context = format!("{} on {}", case.what, api.path);
            let before = s.metrics().await;
            let rid = new_request_id();
            let mut req = s
                .client
                .post(s.url(api.path))
                .header("x-request-id", &rid)
                .json(&api.body(model));
            req = if api.anthropic_shape {
                req.header("x-api-key", key)
            } else {
                req.bearer_auth(key)
            };
            if let Some(st) = service_type {
                req = req.header("x-tollgate-service-type", st);
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status().as_u16(), case.status, "{context}");
            let body: Value = resp.json().await.expect("a JSON error body");
            if api.anthropic_shape {
                assert_eq!(body["type"], "error", "{context}: {body}");
                assert_eq!(
                    body["error"]["type"], case.anthropic_type,
                    "{context}: {body}"
                );
                assert!(body["error"]["message"].is_string(), "{context}: {body}");
            } else {
                assert_eq!(body["error"]["code"], case.reason, "{context}: {body}");
                assert!(body["error"]["message"].is_string(), "{context}: {body}");
            }

            let labels = [
                ("protocol", "http"),
                ("api", api.api),
                ("reason", case.reason),
            ];
            s.expect_delta(&before, AVAILABILITY, &labels, 1.0).await;
            // Nowhere else: the whole family grew by exactly one.
            s.assert_delta_now(&before, AVAILABILITY, &[], 1.0).await;
            let row = s.ledger_row(&rid).await;
            assert_eq!(row.api, api.api, "{context}");
            assert_eq!(row.reason, case.reason, "{context}");
        }
    }
    s.shutdown().await;
}
