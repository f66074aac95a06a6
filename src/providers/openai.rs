//! Any OpenAI-compatible server: chat completions, embeddings, and the Responses API natively
//! (the caller's `/v1/responses` body passed through to `{base_url}/responses`).

use std::sync::Arc;

use futures_util::StreamExt;

use super::http::{upstream_url, HttpUpstream, KeyHeader, UpstreamResponse, UpstreamUrl};
use super::{
    Capabilities, DeltaStream, EmbedCall, KeyPool, KeyPoolObserver, NativeCall, NativeChunk,
    NativeResponse, NativeStream, Provider, UpstreamCall, UpstreamError,
};
use crate::api::native::{replace_span, replace_string, with_model, without_null_member};
use crate::api::{
    openai_chat, openai_embeddings, openai_responses, Api, ChatResponse, EmbeddingsResponse,
};
use crate::clock::Clock;
use crate::config::{HttpUpstreamConfig, ProviderKind};

/// An OpenAI-compatible upstream.
pub struct OpenAiProvider {
    chat_url: UpstreamUrl,
    embeddings_url: UpstreamUrl,
    responses_url: UpstreamUrl,
    http: HttpUpstream,
}

impl OpenAiProvider {
    /// Builds the client; the base URL was validated with the config.
    pub fn new(
        name: &str,
        cfg: &HttpUpstreamConfig,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Result<Self, String> {
        Ok(Self {
            chat_url: upstream_url(name, format!("{}/chat/completions", cfg.base_url))?,
            embeddings_url: upstream_url(name, format!("{}/embeddings", cfg.base_url))?,
            responses_url: upstream_url(name, format!("{}/responses", cfg.base_url))?,
            http: HttpUpstream::new(name, cfg, KeyHeader::Bearer, clock, observer)?,
        })
    }
}

impl OpenAiProvider {
    /// POSTs the caller's body (Responses or chat completions) with only `model` changed to the
    /// upstream's name.
    async fn send_native(
        &self,
        call: NativeCall<'_>,
        deadline: std::time::Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let body = replace_string(&call.native.body, &["model"], call.model).ok_or_else(|| {
            UpstreamError::Unsupported("the request body has no `model` string".into())
        })?;
        let url = match call.native.api {
            Api::ChatCompletions => &self.chat_url,
            _ => &self.responses_url,
        };
        self.http
            .post(url, call.request_id, call.trace, &[], body.into(), deadline)
            .await
    }
}

/// One pass-through Responses event with data: read for accounting, its bytes kept,
/// `response.model` rewritten where the event carries the response. `response.failed` and
/// `error` end the stream as a failure.
fn native_event(
    raw: bytes::Bytes,
    data: &str,
    answer_model: &str,
) -> Result<NativeChunk, UpstreamError> {
    if data.trim() == "[DONE]" {
        return Ok(NativeChunk {
            bytes: raw,
            finished: true,
            ..NativeChunk::default()
        });
    }
    let v: serde_json::Value = serde_json::from_str(data)
        .map_err(|e| UpstreamError::BadResponse(format!("bad event: {e}")))?;
    let ty = v
        .get("type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let message = |v: &serde_json::Value| {
        v.get("message")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no message")
            .to_string()
    };
    match ty {
        "error" => {
            return Err(UpstreamError::BadResponse(format!(
                "error: {}",
                message(&v)
            )))
        }
        "response.failed" => {
            let e = &v["response"]["error"];
            return Err(UpstreamError::BadResponse(format!(
                "response.failed: {}",
                message(e)
            )));
        }
        _ => {}
    }
    let response = v.get("response");
    let bytes = if response
        .and_then(|r| r.get("model"))
        .is_some_and(|m| m.is_string())
    {
        super::sse::rewrite_event_data(&raw, data, &["response", "model"], answer_model)
            .unwrap_or(raw)
    } else {
        raw
    };
    let finished = matches!(ty, "response.completed" | "response.incomplete");
    let generated_chars = if ty.ends_with(".delta") {
        v.get("delta")
            .and_then(serde_json::Value::as_str)
            .map_or(0, str::len)
    } else {
        0
    };
    Ok(NativeChunk {
        bytes,
        usage: finished
            .then(|| response.and_then(|r| r.get("usage")))
            .flatten()
            .and_then(openai_responses::usage),
        generated_chars,
        finished,
        ..NativeChunk::default()
    })
}

/// Reads a passed-through chat stream's events for accounting, as the translated stream reads
/// them: each chunk read by `openai_chat::read_chunk` (which builds nothing), its bytes kept
/// with `model` rewritten (and, when the caller did not ask for usage, the usage chunk and each
/// chunk's `"usage": null` kept from it). An error chunk, a bad chunk, or `[DONE]` before any
/// finish reason ends the stream as a failure.
struct ChatEvents {
    answer_model: String,
    hide_usage: bool,
    /// A choice has finished.
    finished: bool,
    /// A failure has been passed on: nothing more is for the caller.
    over: bool,
}

impl ChatEvents {
    fn next(
        &mut self,
        item: Result<super::http::DataEvent, UpstreamError>,
    ) -> Option<Result<NativeChunk, UpstreamError>> {
        if self.over {
            return None;
        }
        let out = match item {
            Ok((raw, data)) => self.event(raw, &data),
            Err(e) => Err(e),
        };
        self.over = out.is_err();
        Some(out)
    }

