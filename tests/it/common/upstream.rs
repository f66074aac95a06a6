//! A real OpenAI-compatible upstream for the integration tests: an axum server on a random
//! loopback port whose behaviour is chosen by the model name the gateway sends it.
//!
//! | model      | behaviour |
//! |------------|-----------|
//! | `ok`       | chat.completion, usage 11/7 (SSE like `stream` when the request says `stream: true`) |
//! | `stream`   | SSE: 5 content chunks `s0`..`s4`, a usage chunk (choices `[]`, usage 11/5) when `stream_options.include_usage`, `[DONE]` (a chat.completion when not streaming) |
//! | `fail500`  | 500 with an OpenAI error body |
//! | `fail400`  | 400 with an OpenAI error body whose message is [`FAIL400_MESSAGE`] |
//! | `stall`    | never answers |
//! | `reset`    | 200, two chunks (or half a JSON body), then the body errors: the connection is cut |
//! | `gated`    | SSE: chunk `g0`, then waits for [`Upstream::release_gate`] (per request marker), then `g1`, `g2` (20 ms apart), usage, `[DONE]` |
//! | `badjson`  | 200 `application/json` whose body is not JSON |
//! | `verbatim` | the bytes of [`VERBATIM_ANSWER`], or of [`VERBATIM_STREAM`] when streaming |
//! | `tools`    | SSE: a text chunk, then two tool calls (`get_weather`, its arguments in three pieces, and `get_time`), `finish_reason: tool_calls`, usage (when asked), `[DONE]` |
//!
//! `POST /v1/embeddings` answers `ok*` with [`EMBED_DIMS`] values per input and
//! `prompt_tokens` = [`EMBED_TOKENS_PER_INPUT`] per input, `fail500` and `fail400` as above.
//!
//! Keys: [`UPSTREAM_KEY`] is accepted; keys starting with [`RATE_LIMITED_KEY_PREFIX`] get 429
//! with `Retry-After: 60`; any other key gets 401.
//!
//! Every request (path, headers, body) is recorded before it is answered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// The upstream key the gateway must present (`keys = [...]` in the test config).
pub const UPSTREAM_KEY: &str = "sk-upstream-test";
/// Keys starting with this get 429 with `Retry-After: 60`; any other key but [`UPSTREAM_KEY`]
/// gets 401.
pub const RATE_LIMITED_KEY_PREFIX: &str = "sk-rate-limited";
/// Content of the non-streaming `ok` answer.
pub const OK_CONTENT: &str = "Hello from upstream";
/// Message of the `fail400` error body; the gateway passes it on to the caller.
pub const FAIL400_MESSAGE: &str = "max_tokens is too large for this model (upstream says)";
pub const OK_USAGE: (i64, i64) = (11, 7);
/// The answer to model `verbatim`, as sent (`{model}` is the model asked for): spacing, key
/// order, a number's spelling and fields no translation knows, for a caller to get unchanged.
pub const VERBATIM_ANSWER: &str = r#"{ "object":"chat.completion", "id" : "chatcmpl-v",
  "model":"{model}-2024-08-06","created":1700000000, "service_tier": "default",
  "choices":[ {"index":0,"message":{"role":"assistant","content":"caf\u00e9 verbatim","refusal":null,
    "annotations":[]},"logprobs":null,"finish_reason":"length"} ],
  "usage":{"prompt_tokens":13,"completion_tokens":3,"total_tokens":16,
    "prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0}}, "x_weight": 1.50e0 }"#;
/// The events of model `verbatim` streamed, as sent (`{model}` as above): as OpenAI streams
/// with `stream_options.include_usage`, every chunk says `"usage":null` until the usage chunk;
/// a keep-alive comment, CRLF line ends, and fields and spellings no translation knows.
pub const VERBATIM_STREAM: [&str; 6] = [
    "data: {\"id\":\"chatcmpl-vs\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_v\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    ": keep-alive\n\n",
    "data: { \"id\" : \"chatcmpl-vs\", \"usage\" : null , \"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"caf\\u00e9 \"},\"logprobs\":null,\"finish_reason\":null}], \"x_weight\": 1.50e0 }\r\n\r\n",
    "data: {\"id\":\"chatcmpl-vs\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"verbatim\"},\"logprobs\":null,\"finish_reason\":\"length\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-vs\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":13,\"completion_tokens\":3,\"total_tokens\":16,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
];
/// `verbatim-nousage` answers like `verbatim`, without `usage`.
pub const VERBATIM_USAGE: (i64, i64) = (13, 3);
pub const STREAM_USAGE: (i64, i64) = (11, 5);
pub const STREAM_CHUNKS: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
/// Values in each vector of an embeddings answer.
pub const EMBED_DIMS: usize = 3;
/// Prompt tokens an embeddings answer reports per input.
pub const EMBED_TOKENS_PER_INPUT: u64 = 2;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    /// The body as JSON (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The body as received.
    pub raw: Bytes,
}

