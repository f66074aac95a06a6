//! The built-in mock: deterministic tokens with configurable latency, so that the quick start,
//! tests and benchmarks need no real model. It echoes the words of the last user message.

use std::time::Duration;

use serde_json::{json, Value};

use super::{
    estimate_prompt_tokens, JsonObject, UpstreamError, UpstreamReply, UpstreamRequest,
    UpstreamStream, Usage,
};
use crate::config::ProviderConfig;

/// Answers every model name with the same deterministic text.
pub struct MockProvider {
    tokens: u32,
    token_latency: Duration,
    first_token_latency: Duration,
}

impl MockProvider {
    /// A mock from its provider configuration.
    pub fn new(cfg: &ProviderConfig) -> Self {
        Self {
            tokens: cfg.tokens.max(1),
            token_latency: Duration::from_millis(cfg.token_latency_ms),
            first_token_latency: Duration::from_millis(cfg.first_token_latency_ms),
        }
    }

    /// The words the answer is made of, one per token.
    fn words(&self, body: &JsonObject) -> Vec<String> {
        let last_user = body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| {
                m.iter()
                    .rev()
                    .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            })
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut source: Vec<&str> = last_user.split_whitespace().collect();
        if source.is_empty() {
            source.push("tollgate");
        }
        let max = body
            .get("max_tokens")
            .or_else(|| body.get("max_completion_tokens"))
            .and_then(Value::as_u64)
            .map(|m| m.min(u64::from(self.tokens)) as usize)
            .unwrap_or(self.tokens as usize)
            .max(1);
        (0..max)
            .map(|i| source[i % source.len()].to_string())
            .collect()
    }

    /// One non-streamed completion, after the latency of every token.
    pub async fn complete(&self, req: UpstreamRequest) -> Result<UpstreamReply, UpstreamError> {
        let words = self.words(&req.body);
        let delay = self.first_token_latency + self.token_latency * words.len() as u32;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let usage = Usage {
            prompt_tokens: estimate_prompt_tokens(&req.body),
            completion_tokens: words.len() as u64,
            cached_prompt_tokens: 0,
            cache_creation_tokens: 0,
        };
        let body = json!({
            "id": format!("chatcmpl-{}", req.request_id),
            "object": "chat.completion",
            "created": created(),
            "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": words.join(" ")},
                "finish_reason": "stop",
            }],
            "usage": usage.to_openai(),
        });
        let Value::Object(body) = body else {
            unreachable!("json! object literal")
        };
        Ok(UpstreamReply {
            body,
            usage: Some(usage),
        })
    }

    /// Streams one word per chunk, then a usage chunk. Each chunk is due at a fixed offset from
    /// the start, so pacing does not drift under load.
    pub fn stream(&self, req: UpstreamRequest) -> UpstreamStream {
        let words = self.words(&req.body);
        let n = words.len();
        let usage = Usage {
            prompt_tokens: estimate_prompt_tokens(&req.body),
            completion_tokens: n as u64,
            cached_prompt_tokens: 0,
            cache_creation_tokens: 0,
        };
        let id = format!("chatcmpl-{}", req.request_id);
        let model = req.model;
        let created = created();
        let start = tokio::time::Instant::now() + self.first_token_latency;
        let per_token = self.token_latency;
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let (id, model) = (id.clone(), model.clone());
            let word = words.get(i).cloned();
            async move {
                if i > n {
                    return None;
                }
                let due = start + per_token * (i as u32 + 1).min(n as u32);
                tokio::time::sleep_until(due).await;
                let chunk = match word {
                    Some(w) => {
                        let text = if i + 1 < n { format!("{w} ") } else { w };
                        let mut delta = json!({"content": text});
                        if i == 0 {
                            delta["role"] = json!("assistant");
                        }
                        let finish = if i + 1 == n {
                            json!("stop")
                        } else {
                            Value::Null
                        };
                        json!({
                            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                        })
                    }
                    None => json!({
                        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage.to_openai(),
                    }),
                };
                let Value::Object(chunk) = chunk else {
                    unreachable!("json! object literal")
                };
                Some((Ok(chunk), i + 1))
            }
        });
        Box::pin(stream)
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
