//! The OpenAI embeddings wire (`POST /v1/embeddings`): requests and answers to and from the
//! neutral [`EmbeddingsRequest`] / [`EmbeddingsResponse`].
//!
//! Fields the neutral type does not model (`user`, vendor extensions) stay in `extra` as sent,
//! so an OpenAI-compatible upstream receives the caller's body with only `model` changed.
//! Vectors are floats in the neutral type; `encoding_format: "base64"` is OpenAI's: the
//! little-endian bytes of each f32, base64 (standard alphabet, padded).

use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use super::{EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse, EncodingFormat, JsonObject};
use crate::error::{Reason, Rejection};

const INPUT_SHAPES: &str =
    "`input` must be a string, an array of strings, an array of token ids or an array of token id arrays";

/// Parses and validates an OpenAI embeddings body.
pub fn parse_request(bytes: &[u8]) -> Result<EmbeddingsRequest, Rejection> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Rejection::new(
            Reason::InvalidRequest,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(body) => request_from_object(body),
        _ => Err(Rejection::new(
            Reason::InvalidRequest,
            "the body must be a JSON object",
        )),
    }
}

/// Validates a body already parsed into an object (the gRPC adapter builds one).
pub fn request_from_object(mut body: JsonObject) -> Result<EmbeddingsRequest, Rejection> {
    let model = match body.remove("model") {
        Some(Value::String(m)) if !m.is_empty() => m,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(Rejection::invalid("model", "`model` is required"))
        }
        Some(_) => return Err(Rejection::invalid("model", "`model` must be a string")),
    };
    let (input, single_input) = match body.remove("input") {
        None | Some(Value::Null) => return Err(Rejection::invalid("input", "`input` is required")),
        Some(v) => {
            let single = matches!(&v, Value::String(_))
                || matches!(&v, Value::Array(a) if matches!(a.first(), Some(Value::Number(_))));
            (parse_input(v)?, single)
        }
    };
    let dimensions = match body.remove("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(Rejection::invalid(
                    "dimensions",
                    "`dimensions` must be a positive integer",
                ))
            }
        },
    };
    let encoding_format = match body.remove("encoding_format") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "float" => Some(EncodingFormat::Float),
        Some(Value::String(s)) if s == "base64" => Some(EncodingFormat::Base64),
        Some(_) => {
            return Err(Rejection::invalid(
                "encoding_format",
                "`encoding_format` must be \"float\" or \"base64\"",
            ))
        }
    };
    Ok(EmbeddingsRequest {
        model,
        input,
        single_input,
        dimensions,
        encoding_format,
        extra: body,
    })
}

fn parse_input(v: Value) -> Result<EmbeddingInput, Rejection> {
    let bad = |m: &str| Rejection::invalid("input", m.to_string());
    let items = match v {
        Value::String(s) if s.is_empty() => return Err(bad("`input` must not be empty")),
        Value::String(s) => return Ok(EmbeddingInput::Texts(vec![s])),
        Value::Array(items) => items,
        _ => return Err(bad(INPUT_SHAPES)),
    };
    if items.is_empty() {
        return Err(bad("`input` must not be empty"));
    }
    match &items[0] {
        Value::String(_) => {
            let mut texts = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) if !s.is_empty() => texts.push(s),
                    Value::String(_) => {
                        return Err(Rejection::invalid(
                            &format!("input[{i}]"),
                            format!("`input[{i}]` must not be empty"),
                        ))
                    }
                    _ => return Err(item_error(i, INPUT_SHAPES)),
                }
            }
            Ok(EmbeddingInput::Texts(texts))
        }
        Value::Number(_) => Ok(EmbeddingInput::Tokens(vec![token_ids(&items, None)?])),
        Value::Array(_) => {
            let mut lists = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Array(ids) if ids.is_empty() => {
                        return Err(item_error(i, &format!("`input[{i}]` must not be empty")))
                    }
                    Value::Array(ids) => lists.push(token_ids(ids, Some(i))?),
                    _ => return Err(item_error(i, INPUT_SHAPES)),
                }
            }
            Ok(EmbeddingInput::Tokens(lists))
        }
        _ => Err(bad(INPUT_SHAPES)),
    }
}

fn item_error(i: usize, message: &str) -> Rejection {
    Rejection::invalid(&format!("input[{i}]"), message.to_string())
}