impl Recorded {
    pub fn model(&self) -> &str {
        self.body.get("model").and_then(Value::as_str).unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    /// One gate per marker (the last message's content without its `hello ` prefix).
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Shared {
    fn gate(&self, marker: &str) -> Arc<Semaphore> {
        self.gates
            .lock()
            .unwrap()
            .entry(marker.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(0)))
            .clone()
    }
}

/// A running upstream test server. Dropping it leaves the task to die with the test runtime.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            gates: Mutex::new(HashMap::new()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, shared }
    }

    /// `http://127.0.0.1:PORT/v1`, the provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Requests whose upstream model is `model`.
    pub fn requests_for(&self, model: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.model() == model)
            .collect()
    }

    /// The request for `model` whose first message content contains `marker`.
    pub fn find(&self, model: &str, marker: &str) -> Option<Recorded> {
        self.requests_for(model).into_iter().find(|r| {
            r.body["messages"]
                .as_array()
                .map(|m| m.iter().any(|m| m.to_string().contains(marker)))
                .unwrap_or(false)
        })
    }

    /// Lets the `gated` response of the request marked `marker` (see `chat_body`) go on past
    /// its first chunk. Each request has its own gate, so releasing one never frees another.
    pub fn release_gate(&self, marker: &str) {
        self.shared.gate(marker).add_permits(1);
    }
}

fn error_body(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-upstream-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        // Upstreams answer with their own (dated) name; the gateway must rewrite it.
        "model": format!("{model}-2024-08-06"),
        "system_fingerprint": "fp_upstream_test",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": OK_CONTENT},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": OK_USAGE.0, "completion_tokens": OK_USAGE.1, "total_tokens": OK_USAGE.0 + OK_USAGE.1}
    })
}

