//! Property tests of the gRPC decoders: any bytes that decode as a `CompleteRequest` or an
//! `EmbedRequest` (random bytes, mutated valid encodings, any `extra_json`) convert into a
//! neutral request or a typed `invalid_request`, never a panic.

use proptest::prelude::*;
use prost::Message;

use super::convert::chat_request;
use super::embeddings::embed_request;
use crate::error::Reason;
use crate::proto::{ChatMessage, CompleteRequest, EmbedRequest};

fn valid_complete() -> Vec<u8> {
    CompleteRequest {
        model: "mock/echo".into(),
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "s".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            },
        ],
        max_tokens: Some(5),
        extra_json: Some(r#"{"temperature":0.5,"tools":[]}"#.into()),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Converts whatever decodes; every refusal is `invalid_request` with a message.
fn convert_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(req) = CompleteRequest::decode(bytes) {
        for stream in [false, true] {
            if let Err(r) = chat_request(req.clone(), stream) {
                prop_assert_eq!(r.reason, Reason::InvalidRequest, "{:?}", r);
                prop_assert!(!r.message.is_empty());
            }
        }
    }
    if let Ok(req) = EmbedRequest::decode(bytes) {
        if let Err(r) = embed_request(req) {
            prop_assert_eq!(r.reason, Reason::InvalidRequest, "{:?}", r);
            prop_assert!(!r.message.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        convert_all(&bytes)?;
    }

    #[test]
    fn mutated_valid_encodings_never_panic(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut bytes = valid_complete();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        let keep = bytes.len() - cut % 4;
        convert_all(&bytes[..keep])?;
    }

    #[test]
    fn any_fields_never_panic(
        model in any::<String>(),
        role in prop::sample::select(vec!["user", "assistant", "system", "tool", "developer", "", "\u{0}"]),
        content in any::<String>(),
        max_tokens in any::<Option<u32>>(),
        extra_json in any::<Option<String>>(),
    ) {
        let req = CompleteRequest {
            model,
            messages: vec![ChatMessage { role: role.into(), content, ..Default::default() }],
            max_tokens,
            extra_json,
            ..Default::default()
        };
        convert_all(&req.encode_to_vec())?;
    }

    #[test]
    fn any_extra_json_object_never_panics(
        kv in prop::collection::vec((prop::sample::select(vec![
            "temperature", "top_p", "tools", "tool_choice", "stop", "n", "max_tokens",
            "response_format", "stream_options", "messages", "model", "seed", "logit_bias",
        ]), any::<i64>()), 0..6),
        as_string in any::<bool>(),
    ) {
        let obj: serde_json::Map<String, serde_json::Value> = kv
            .into_iter()
            .map(|(k, v)| {
                let v = if as_string { serde_json::json!(v.to_string()) } else { serde_json::json!(v) };
                (k.to_string(), v)
            })
            .collect();
        let mut req = CompleteRequest::decode(valid_complete().as_slice()).unwrap();
        req.extra_json = Some(serde_json::Value::Object(obj).to_string());
        convert_all(&req.encode_to_vec())?;
    }
}
