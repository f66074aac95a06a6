//! Token counts of one call.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::lenient::{others_are_none, AsU64};

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

/// An OpenAI `usage` object read straight from the JSON as [`Usage::from_openai`] reads its
/// `Value`: `None` when it is not an object, a count that is not an unsigned integer is 0, and
/// of duplicate keys the last counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenAiUsage(pub Option<Usage>);

#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum UsageField {
    PromptTokens,
    CompletionTokens,
    PromptTokensDetails,
    #[serde(other)]
    Other,
}

#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DetailsField {
    CachedTokens,
    #[serde(other)]
    Other,
}

/// `prompt_tokens_details.cached_tokens`, or nothing when `prompt_tokens_details` is not an
/// object or has none.
struct CachedTokens(Option<u64>);

impl<'de> Deserialize<'de> for CachedTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CachedTokens;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CachedTokens, A::Error> {
                let mut cached = None;
                while let Some(key) = map.next_key::<DetailsField>()? {
                    match key {
                        DetailsField::CachedTokens => cached = map.next_value::<AsU64>()?.0,
                        DetailsField::Other => {
                            map.next_value::<serde::de::IgnoredAny>().map(drop)?
                        }
                    }
                }
                Ok(CachedTokens(cached))
            }
            fn visit_u64<E>(self, _: u64) -> Result<CachedTokens, E> {
                Ok(CachedTokens(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<CachedTokens, E> {
                Ok(CachedTokens(None))
            }
            others_are_none!(CachedTokens(None));
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for OpenAiUsage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OpenAiUsage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OpenAiUsage, A::Error> {
                let mut u = Usage::default();
                while let Some(key) = map.next_key::<UsageField>()? {
                    match key {
                        UsageField::PromptTokens => {
                            u.prompt_tokens = map.next_value::<AsU64>()?.0.unwrap_or(0)
                        }
                        UsageField::CompletionTokens => {
                            u.completion_tokens = map.next_value::<AsU64>()?.0.unwrap_or(0)
                        }
                        UsageField::PromptTokensDetails => {
                            u.cached_prompt_tokens =
                                map.next_value::<CachedTokens>()?.0.unwrap_or(0)
                        }
                        UsageField::Other => map.next_value::<serde::de::IgnoredAny>().map(drop)?,
                    }
                }
                Ok(OpenAiUsage(Some(u)))
            }
            fn visit_u64<E>(self, _: u64) -> Result<OpenAiUsage, E> {
                Ok(OpenAiUsage(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<OpenAiUsage, E> {
                Ok(OpenAiUsage(None))
            }
            others_are_none!(OpenAiUsage(None));
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::{OpenAiUsage, Usage};
    use serde_json::Value;

    #[test]
    fn the_usage_reader_reads_what_from_openai_reads_of_a_value() {
        let cases = [
            r#"{"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}"#,
            r#"{"prompt_tokens": 12, "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 2}}"#,
            r#"{"prompt_tokens": 1, "prompt_tokens": 9}"#,
            r#"{"prompt_tokens_details": {"cached_tokens": 3}, "prompt_tokens_details": null}"#,
            r#"{"prompt_tokens": -1, "completion_tokens": 2.5, "prompt_tokens_details": 4}"#,
            r#"{"prompt_tokens": "12", "completion_tokens": [1], "x": {"y": [{}]}}"#,
            r#"{"prompt_tokens_details": {"cached_tokens": "2"}}"#,
            "{}",
            "null",
            "7",
            r#""usage""#,
            "[1, 2]",
        ];
        for raw in cases {
            let v: Value = serde_json::from_str(raw).unwrap();
            let read: OpenAiUsage = serde_json::from_str(raw).unwrap();
            assert_eq!(read.0, Usage::from_openai(&v), "{raw}");
        }
    }
}