/// Token ids of one input (`outer`: its index in an array of token arrays).
fn token_ids(ids: &[Value], outer: Option<usize>) -> Result<Vec<u32>, Rejection> {
    ids.iter()
        .enumerate()
        .map(|(j, id)| {
            id.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    let param = match outer {
                        Some(i) => format!("input[{i}][{j}]"),
                        None => format!("input[{j}]"),
                    };
                    Rejection::invalid(
                        &param,
                        format!("`{param}` must be a token id (an integer from 0 to 4294967295)"),
                    )
                })
        })
        .collect()
}

/// The body for an OpenAI-compatible upstream: the caller's, with the upstream's model name.
pub fn encode_request(req: &EmbeddingsRequest, model: &str) -> Vec<u8> {
    let mut body = req.extra.clone();
    body.insert("model".into(), Value::String(model.to_string()));
    body.insert(
        "input".into(),
        match &req.input {
            EmbeddingInput::Texts(t) if req.single_input && t.len() == 1 => json!(t[0]),
            EmbeddingInput::Tokens(t) if req.single_input && t.len() == 1 => json!(t[0]),
            EmbeddingInput::Texts(t) => json!(t),
            EmbeddingInput::Tokens(t) => json!(t),
        },
    );
    if let Some(d) = req.dimensions {
        body.insert("dimensions".into(), d.into());
    }
    if let Some(f) = req.encoding_format {
        body.insert("encoding_format".into(), f.as_str().into());
    }
    // A map of JSON values always serializes.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// An OpenAI embeddings answer: `data[].embedding` (floats or base64) in `index` order,
/// `usage.prompt_tokens`. `expected` is how many vectors the request asked for.
pub fn parse_response(bytes: &[u8], expected: usize) -> Result<EmbeddingsResponse, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| "no `data` in the answer".to_string())?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (i, item) in data.iter().enumerate() {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .map_or(i, |n| n as usize);
        let embedding = match item.get("embedding") {
            Some(Value::Array(xs)) => xs
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| format!("data[{i}].embedding holds a non-number"))?,
            Some(Value::String(b64)) => vector_from_base64(b64)
                .ok_or_else(|| format!("data[{i}].embedding is not base64 of f32 values"))?,
            _ => return Err(format!("data[{i}].embedding is not an array")),
        };
        match vectors.get_mut(index) {
            Some(slot) => *slot = Some(embedding),
            None => return Err(format!("data[{i}].index {index} is out of range")),
        }
    }
    let vectors = vectors
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("expected {expected} vectors"))?;
    Ok(EmbeddingsResponse {
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        vectors,
        prompt_tokens: v.pointer("/usage/prompt_tokens").and_then(Value::as_u64),
    })
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct Item<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct Answer<'a> {
    object: &'static str,
    data: Vec<Item<'a>>,
    model: &'a str,
    usage: UsageOut,
}

