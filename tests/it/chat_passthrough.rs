//! A chat completion stream to an `openai` provider passes through: the caller's body goes up
//! byte for byte but for `model` (and the `stream_options` tollgate needs for its accounting),
//! and the upstream's events come back byte for byte but for `model`.

use crate::common::upstream::{VERBATIM_STREAM, VERBATIM_USAGE};
use crate::common::*;

/// The upstream's events as the caller gets them: the keep-alive comment left out (a
/// translated stream has none either) and `model` the resolved `provider/model`.
fn passed_events() -> Vec<String> {
    VERBATIM_STREAM
        .iter()
        .filter(|e| !e.starts_with(':'))
        .map(|e| e.replace("{model}-2024-08-06", "up/verbatim"))
        .collect()
}

async fn stream_text(s: &TestServer, body: &str, rid: &str) -> String {
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", rid)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-tollgate-resolved-model")
            .and_then(|v| v.to_str().ok()),
        Some("up/verbatim")
    );
    resp.text().await.unwrap()
}

/// A caller that asks for usage gets every event as the upstream sent it, `"usage": null`
/// fields and the usage chunk included; its body reaches the upstream unchanged but for
/// `model`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_usage_passes_through_byte_for_byte() {
    let s = TestServer::start(Backend::Sqlite, Opts::default())
        .await
        .expect("SQLite");
    let rid = new_request_id();
    let body = format!(
        r#"{{ "stream":true, "model" : "up/verbatim","messages":[{{"role":"user","content":"hello {rid}"}}],
  "stream_options":{{"include_usage":true}}, "temperature": 0.50, "x_vendor": {{"b":1,"a":2}} }}"#
    );
    let text = stream_text(&s, &body, &rid).await;
    assert_eq!(text, passed_events().concat());
    let seen = s
        .upstream
        .find("verbatim", &rid)
        .expect("the upstream got it");
    assert_eq!(
        String::from_utf8_lossy(&seen.raw),
        body.replacen("\"up/verbatim\"", "\"verbatim\"", 1)
    );
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.outcome, "success");
    assert_eq!(row.api, "chat_completions");
    assert!(row.stream);
    assert_eq!((row.prompt_tokens, row.completion_tokens), VERBATIM_USAGE);
}

/// A caller that does not ask for usage: tollgate asks for it (its `stream_options` put first
/// in the caller's body), accounts the stream by it, and keeps it from the caller: the usage
/// chunk and each chunk's `"usage": null` are left out, every other byte is the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_usage_is_accounted_by_the_usage_it_does_not_see() {
    let s = TestServer::start(Backend::Sqlite, Opts::default())
        .await
        .expect("SQLite");
    let rid = new_request_id();
    let body = format!(
        r#"{{"model":"up/verbatim", "stream": true, "messages":[{{"role":"user","content":"hello {rid}"}}]}}"#
    );
    let text = stream_text(&s, &body, &rid).await;
    let expected: String = passed_events()
        .into_iter()
        .filter(|e| !e.contains("\"choices\":[]"))
        .map(|e| {
            e.replace(",\"usage\":null", "")
                .replace(", \"usage\" : null", "")
        })
        .collect();
    assert_eq!(text, expected);
    assert!(!text.contains("usage"), "{text}");
    let seen = s
        .upstream
        .find("verbatim", &rid)
        .expect("the upstream got it");
    assert_eq!(
        String::from_utf8_lossy(&seen.raw),
        body.replacen(
            "{\"model\":\"up/verbatim\"",
            "{\"stream_options\":{\"include_usage\":true},\"model\":\"verbatim\"",
            1
        )
    );
    let row = s.ledger_row(&rid).await;
    assert_eq!(row.outcome, "success");
    assert_eq!((row.prompt_tokens, row.completion_tokens), VERBATIM_USAGE);

    // A caller's `stream_options` without `include_usage: true` is translated instead (the
    // body is rewritten with it set): the answer is the same but for its bytes' spelling.
    let rid = new_request_id();
    let body = format!(
        r#"{{"model":"up/verbatim","stream":true,"stream_options":{{"include_usage":false}},"messages":[{{"role":"user","content":"hello {rid}"}}]}}"#
    );
    let text = stream_text(&s, &body, &rid).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("usage"), "{text}");
    assert!(text.contains(r#""content":"café ""#), "{text}");
    let seen = s
        .upstream
        .find("verbatim", &rid)
        .expect("the upstream got it");
    assert_eq!(
        seen.body.pointer("/stream_options/include_usage"),
        Some(&serde_json::json!(true))
    );
    let row = s.ledger_row(&rid).await;
    assert_eq!((row.prompt_tokens, row.completion_tokens), VERBATIM_USAGE);
}
