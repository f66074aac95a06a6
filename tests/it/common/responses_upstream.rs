//! A fake OpenAI Responses API (`POST /v1/responses`) for the pass-through tests: an axum server
//! on a random loopback port that records each request's raw bytes and answers fixed raw bytes
//! (odd whitespace included, so that a re-encoding would show), chosen by the model name:
//!
//! | model | behaviour |
//! |---|---|
//! | `gpt-ok` | [`body_for`] (a Response object, usage [`USAGE`]); streamed: [`events_for`] |
//! | `gpt-fail500` | 500 with an OpenAI error body |
//! | `gpt-failed` | streamed: `response.created`, one text delta, then `response.failed` |
//!
//! Keys: `Authorization: Bearer` [`GOOD_KEY`] is accepted; any other key gets 401.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use serde_json::Value;

pub const GOOD_KEY: &str = "sk-responses-good";
pub const TEXT: &str = "Hello from Responses";
/// input, cached input, output tokens of every `gpt-ok` answer.
pub const USAGE: (u64, u64, u64) = (21, 5, 9);

/// One exchange as the fake saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answer: Bytes,
}

/// A running fake.
#[derive(Clone)]
pub struct ResponsesUpstream {
    pub addr: SocketAddr,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
}

impl ResponsesUpstream {
    pub async fn start() -> ResponsesUpstream {
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(handle).with_state(exchanges.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind responses upstream");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ResponsesUpstream { addr, exchanges }
    }

    /// A `[providers.NAME]` table of kind `openai` for this fake.
    pub fn provider_toml(&self, name: &str) -> String {
        format!(
            "[providers.{name}]\nkind = \"openai\"\nbase_url = \"http://{}/v1\"\nkeys = [\"{GOOD_KEY}\"]\n\n",
            self.addr
        )
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }
}

/// The whole answer for `model`, exactly as sent.
pub fn body_for(model: &str) -> String {
    let (i, c, o) = USAGE;
    format!(
        "{{\n  \"id\": \"resp_up1\",\n  \"object\": \"response\",  \"created_at\": 1741476542,\n  \
         \"status\": \"completed\", \"model\":\"{model}\", \"x_vendor\": 1.50e0,\n  \"output\": [\
         {{\"type\":\"message\",\"id\":\"msg_up1\",\"status\":\"completed\",\"role\":\"assistant\",\
         \"content\":[{{\"type\":\"output_text\",\"text\":\"{TEXT}\",\"annotations\":[]}}]}}],\n  \
         \"parallel_tool_calls\": true, \"tool_choice\": \"auto\", \"tools\": [],\n  \
         \"usage\": {{\"input_tokens\": {i}, \"input_tokens_details\": {{\"cached_tokens\": {c}}}, \
         \"output_tokens\": {o}, \"output_tokens_details\": {{\"reasoning_tokens\": 0}}, \
         \"total_tokens\": {}}}\n}}",
        i + o
    )
}

/// The streamed answer for `model`: (event name, data) pairs, each sent as
/// `event: NAME\ndata: DATA\n\n`.
pub fn events_for(model: &str, failed: bool) -> Vec<(String, String)> {
    let (i, c, o) = USAGE;
    let resp = |status: &str, output: &str, usage: &str| {
        format!(
            "{{\"id\":\"resp_up2\",\"object\":\"response\",\"created_at\":1741476542,\
             \"status\":\"{status}\",\"model\":\"{model}\",\"output\":[{output}],\
             \"parallel_tool_calls\":true,\"tool_choice\":\"auto\",\"tools\":[],\"usage\":{usage}}}"
        )
    };
    let item = format!(
        "{{\"id\":\"msg_up2\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\
         \"content\":[{{\"type\":\"output_text\",\"text\":\"{TEXT}\",\"annotations\":[]}}]}}"
    );
    let usage = format!(
        "{{\"input_tokens\":{i},\"input_tokens_details\":{{\"cached_tokens\":{c}}},\
         \"output_tokens\":{o},\"output_tokens_details\":{{\"reasoning_tokens\":0}},\
         \"total_tokens\":{}}}",
        i + o
    );
    let mut ev = vec![
        ("response.created".to_string(), format!("{{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{}}}", resp("in_progress", "", "null"))),
        ("response.output_text.delta".to_string(), "{\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_up2\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello\",\"logprobs\":[]}".to_string()),
    ];
    if failed {
        let failed = resp("failed", "", "null").replace(
            "\"usage\":null",
            "\"usage\":null,\"error\":{\"code\":\"server_error\",\"message\":\"upstream broke\"}",
        );
        ev.push((
            "response.failed".to_string(),
            format!("{{\"type\":\"response.failed\",\"sequence_number\":2,\"response\":{failed}}}"),
        ));
        return ev;
    }
    ev.push(("response.output_text.delta".to_string(), format!("{{\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_up2\",\"output_index\":0,\"content_index\":0,\"delta\":\"{}\",\"logprobs\":[]}}", &TEXT[5..])));
    ev.push(("response.output_item.done".to_string(), format!("{{\"type\":\"response.output_item.done\",\"sequence_number\":3,\"output_index\":0,\"item\":{item}}}")));
    ev.push((
        "response.completed".to_string(),
        format!(
            "{{\"type\":\"response.completed\",\"sequence_number\":4,\"response\":{}}}",
            resp("completed", &item, &usage)
        ),
    ));
    ev
}

/// The events as SSE bytes.
pub fn sse_text(events: &[(String, String)]) -> String {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect()
}

async fn handle(
    State(exchanges): State<Arc<Mutex<Vec<Exchange>>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = v["model"].as_str().unwrap_or("").to_string();
    let stream = v["stream"].as_bool().unwrap_or(false);
    let auth = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let (status, content_type, answer) = if uri.path() != "/v1/responses" {
        (
            StatusCode::NOT_FOUND,
            "application/json",
            error("no such route"),
        )
    } else if auth != format!("Bearer {GOOD_KEY}") {
        (
            StatusCode::UNAUTHORIZED,
            "application/json",
            error("bad key"),
        )
    } else if model == "gpt-fail500" {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            error("boom"),
        )
    } else if stream {
        let events = events_for(&model, model == "gpt-failed");
        (StatusCode::OK, "text/event-stream", sse_text(&events))
    } else {
        (StatusCode::OK, "application/json", body_for(&model))
    };
    let answer = Bytes::from(answer);
    exchanges.lock().unwrap().push(Exchange {
        path: uri.path().to_string(),
        headers,
        body,
        answer: answer.clone(),
    });
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from(answer))
        .unwrap()
}

fn error(message: &str) -> String {
    format!("{{\"error\":{{\"message\":\"{message}\",\"type\":\"server_error\",\"param\":null,\"code\":null}}}}")
}
