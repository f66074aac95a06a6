//! Token counts of one call.

use serde_json::Value;

/// Token counts reported by (or, failing that, estimated for) an upstream call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every input token, cached or not.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, those served from the provider's prompt cache (OpenAI
    /// `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`), priced at
    /// the cached-input price.
    pub cached_prompt_tokens: u64,
    /// Of `prompt_tokens`, those written to the prompt cache (Anthropic
    /// `cache_creation_input_tokens`).
    pub cache_creation_tokens: u64,
}

impl Usage {
    /// Reads an OpenAI `usage` object.
    pub fn from_openai(v: &Value) -> Option<Usage> {
        let o = v.as_object()?;
        let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Usage {
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
            cached_prompt_tokens: o
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
            cache_creation_tokens: 0,
        })
    }

    /// An OpenAI `usage` object.
    pub fn to_openai(self) -> Value {
        let mut v = serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens(),
        });
        if self.cached_prompt_tokens > 0 {
            v["prompt_tokens_details"] =
                serde_json::json!({"cached_tokens": self.cached_prompt_tokens});
        }
        v
    }

    /// Prompt plus completion tokens.
    pub fn total_tokens(self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}
