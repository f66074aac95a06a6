//! The Anthropic Messages API (docs/architecture.md, Providers): `POST {base_url}/v1/messages` with the
//! pool key in `x-api-key`, `anthropic-version` and the configured `anthropic-beta`. The
//! translation itself lives in `crate::api::anthropic`.

use std::sync::Arc;

use futures_util::StreamExt;

use super::http::{upstream_url, HttpUpstream, KeyHeader, UpstreamResponse, UpstreamUrl};
use super::{
    unix_secs, Capabilities, DeltaStream, EmbedCall, KeyPool, KeyPoolObserver, NativeCall,
    NativeChunk, NativeResponse, NativeStream, Provider, UpstreamCall, UpstreamError,
};
use crate::api::anthropic::{self, StreamDecoder, StreamError};
use crate::api::native::{replace_string, with_model};
use crate::api::{Api, ChatResponse, EmbeddingsResponse};
use crate::clock::Clock;
use crate::config::{AnthropicConfig, ProviderKind};

/// An Anthropic upstream.
pub struct AnthropicProvider {
    url: UpstreamUrl,
    count_url: UpstreamUrl,
    http: HttpUpstream,
    config: AnthropicConfig,
    beta: Option<String>,
    clock: Clock,
}

impl AnthropicProvider {
    /// Builds the client; the base URL was validated with the config.
    pub fn new(
        name: &str,
        cfg: &AnthropicConfig,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Result<Self, String> {
        // `https://api.anthropic.com` and `https://api.anthropic.com/v1` both mean the API root.
        let base = cfg.http.base_url.trim_end_matches("/v1");
        let beta = (!cfg.anthropic_beta.is_empty()).then(|| cfg.anthropic_beta.join(","));
        Ok(Self {
            url: upstream_url(name, format!("{base}/v1/messages"))?,
            count_url: upstream_url(name, format!("{base}/v1/messages/count_tokens"))?,
            http: HttpUpstream::new(name, &cfg.http, KeyHeader::XApiKey, clock.clone(), observer)?,
            config: cfg.clone(),
            beta,
            clock,
        })
    }

    async fn send(
        &self,
        call: UpstreamCall<'_>,
        stream: bool,
        deadline: std::time::Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let body = anthropic::encode_request(
            call.request,
            call.model,
            stream,
            self.config.max_tokens_for(call.model),
        )
        .map_err(|e| UpstreamError::Unsupported(e.to_string()))?;
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| UpstreamError::BadResponse(format!("cannot encode request: {e}")))?;
        let mut headers = vec![("anthropic-version", self.config.anthropic_version.as_str())];
        if let Some(beta) = &self.beta {
            headers.push(("anthropic-beta", beta.as_str()));
        }
        self.http
            .post(
                &self.url,
                call.request_id,
                call.trace,
                &headers,
                bytes.into(),
                deadline,
            )
            .await
    }
}

impl AnthropicProvider {
    /// POSTs the caller's own body, `model` changed to the upstream's name and nothing else, with
    /// the caller's `anthropic-version` (else the configured one) and the caller's
    /// `anthropic-beta` values merged with the configured ones.
    async fn send_native(
        &self,
        url: &UpstreamUrl,
        call: NativeCall<'_>,
        deadline: std::time::Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let body = replace_string(&call.native.body, &["model"], call.model).ok_or_else(|| {
            UpstreamError::Unsupported("the request body has no `model` string".into())
        })?;
        let version = call
            .native
            .anthropic_version
            .as_deref()
            .unwrap_or(&self.config.anthropic_version);
        let mut betas: Vec<&str> = Vec::new();
        for b in call
            .native
            .anthropic_beta
            .iter()
            .chain(&self.config.anthropic_beta)
        {
            for one in b.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                if !betas.contains(&one) {
                    betas.push(one);
                }
            }
        }
        let beta = betas.join(",");
        let mut headers = vec![("anthropic-version", version)];
        if !beta.is_empty() {
            headers.push(("anthropic-beta", beta.as_str()));
        }
        self.http
            .post(
                url,
                call.request_id,
                call.trace,
                &headers,
                body.into(),
                deadline,
            )
            .await
    }
}

