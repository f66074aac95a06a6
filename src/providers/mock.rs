//! The built-in mock: deterministic tokens with configurable latency, so that the quick start,
//! tests and benchmarks need no real model. It echoes the words of the last user message, and
//! embeds texts as deterministic unit vectors.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{
    unix_secs, Capabilities, DeltaStream, EmbedCall, Provider, UpstreamCall, UpstreamError,
};
use crate::api::{
    ChatDelta, ChatRequest, ChatResponse, Choice, ChoiceDelta, Content, EmbeddingInput,
    EmbeddingsResponse, JsonObject, Message, Role, StopReason, Usage,
};
use crate::clock::Clock;
use crate::config::{MockConfig, ProviderKind};

/// Vector size of mock embeddings when the request names none.
const MOCK_DIMENSIONS: u32 = 16;
/// The most dimensions the mock embeds (OpenAI's largest model has 3072).
const MOCK_MAX_DIMENSIONS: u32 = 4096;
/// The most inputs the mock embeds in one request (OpenAI's limit).
const MOCK_MAX_INPUTS: usize = 2048;

/// Answers every model name with the same deterministic text.
pub struct MockProvider {
    tokens: u32,
    token_latency: Duration,
    first_token_latency: Duration,
    clock: Clock,
}

impl MockProvider {
    /// A mock from its provider configuration.
    pub fn new(cfg: &MockConfig, clock: Clock) -> Self {
        Self {
            tokens: cfg.tokens.max(1),
            token_latency: Duration::from_millis(cfg.token_latency_ms),
            first_token_latency: Duration::from_millis(cfg.first_token_latency_ms),
            clock,
        }
    }

    /// The words the answer is made of, one per token.
    fn words(&self, req: &ChatRequest) -> Vec<String> {
        let last_user = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .and_then(|m| match &m.content {
                Some(Content::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .unwrap_or("");
        let mut source: Vec<&str> = last_user.split_whitespace().collect();
        if source.is_empty() {
            source.push("tollgate");
        }
        let max = req
            .max_tokens
            .map(|m| m.min(u64::from(self.tokens)) as usize)
            .unwrap_or(self.tokens as usize)
            .max(1);
        (0..max)
            .map(|i| source[i % source.len()].to_string())
            .collect()
    }

    fn usage(req: &ChatRequest, completion: usize) -> Usage {
        Usage {
            prompt_tokens: req.estimate_prompt_tokens(),
            completion_tokens: completion as u64,
            ..Usage::default()
        }
    }
}

#[async_trait::async_trait]
impl Provider for MockProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Mock
    }

    fn capabilities(&self, _model: &str) -> Capabilities {
        Capabilities {
            chat: true,
            stream: true,
            embeddings: true,
        }
    }

    /// One non-streamed completion, after the latency of every token.
    async fn complete(&self, call: UpstreamCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let words = self.words(call.request);
        let delay = self.first_token_latency + self.token_latency * words.len() as u32;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(ChatResponse {
            id: format!("chatcmpl-{}", call.request_id),
            created: unix_secs(&self.clock),
            model: call.model.to_string(),
            choices: vec![Choice {
                index: 0,
                message: Message::text(Role::Assistant, words.join(" ")),
                finish_reason: Some(StopReason::Stop),
                extra: JsonObject::new(),
            }],
            usage: Some(Self::usage(call.request, words.len())),
            extra: JsonObject::new(),
        })
    }

    /// Streams one word per delta, then a usage delta. Each delta is due at a fixed offset from
    /// the start, so pacing does not drift under load.
    async fn stream(&self, call: UpstreamCall<'_>) -> Result<DeltaStream, UpstreamError> {
        let words = self.words(call.request);
        let n = words.len();
        let usage = Self::usage(call.request, n);
        let template = ChatDelta {
            id: format!("chatcmpl-{}", call.request_id),
            created: unix_secs(&self.clock),
            model: call.model.to_string(),
            ..ChatDelta::default()
        };
        let start = tokio::time::Instant::now() + self.first_token_latency;
        let per_token = self.token_latency;
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let mut delta = template.clone();
            let word = words.get(i).cloned();
            async move {
                if i > n {
                    return None;
                }
                let due = start + per_token * (i as u32 + 1).min(n as u32);
                tokio::time::sleep_until(due).await;
                match word {
                    Some(w) => {
                        let text = if i + 1 < n { format!("{w} ") } else { w };
                        delta.choices.push(ChoiceDelta {
                            role: (i == 0).then(|| "assistant".to_string()),
                            content: Some(text),
                            finish_reason: (i + 1 == n).then_some(StopReason::Stop),
                            ..ChoiceDelta::default()
                        });
                    }
                    None => delta.usage = Some(usage),
                }
                Some((Ok(delta), i + 1))
            }
        });
        Ok(Box::pin(stream))
    }

    async fn embed(&self, call: EmbedCall<'_>) -> Result<EmbeddingsResponse, UpstreamError> {
        let dims = call.request.dimensions.unwrap_or(MOCK_DIMENSIONS).max(1);
        // Refused as a real upstream would, so that a caller cannot make the gateway allocate
        // without bound.
        if dims > MOCK_MAX_DIMENSIONS || call.request.input.len() > MOCK_MAX_INPUTS {
            return Err(UpstreamError::Status {
                status: 400,
                message: format!(
                    "the mock embeds at most {MOCK_MAX_INPUTS} inputs of at most {MOCK_MAX_DIMENSIONS} dimensions"
                ),
                retry_after: None,
            });
        }
        let dims = dims as usize;
        let seeds: Vec<Vec<u8>> = match &call.request.input {
            EmbeddingInput::Texts(t) => t.iter().map(|s| s.as_bytes().to_vec()).collect(),
            EmbeddingInput::Tokens(t) => t
                .iter()
                .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
                .collect(),
        };
        Ok(EmbeddingsResponse {
            model: call.model.to_string(),
            vectors: seeds.iter().map(|s| unit_vector(s, dims)).collect(),
            prompt_tokens: Some(call.request.input.estimate_tokens()),
        })
    }
}

/// A unit vector that depends only on the input bytes: SHA-256 in counter mode, scaled.
fn unit_vector(seed: &[u8], dims: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dims);
    let mut counter = 0u32;
    while out.len() < dims {
        let block = Sha256::new()
            .chain_update(counter.to_le_bytes())
            .chain_update(seed)
            .finalize();
        for pair in block.chunks_exact(2) {
            if out.len() == dims {
                break;
            }
            let x = u16::from_le_bytes([pair[0], pair[1]]);
            out.push(f32::from(x) / 32767.5 - 1.0);
        }
        counter += 1;
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        out.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_vectors() {
        let a = unit_vector(b"hello", 16);
        assert_eq!(a, unit_vector(b"hello", 16));
        assert_ne!(a, unit_vector(b"hellp", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert_eq!(unit_vector(b"x", 40).len(), 40);
    }
}