    fn event(&mut self, raw: bytes::Bytes, data: &str) -> Result<NativeChunk, UpstreamError> {
        if data.trim() == "[DONE]" {
            if !self.finished {
                return Err(UpstreamError::BadResponse(
                    "the stream ended before the answer was complete".into(),
                ));
            }
            return Ok(NativeChunk {
                bytes: raw,
                ..NativeChunk::default()
            });
        }
        let facts = openai_chat::read_chunk(data)
            .map_err(|e| UpstreamError::BadResponse(format!("bad chunk: {e}")))?;
        let finished = !facts.finish_reasons.is_empty();
        self.finished |= finished;
        let bytes = if self.hide_usage && facts.usage_only {
            bytes::Bytes::new()
        } else {
            self.caller_bytes(raw, data)
        };
        Ok(NativeChunk {
            bytes,
            usage: facts.usage,
            generated_chars: facts.generated_chars,
            finished,
            finish_reasons: facts.finish_reasons,
        })
    }

    /// The chunk's bytes for the caller: `model` rewritten, `"usage": null` taken out when the
    /// caller did not ask for usage; as they came when neither applies.
    fn caller_bytes(&self, raw: bytes::Bytes, data: &str) -> bytes::Bytes {
        let renamed = replace_string(data.as_bytes(), &["model"], &self.answer_model);
        let cut = self
            .hide_usage
            .then(|| without_null_member(renamed.as_deref().unwrap_or(data.as_bytes()), "usage"))
            .flatten();
        match cut.or(renamed) {
            Some(new_data) => super::sse::with_event_data(&raw, data, &new_data).unwrap_or(raw),
            None => raw,
        }
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiProvider {
    fn native(&self, api: Api) -> bool {
        matches!(api, Api::Responses | Api::ChatCompletions)
    }

    async fn native_complete(&self, call: NativeCall<'_>) -> Result<NativeResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send_native(call, deadline).await?;
        let bytes = self.http.body(resp, deadline).await?;
        if call.native.api == Api::ChatCompletions {
            let facts = openai_chat::read_answer(&bytes).map_err(UpstreamError::BadResponse)?;
            let body = match facts.model_span {
                Some(span) => replace_span(&bytes, span, call.answer_model).into(),
                None => bytes,
            };
            return Ok(NativeResponse {
                body,
                usage: facts.usage,
                generated_chars: facts.generated_chars,
                response_model: facts.model,
                finish_reasons: facts.finish_reasons,
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| UpstreamError::BadResponse(format!("the answer is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(UpstreamError::BadResponse(
                "the answer is not a response object".into(),
            ));
        }
        let body = with_model(bytes, call.answer_model);
        Ok(NativeResponse {
            usage: v.get("usage").and_then(openai_responses::usage),
            generated_chars: openai_responses::generated_chars(&v),
            response_model: v.get("model").and_then(|m| m.as_str()).map(str::to_string),
            finish_reasons: Vec::new(),
            body,
        })
    }

    async fn native_stream(&self, call: NativeCall<'_>) -> Result<NativeStream, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send_native(call, deadline).await?;
        if call.native.api == Api::ChatCompletions {
            let mut reader = ChatEvents {
                answer_model: call.answer_model.to_string(),
                hide_usage: call.native.hide_usage,
                finished: false,
                over: false,
            };
            let events = self
                .http
                .sse_raw(resp, deadline)
                .filter_map(move |item| futures_util::future::ready(reader.next(item)));
            return Ok(Box::pin(events));
        }
        let answer_model = call.answer_model.to_string();
        let mut over = false;
        let events = self.http.sse_raw(resp, deadline).filter_map(move |item| {
            let out = (!over)
                .then(|| item.and_then(|(raw, data)| native_event(raw, &data, &answer_model)));
            // After a failure nothing more is for the caller; a trailing `[DONE]` still is.
            over |= matches!(out, Some(Err(_)));
            futures_util::future::ready(out)
        });
        Ok(Box::pin(events))
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }

    fn key_pool(&self) -> Option<&KeyPool> {
        Some(self.http.keys())
    }

    fn capabilities(&self, _model: &str) -> Capabilities {
        // An OpenAI-compatible server may serve any model it names; it says no itself.
        Capabilities {
            chat: true,
            stream: true,
            embeddings: true,
        }
    }

    async fn complete(&self, call: UpstreamCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let body = openai_chat::encode_request(call.request, call.model, false);
        let resp = self
            .http
            .post(
                &self.chat_url,
                call.request_id,
                call.trace,
                &[],
                body.into(),
                deadline,
            )
            .await?;
        let bytes = self.http.body(resp, deadline).await?;
        openai_chat::parse_response(&bytes).map_err(UpstreamError::BadResponse)
    }

    /// Asks for usage so that every stream can be accounted.
    async fn stream(&self, call: UpstreamCall<'_>) -> Result<DeltaStream, UpstreamError> {
        let deadline = self.http.deadline();
        let body = openai_chat::encode_request(call.request, call.model, true);
        let resp = self
            .http
            .post(
                &self.chat_url,
                call.request_id,
                call.trace,
                &[],
                body.into(),
                deadline,
            )
            .await?;
        let mut failed = false;
        let deltas = self
            .http
            .sse_data(resp, deadline)
            .take_while(|item| {
                let done = matches!(item, Ok(data) if data.trim() == "[DONE]");
                futures_util::future::ready(!done)
            })
            .filter_map(move |item| {
                // After a bad chunk the stream is over: what follows cannot be trusted.
                let out = if failed {
                    None
                } else {
                    Some(item.and_then(|data| {
                        openai_chat::parse_chunk(&data)
                            .map_err(|e| UpstreamError::BadResponse(format!("bad chunk: {e}")))
                    }))
                };
                failed |= matches!(out, Some(Err(_)));
                futures_util::future::ready(out)
            });
        Ok(Box::pin(deltas))
    }

    async fn embed(&self, call: EmbedCall<'_>) -> Result<EmbeddingsResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let body = openai_embeddings::encode_request(call.request, call.model);
        let resp = self
            .http
            .post(
                &self.embeddings_url,
                call.request_id,
                call.trace,
                &[],
                body.into(),
                deadline,
            )
            .await?;
        let bytes = self.http.body(resp, deadline).await?;
        openai_embeddings::parse_response(&bytes, call.request.input.len())
            .map_err(UpstreamError::BadResponse)
    }
}
