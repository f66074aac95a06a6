//! An embeddings request and its answer, free of any wire format.

use super::JsonObject;

/// What to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingInput {
    /// Texts, one vector each.
    Texts(Vec<String>),
    /// Pre-tokenized inputs, one vector each.
    Tokens(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// How many vectors the answer holds.
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Texts(t) => t.len(),
            EmbeddingInput::Tokens(t) => t.len(),
        }
    }

    /// Whether there is nothing to embed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Input tokens estimated the cheap way (exact for token inputs).
    pub fn estimate_tokens(&self) -> u64 {
        match self {
            EmbeddingInput::Texts(t) => t.iter().map(|s| super::estimate_tokens(s.len())).sum(),
            EmbeddingInput::Tokens(t) => t.iter().map(|v| v.len() as u64).sum(),
        }
    }
}

/// How vectors are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32 bytes, base64.
    Base64,
}

impl EncodingFormat {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            EncodingFormat::Float => "float",
            EncodingFormat::Base64 => "base64",
        }
    }
}

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    /// The input came as one string or one token array rather than a list of them; an
    /// OpenAI-compatible upstream is sent the same shape.
    pub single_input: bool,
    /// Requested vector size, where the model supports it.
    pub dimensions: Option<u32>,
    /// As the caller sent it (`None`: not sent, floats); an OpenAI-compatible upstream is asked
    /// for the same, so its body is the caller's.
    pub encoding_format: Option<EncodingFormat>,
    /// Other fields (`user`, vendor extensions), kept as sent.
    pub extra: JsonObject,
}

/// Embedding vectors, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsResponse {
    /// The model that answered; the core sets it to the resolved `provider/model`.
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    /// Input tokens as the upstream reported them.
    pub prompt_tokens: Option<u64>,
}
