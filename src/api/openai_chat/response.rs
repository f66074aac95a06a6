//! Whole answers: an upstream's `chat.completion` into a [`ChatResponse`], and back for a caller.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::message::{message_from_object, MessageView};
use super::{put_extra, take_index, take_string, take_u64, to_object, At, Each};
use crate::api::lenient::AsString;
use crate::api::usage::OpenAiUsage;
use crate::api::{ChatResponse, Choice, JsonObject, Message, Role, StopReason, Usage};

/// An upstream's chat.completion; Err is a short reason ("not a JSON object: ...", "no `choices` in the answer").
pub fn parse_response(bytes: &[u8]) -> Result<ChatResponse, String> {
    let body: JsonObject =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON object: {e}"))?;
    response_from_object(body)
}

/// What a passed-through chat.completion is read for (its bytes go to the caller as they are).
#[derive(Debug, Default, PartialEq)]
pub struct AnswerFacts {
    /// As the upstream reported it.
    pub usage: Option<Usage>,
    /// The model the upstream says answered.
    pub model: Option<String>,
    /// Where the top-level `model` string is in the bytes (its quotes included), for a
    /// rewrite that needs no second pass.
    pub model_span: Option<std::ops::Range<usize>>,
    /// Each choice's `finish_reason`, in OpenAI's words.
    pub finish_reasons: Vec<String>,
    /// Characters generated, for an estimate; counted only when no usage came.
    pub generated_chars: usize,
}

/// Reads an upstream's chat.completion for accounting without building it: only `model`,
/// `usage` and each choice's `finish_reason` are kept, the rest is skipped. Err as
/// [`parse_response`] says it.
pub fn read_answer(bytes: &[u8]) -> Result<AnswerFacts, String> {
    // Read as the full parse would read them from a `Value`, without building one.
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        // Borrowed as it is written, so that where it is in the bytes is known.
        #[serde(default, borrow)]
        model: Option<&'a serde_json::value::RawValue>,
        choices: Vec<ChoiceHead>,
        #[serde(default)]
        usage: OpenAiUsage,
    }
    #[derive(serde::Deserialize)]
    struct ChoiceHead {
        #[serde(default)]
        finish_reason: AsString,
    }
    let head: Head = match serde_json::from_slice(bytes) {
        Ok(h) => h,
        // The full parse words what is wrong the way a translated answer's error does.
        Err(e) => return Err(parse_response(bytes).err().unwrap_or_else(|| e.to_string())),
    };
    // Read as `Value::as_str` reads it: a string, or no model.
    let model = head
        .model
        .map(|raw| serde_json::from_str::<AsString>(raw.get()))
        .transpose()
        .map_err(|e| e.to_string())?
        .and_then(|m| m.0);
    let model_span = model.as_ref().and(head.model).map(|raw| {
        let start = raw.get().as_ptr() as usize - bytes.as_ptr() as usize;
        start..start + raw.get().len()
    });
    let usage = head.usage.0;
    let generated_chars = match usage {
        Some(_) => 0,
        None => parse_response(bytes)?.estimate_completion_chars(),
    };
    Ok(AnswerFacts {
        usage,
        model,
        model_span,
        finish_reasons: head
            .choices
            .into_iter()
            .filter_map(|c| {
                c.finish_reason
                    .0
                    .map(|r| StopReason::from_openai(&r).as_openai().to_string())
            })
            .collect(),
        generated_chars,
    })
}

/// An upstream's chat.completion already parsed into an object.
pub fn response_from_object(mut body: JsonObject) -> Result<ChatResponse, String> {
    let choices = match body.remove("choices") {
        Some(Value::Array(c)) => c,
        Some(_) => return Err("`choices` in the answer is not an array".into()),
        None => return Err("no `choices` in the answer".into()),
    };
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c {
            Value::Object(o) => choice_from_object(o, i),
            _ => Err(format!("`choices[{i}]` in the answer is not an object")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    body.remove("object");
    Ok(ChatResponse {
        id: take_string(&mut body, "id").unwrap_or_default(),
        created: take_u64(&mut body, "created").unwrap_or(0),
        model: take_string(&mut body, "model").unwrap_or_default(),
        choices,
        usage: body.remove("usage").and_then(|u| Usage::from_openai(&u)),
        extra: body,
    })
}

/// `choices[i]` of an answer.
fn choice_from_object(mut o: JsonObject, i: usize) -> Result<Choice, String> {
    let index = take_index(&mut o, i);
    let at = At {
        list: "choices",
        index: i,
        suffix: ".message",
    };
    let message = match o.remove("message") {
        Some(Value::Object(m)) => {
            message_from_object(m, at, Role::Assistant).map_err(|e| e.to_string())?
        }
        None | Some(Value::Null) => Message {
            content: None,
            ..Message::text(Role::Assistant, "")
        },
        Some(_) => return Err(format!("`{at}` in the answer is not an object")),
    };
    Ok(Choice {
        index,
        message,
        finish_reason: take_finish_reason(&mut o),
        extra: o,
    })
}

/// `finish_reason`: a string is read, `null` is none, anything else stays in `extra`.
pub(super) fn take_finish_reason(o: &mut JsonObject) -> Option<StopReason> {
    if o.get("finish_reason").is_some_and(Value::is_null) {
        o.remove("finish_reason");
    }
    take_string(o, "finish_reason").map(|r| StopReason::from_openai(&r))
}

/// A chat.completion object for a caller (`"object": "chat.completion"`).
pub fn response_to_object(resp: &ChatResponse) -> JsonObject {
    to_object(ResponseView(resp))
}

/// The same as JSON text, serialized straight from the answer (no intermediate tree: this runs
/// once per answer).
pub fn encode_response(resp: &ChatResponse) -> String {
    // A view with string keys only: serde_json cannot fail on it.
    serde_json::to_string(&ResponseView(resp)).unwrap_or_default()
}

/// A whole answer on the wire.
struct ResponseView<'a>(&'a ChatResponse);

impl Serialize for ResponseView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &r.id)?;
        m.serialize_entry("object", "chat.completion")?;
        m.serialize_entry("created", &r.created)?;
        m.serialize_entry("model", &r.model)?;
        m.serialize_entry("choices", &Each(&r.choices, ChoiceView))?;
        if let Some(u) = r.usage {
            m.serialize_entry("usage", &u.to_openai())?;
        }
        put_extra(&mut m, &r.extra, |k| match k {
            "id" | "object" | "created" | "model" | "choices" => true,
            "usage" => r.usage.is_some(),
            _ => false,
        })?;
        m.end()
    }
}

/// One choice of a whole answer.
struct ChoiceView<'a>(&'a Choice);

impl Serialize for ChoiceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("index", &c.index)?;
        m.serialize_entry("message", &MessageView(&c.message))?;
        m.serialize_entry(
            "finish_reason",
            &c.finish_reason.as_ref().map(StopReason::as_openai),
        )?;
        put_extra(&mut m, &c.extra, |k| {
            matches!(k, "index" | "message" | "finish_reason")
        })?;
        m.end()
    }
}