fn chunk(model: &str, content: Option<&str>, finish: Option<&str>) -> Bytes {
    let delta = match content {
        Some(c) => json!({"content": c}),
        None => json!({}),
    };
    let v = json!({
        "id": "chatcmpl-upstream-s",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": format!("{model}-2024-08-06"),
        "system_fingerprint": "fp_upstream_test",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage_chunk(model: &str, usage: (i64, i64)) -> Bytes {
    let v = json!({
        "id": "chatcmpl-upstream-s",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": format!("{model}-2024-08-06"),
        "choices": [],
        "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1}
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

fn sse(body: Body) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}

/// An embeddings answer (floats) for `ok*`, or the failure the model names.
fn embeddings(model: &str, body: &Value) -> Response {
    match model {
        "fail500" => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_body("server error", "server_error", "server_error"),
            )
        }
        m if !m.starts_with("ok") => {
            return json_response(
                StatusCode::BAD_REQUEST,
                error_body(FAIL400_MESSAGE, "invalid_request_error", "invalid_value"),
            )
        }
        _ => {}
    }
    let n = match &body["input"] {
        Value::Array(a) if !a.first().is_some_and(Value::is_number) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let v: Vec<f32> = (0..EMBED_DIMS).map(|j| (i + j) as f32 * 0.25).collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let tokens = EMBED_TOKENS_PER_INPUT * n as u64;
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data, "model": format!("{model}-embed"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.requests.lock().unwrap().push(Recorded {
        path: uri.path().to_owned(),
        headers: headers.clone(),
        body: json_body.clone(),
        raw: body.clone(),
    });

    if uri.path() != "/v1/chat/completions" && uri.path() != "/v1/embeddings" {
        return json_response(
            StatusCode::NOT_FOUND,
            error_body(
                &format!("no route {}", uri.path()),
                "invalid_request_error",
                "not_found",
            ),
        );
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth.starts_with(&format!("Bearer {RATE_LIMITED_KEY_PREFIX}")) {
        let mut resp = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            error_body(
                "Rate limit reached for requests",
                "requests",
                "rate_limit_exceeded",
            ),
        );
        resp.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("60"));
        return resp;
    }
    if auth != format!("Bearer {UPSTREAM_KEY}") {
        return json_response(
            StatusCode::UNAUTHORIZED,
            error_body(
                "Incorrect API key provided",
                "invalid_request_error",
                "invalid_api_key",
            ),
        );
    }

    let model = json_body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if uri.path() == "/v1/embeddings" {
        return embeddings(&model, &json_body);
    }
    let stream = json_body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let include_usage = json_body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    // `ok-anything` behaves like `ok` (a model the gateway's config does not list).
    let kind = if model.starts_with("ok") {
        "ok"
    } else {
        model.as_str()
    };
    let marker = json_body
        .pointer("/messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .map(|c| c.strip_prefix("hello ").unwrap_or(c).to_owned())
        .unwrap_or_default();

    match kind {
        "ok" | "stream" if !stream => json_response(StatusCode::OK, completion(&model)),
        "verbatim" if stream => {
            let events = VERBATIM_STREAM.map(|e| Bytes::from(e.replace("{model}", &model)));
            sse(Body::from_stream(stream::iter(
                events.into_iter().map(Ok::<_, Infallible>),
            )))
        }
        "verbatim" | "verbatim-nousage" => {
            let mut text = VERBATIM_ANSWER.replace("{model}", &model);
            if kind == "verbatim-nousage" {
                let start = text.find(r#""usage""#).unwrap();
                let end = text.find(r#", "x_weight""#).unwrap();
                text.replace_range(start..end + 2, "");
            }
            ([("content-type", "application/json")], text).into_response()
        }
        "ok" | "stream" => {
            let mut parts: Vec<Bytes> = STREAM_CHUNKS
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let finish = (i == STREAM_CHUNKS.len() - 1).then_some("stop");
                    chunk(&model, Some(c), finish)
                })
                .collect();
            if include_usage {
                parts.push(usage_chunk(&model, STREAM_USAGE));
            }
            parts.push(done());
            sse(Body::from_stream(stream::iter(
                parts.into_iter().map(Ok::<_, Infallible>),
            )))
        }
        "tools" if stream => {
            let c = |delta: Value, finish: Option<&str>| {
                let v = json!({"id": "chatcmpl-upstream-tools", "object": "chat.completion.chunk",
                    "created": 1, "model": "tools",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                Bytes::from(format!("data: {v}\n\n"))
            };
            let call = |index: u32, args: &str, head: Option<&str>| {
                let mut tc = json!({"index": index, "function": {"arguments": args}});
                if let Some(name) = head {
                    tc["id"] = json!(format!("call_{name}"));
                    tc["type"] = json!("function");
                    tc["function"]["name"] = json!(name);
                }
                json!({"tool_calls": [tc]})
            };
            let mut parts = vec![
                c(json!({"role": "assistant", "content": "Checking."}), None),
                c(call(0, "", Some("get_weather")), None),
                c(call(0, "{\"locati", None), None),
                c(call(0, "on\": \"Paris\"}", None), None),
                c(call(1, "", Some("get_time")), None),
                c(call(1, "{\"city\": \"Paris\"}", None), None),
                c(json!({}), Some("tool_calls")),
            ];
            if include_usage {
                parts.push(usage_chunk(&model, STREAM_USAGE));
            }
            parts.push(done());
            sse(Body::from_stream(stream::iter(
                parts.into_iter().map(Ok::<_, Infallible>),
            )))
        }
        "fail500" => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            error_body(
                "The server had an error while processing your request.",
                "server_error",
                "server_error",
            ),
        ),
        "fail400" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": FAIL400_MESSAGE, "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}),
        ),
        "stall" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "reset" => {
            let first: Vec<Result<Bytes, std::io::Error>> = if stream {
                vec![
                    Ok(chunk(&model, Some("r0"), None)),
                    Ok(chunk(&model, Some("r1"), None)),
                ]
            } else {
                vec![Ok(Bytes::from_static(
                    b"{\"id\":\"chatcmpl-upstream-1\",\"object\":\"chat.comp",
                ))]
            };
            let body = stream::iter(first).chain(stream::once(async {
                // Give the first part time to leave before the connection is cut.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "upstream reset",
                ))
            }));
            let ctype = if stream {
                "text/event-stream"
            } else {
                "application/json"
            };
            Response::builder()
                .status(200)
                .header("content-type", ctype)
                .body(Body::from_stream(body))
                .unwrap()
        }
        "gated" => {
            let first =
                stream::once(async move { Ok::<_, Infallible>(chunk("gated", Some("g0"), None)) });
            let rest = stream::once(async move {
                // Wait until the test opens the gate; then the rest, paced.
                let permit = shared.gate(&marker).acquire_owned().await.expect("gate");
                permit.forget();
                stream::iter(vec![
                    Some(chunk("gated", Some("g1"), None)),
                    Some(chunk("gated", Some("g2"), Some("stop"))),
                    include_usage.then(|| usage_chunk("gated", (11, 3))),
                    Some(done()),
                ])
                .filter_map(|c| async move { c })
                .then(|c| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, Infallible>(c)
                })
            })
            .flatten();
            sse(Body::from_stream(first.chain(rest)))
        }
        "badjson" => (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"id\": \"chatcmpl-1\", \"choices\": [ this is not json",
        )
            .into_response(),
        other => json_response(
            StatusCode::NOT_FOUND,
            error_body(
                &format!("The model `{other}` does not exist"),
                "invalid_request_error",
                "model_not_found",
            ),
        ),
    }
}