/// The generated characters of a whole answer's content blocks, for an estimate.
fn generated_chars(v: &serde_json::Value) -> usize {
    v.get("content")
        .and_then(serde_json::Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .map(|b| {
                    ["text", "thinking"]
                        .iter()
                        .filter_map(|k| b.get(*k).and_then(serde_json::Value::as_str))
                        .map(str::len)
                        .sum::<usize>()
                        + b.get("input").map_or(0, |i| i.to_string().len())
                })
                .sum()
        })
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl Provider for AnthropicProvider {
    fn native(&self, api: Api) -> bool {
        api == Api::Messages
    }

    async fn native_complete(&self, call: NativeCall<'_>) -> Result<NativeResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send_native(&self.url, call, deadline).await?;
        let bytes = self.http.body(resp, deadline).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| UpstreamError::BadResponse(format!("the answer is not JSON: {e}")))?;
        if v.get("type").and_then(serde_json::Value::as_str) != Some("message") {
            return Err(UpstreamError::BadResponse(
                "the answer is not a message".into(),
            ));
        }
        let body = with_model(bytes, call.answer_model);
        Ok(NativeResponse {
            usage: v.get("usage").and_then(anthropic::usage),
            generated_chars: generated_chars(&v),
            response_model: v.get("model").and_then(|m| m.as_str()).map(str::to_string),
            finish_reasons: Vec::new(),
            body,
        })
    }

    async fn native_stream(&self, call: NativeCall<'_>) -> Result<NativeStream, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send_native(&self.url, call, deadline).await?;
        let mut decoder = StreamDecoder::new(unix_secs(&self.clock));
        let answer_model = call.answer_model.to_string();
        let mut over = false;
        let events = self.http.sse_raw(resp, deadline).filter_map(move |item| {
            // (Anthropic's keep-alive is a `ping` event, which has data and is passed on.)
            let out = (!over).then(|| {
                item.and_then(|(raw, data)| native_event(&mut decoder, raw, &data, &answer_model))
            });
            over |= matches!(out, Some(Err(_))) || decoder.is_finished();
            futures_util::future::ready(out)
        });
        Ok(Box::pin(events))
    }

    async fn native_count_tokens(&self, call: NativeCall<'_>) -> Result<u64, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send_native(&self.count_url, call, deadline).await?;
        let bytes = self.http.body(resp, deadline).await?;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("input_tokens").and_then(serde_json::Value::as_u64))
            .ok_or_else(|| UpstreamError::BadResponse("no input_tokens in the answer".into()))
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn key_pool(&self) -> Option<&KeyPool> {
        Some(self.http.keys())
    }

    fn capabilities(&self, _model: &str) -> Capabilities {
        Capabilities {
            chat: true,
            stream: true,
            embeddings: false,
        }
    }

    async fn complete(&self, call: UpstreamCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send(call, false, deadline).await?;
        let bytes = self.http.body(resp, deadline).await?;
        anthropic::parse_response(&bytes, unix_secs(&self.clock))
            .map_err(UpstreamError::BadResponse)
    }

    async fn stream(&self, call: UpstreamCall<'_>) -> Result<DeltaStream, UpstreamError> {
        let deadline = self.http.deadline();
        let resp = self.send(call, true, deadline).await?;
        let mut decoder = StreamDecoder::new(unix_secs(&self.clock));
        let mut over = false;
        let deltas = self.http.sse_data(resp, deadline).filter_map(move |item| {
            let out = if over {
                None
            } else {
                match item {
                    Err(e) => Some(Err(e)),
                    Ok(data) => match decoder.event(&data) {
                        Ok(delta) => delta.map(Ok),
                        Err(StreamError::Upstream {
                            error_type,
                            message,
                        }) => Some(Err(UpstreamError::BadResponse(format!(
                            "{error_type}: {message}"
                        )))),
                        Err(StreamError::Malformed(m)) => {
                            Some(Err(UpstreamError::BadResponse(format!("bad event: {m}"))))
                        }
                    },
                }
            };
            // After an error, or once `message_stop` is in, nothing more is for the caller.
            over |= matches!(out, Some(Err(_))) || decoder.is_finished();
            futures_util::future::ready(out)
        });
        Ok(Box::pin(deltas))
    }

    async fn embed(&self, _call: EmbedCall<'_>) -> Result<EmbeddingsResponse, UpstreamError> {
        Err(UpstreamError::Unsupported(
            "this model does not serve embeddings".into(),
        ))
    }
}

/// One pass-through event with data: read for accounting (and for an `error` event, which ends
/// the stream as a failure), its bytes kept, `message_start`'s `message.model` rewritten.
fn native_event(
    decoder: &mut StreamDecoder,
    raw: bytes::Bytes,
    data: &str,
    answer_model: &str,
) -> Result<NativeChunk, UpstreamError> {
    let delta = match decoder.event(data) {
        Ok(d) => d,
        Err(StreamError::Upstream {
            error_type,
            message,
        }) => {
            return Err(UpstreamError::BadResponse(format!(
                "{error_type}: {message}"
            )))
        }
        Err(StreamError::Malformed(m)) => {
            return Err(UpstreamError::BadResponse(format!("bad event: {m}")))
        }
    };
    let is_start = data.contains("\"message_start\"")
        && serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .is_some_and(|v| v["type"] == "message_start");
    let bytes = if is_start {
        super::sse::rewrite_event_data(&raw, data, &["message", "model"], answer_model)
            .unwrap_or(raw)
    } else {
        raw
    };
    Ok(NativeChunk {
        bytes,
        usage: delta.as_ref().and_then(|d| d.usage),
        generated_chars: delta.as_ref().map_or(0, |d| d.generated_chars()),
        finished: decoder.is_finished(),
        ..NativeChunk::default()
    })
}