/// OpenAI's answer: a `list` of `embedding` objects, `model` as the caller named it.
pub fn encode_response(
    resp: &EmbeddingsResponse,
    requested_model: &str,
    format: EncodingFormat,
    prompt_tokens: u64,
) -> String {
    let answer = Answer {
        object: "list",
        data: resp
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| Item {
                object: "embedding",
                index,
                embedding: match format {
                    EncodingFormat::Float => Vector::Float(v),
                    EncodingFormat::Base64 => Vector::Base64(vector_to_base64(v)),
                },
            })
            .collect(),
        model: requested_model,
        usage: UsageOut {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    // Plain structs of numbers and strings always serialize.
    serde_json::to_string(&answer).unwrap_or_default()
}

/// A vector as OpenAI's base64: the little-endian bytes of each f32.
pub fn vector_to_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`vector_to_base64`]; `None` when it is not base64 of whole f32 values.
pub fn vector_from_base64(s: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<EmbeddingsRequest, Rejection> {
        parse_request(v.to_string().as_bytes())
    }

    #[test]
    fn every_input_shape() {
        let r = parse(json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(r.input, EmbeddingInput::Texts(vec!["hi".into()]));
        let r = parse(json!({"model": "m", "input": ["a", "b"]})).unwrap();
        assert_eq!(r.input, EmbeddingInput::Texts(vec!["a".into(), "b".into()]));
        let r = parse(json!({"model": "m", "input": [1, 2, 3]})).unwrap();
        assert_eq!(r.input, EmbeddingInput::Tokens(vec![vec![1, 2, 3]]));
        let r = parse(json!({"model": "m", "input": [[1], [2, 3]]})).unwrap();
        assert_eq!(r.input, EmbeddingInput::Tokens(vec![vec![1], vec![2, 3]]));
    }

    #[test]
    fn bad_inputs_name_their_param() {
        for (body, param) in [
            (json!({"input": "x"}), "model"),
            (json!({"model": 3, "input": "x"}), "model"),
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": ""}), "input"),
            (json!({"model": "m", "input": []}), "input"),
            (json!({"model": "m", "input": 5}), "input"),
            (json!({"model": "m", "input": {"a": 1}}), "input"),
            (json!({"model": "m", "input": ["a", 1]}), "input[1]"),
            (json!({"model": "m", "input": ["a", ""]}), "input[1]"),
            (json!({"model": "m", "input": [1, -2]}), "input[1]"),
            (json!({"model": "m", "input": [1, 2.5]}), "input[1]"),
            (json!({"model": "m", "input": [[1], []]}), "input[1]"),
            (
                json!({"model": "m", "input": [[1], [1, "x"]]}),
                "input[1][1]",
            ),
            (json!({"model": "m", "input": [[1], 2]}), "input[1]"),
            (json!({"model": "m", "input": [true]}), "input"),
            (
                json!({"model": "m", "input": "x", "dimensions": 0}),
                "dimensions",
            ),
            (
                json!({"model": "m", "input": "x", "dimensions": "8"}),
                "dimensions",
            ),
            (
                json!({"model": "m", "input": "x", "encoding_format": "int8"}),
                "encoding_format",
            ),
        ] {
            let e = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.reason, Reason::InvalidRequest, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        assert!(parse_request(b"[1]").is_err());
        assert!(parse_request(b"{").is_err());
    }

    #[test]
    fn upstream_body_is_the_callers_but_model() {
        let body = json!({"model": "alias", "input": ["a"], "dimensions": 8,
            "encoding_format": "base64", "user": "u-1", "x_vendor": {"k": [1, 2]}});
        let r = parse(body.clone()).unwrap();
        let sent: Value = serde_json::from_slice(&encode_request(&r, "real")).unwrap();
        let mut expected = body;
        expected["model"] = json!("real");
        assert_eq!(sent, expected);
        // Every input shape goes out as it came.
        for input in [json!("a"), json!(["a"]), json!([7, 8]), json!([[7, 8]])] {
            let body = json!({"model": "m", "input": input});
            let sent: Value =
                serde_json::from_slice(&encode_request(&parse(body.clone()).unwrap(), "m"))
                    .unwrap();
            assert_eq!(sent, body);
        }
    }

    #[test]
    fn base64_round_trips_little_endian_f32() {
        let v = [1.0f32, -0.5, 0.25];
        let b = vector_to_base64(&v);
        assert_eq!(vector_from_base64(&b).unwrap(), v);
        // 1.0f32 is 00 00 80 3f.
        assert_eq!(vector_to_base64(&[1.0]), "AACAPw==");
        assert!(vector_from_base64("AACA").is_none());
    }

    #[test]
    fn answers_in_openai_shape() {
        let resp = EmbeddingsResponse {
            model: "p/m".into(),
            vectors: vec![vec![0.5, 1.0], vec![2.0]],
            prompt_tokens: Some(3),
        };
        let v: Value =
            serde_json::from_str(&encode_response(&resp, "alias", EncodingFormat::Float, 3))
                .unwrap();
        assert_eq!(
            v,
            json!({"object": "list", "model": "alias",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 1.0]},
                         {"object": "embedding", "index": 1, "embedding": [2.0]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        );
        let v: Value =
            serde_json::from_str(&encode_response(&resp, "alias", EncodingFormat::Base64, 3))
                .unwrap();
        assert_eq!(v["data"][1]["embedding"], json!(vector_to_base64(&[2.0])));
    }

    #[test]
    fn upstream_answers_in_index_order_floats_or_base64() {
        let b = vector_to_base64(&[3.0]);
        let body = format!(
            r#"{{"data":[{{"index":1,"embedding":"{b}"}},{{"index":0,"embedding":[1.0,2.0]}}],"model":"e","usage":{{"prompt_tokens":5}}}}"#
        );
        let r = parse_response(body.as_bytes(), 2).unwrap();
        assert_eq!(r.vectors, vec![vec![1.0, 2.0], vec![3.0]]);
        assert_eq!(r.prompt_tokens, Some(5));
        assert!(parse_response(br#"{"data":[]}"#, 1).is_err());
        assert!(parse_response(br#"{"data":[{"index":3,"embedding":[1]}]}"#, 1).is_err());
    }
}
