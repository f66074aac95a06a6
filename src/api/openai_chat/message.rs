//! Messages, content parts and tool calls, shared by requests (`messages[i]`) and answers
//! (`choices[i].message`).

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::{put_extra, take_string, At, BadField, Each};
use crate::api::{Content, ContentPart, JsonObject, Message, Reasoning, Role, ToolCall};

/// Reads a message object found at `at`; `default_role` stands in for a missing `role` (an
/// answer's message may omit it; a request's was checked before).
pub(super) fn message_from_object(
    mut obj: JsonObject,
    at: At<'_>,
    default_role: Role,
) -> Result<Message, BadField> {
    let role = take_string(&mut obj, "role").map_or(default_role, |r| Role::parse(&r));
    let content = match obj.remove("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Content::Text(s)),
        Some(Value::Array(parts)) => Some(Content::Parts(
            parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| part_from_value(p, at, j))
                .collect::<Result<_, _>>()?,
        )),
        Some(_) => {
            return Err(BadField::new(
                format_args!("{at}.content"),
                "must be a string, an array of content parts or null",
            ))
        }
    };
    if obj
        .get("tool_calls")
        .is_some_and(|v| !v.is_null() && !v.is_array())
    {
        return Err(BadField::new(
            format_args!("{at}.tool_calls"),
            "must be an array",
        ));
    }
    // An empty list stays in `extra` as sent (OpenAI itself rejects one; that is its call).
    let tool_calls = match super::take_where(
        &mut obj,
        "tool_calls",
        |v| matches!(v, Value::Array(a) if !a.is_empty()),
    ) {
        Some(Value::Array(calls)) => calls
            .into_iter()
            .enumerate()
            .map(|(j, c)| tool_call_from_value(c, at, j))
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    let name = take_string(&mut obj, "name");
    let tool_call_id = take_string(&mut obj, "tool_call_id");
    let reasoning = take_string(&mut obj, "reasoning_content")
        .map(|text| {
            vec![Reasoning {
                text,
                ..Reasoning::default()
            }]
        })
        .unwrap_or_default();
    Ok(Message {
        role,
        content,
        name,
        tool_calls,
        tool_call_id,
        reasoning,
        extra: obj,
    })
}

/// Reads `{at}.content[j]`: text and plain image parts are typed, anything else is kept whole.
fn part_from_value(v: Value, at: At<'_>, j: usize) -> Result<ContentPart, BadField> {
    let Value::Object(mut part) = v else {
        return Err(bad_part(at, j));
    };
    let (is_text, is_image) = match part.get("type") {
        Some(Value::String(t)) => (
            t == "text" && part.get("text").is_some_and(Value::is_string),
            t == "image_url" && is_plain_image_url(part.get("image_url")),
        ),
        _ => return Err(bad_part(at, j)),
    };
    if is_text {
        part.remove("type");
        let text = take_string(&mut part, "text").unwrap_or_default();
        return Ok(ContentPart::Text { text, extra: part });
    }
    if is_image {
        part.remove("type");
        let mut image = match part.remove("image_url") {
            Some(Value::Object(o)) => o,
            _ => JsonObject::new(),
        };
        return Ok(ContentPart::Image {
            url: take_string(&mut image, "url").unwrap_or_default(),
            detail: take_string(&mut image, "detail"),
            extra: part,
        });
    }
    Ok(ContentPart::Other(part))
}

fn bad_part(at: At<'_>, j: usize) -> BadField {
    BadField::new(
        format_args!("{at}.content[{j}]"),
        "must be an object with a string `type`",
    )
}

/// An `image_url` the typed part holds without loss: a string `url`, an optional string
/// `detail`, nothing else (other keys keep the part whole, as `ContentPart::Other`).
fn is_plain_image_url(v: Option<&Value>) -> bool {
    let Some(Value::Object(o)) = v else {
        return false;
    };
    o.get("url").is_some_and(Value::is_string)
        && o.get("detail").is_none_or(Value::is_string)
        && o.keys().all(|k| k == "url" || k == "detail")
}

/// Reads `{at}.tool_calls[j]`. A `type` other than `function` and keys of `function` other than
/// `name` and `arguments` stay in `extra` (the latter under `extra["function"]`).
fn tool_call_from_value(v: Value, at: At<'_>, j: usize) -> Result<ToolCall, BadField> {
    let valid = v.get("id").is_some_and(Value::is_string)
        && v.get("function").is_some_and(|f| {
            f.get("name").is_some_and(Value::is_string)
                && f.get("arguments").is_some_and(Value::is_string)
        });
    let Value::Object(mut call) = v else {
        return Err(bad_call(at, j));
    };
    if !valid {
        return Err(bad_call(at, j));
    }
    let id = take_string(&mut call, "id").unwrap_or_default();
    let mut function = match call.remove("function") {
        Some(Value::Object(f)) => f,
        _ => JsonObject::new(),
    };
    let name = take_string(&mut function, "name").unwrap_or_default();
    let arguments = take_string(&mut function, "arguments").unwrap_or_default();
    if call.get("type").and_then(Value::as_str) == Some("function") {
        call.remove("type");
    }
    if !function.is_empty() {
        call.insert("function".into(), Value::Object(function));
    }
    Ok(ToolCall {
        id,
        name,
        arguments,
        extra: call,
    })
}

fn bad_call(at: At<'_>, j: usize) -> BadField {
    BadField::new(
        format_args!("{at}.tool_calls[{j}]"),
        "must be an object with a string `id` and a `function` with string `name` and `arguments`",
    )
}

/// A message on the wire.
pub(super) struct MessageView<'a>(pub(super) &'a Message);

impl Serialize for MessageView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let msg = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", msg.role.as_str())?;
        let content_written = match &msg.content {
            Some(c) => {
                m.serialize_entry("content", &ContentView(c))?;
                true
            }
            // OpenAI wants the key on an assistant turn, `null` when it only calls tools.
            None if msg.role == Role::Assistant => {
                m.serialize_entry("content", &Value::Null)?;
                true
            }
            None => false,
        };
        if let Some(name) = &msg.name {
            m.serialize_entry("name", name)?;
        }
        if let Some(id) = &msg.tool_call_id {
            m.serialize_entry("tool_call_id", id)?;
        }
        if !msg.tool_calls.is_empty() {
            m.serialize_entry("tool_calls", &Each(&msg.tool_calls, ToolCallView))?;
        }
        if !msg.reasoning.is_empty() {
            m.serialize_entry("reasoning_content", &ReasoningText(&msg.reasoning))?;
        }
        put_extra(&mut m, &msg.extra, |k| match k {
            "role" => true,
            "content" => content_written,
            "name" => msg.name.is_some(),
            "tool_call_id" => msg.tool_call_id.is_some(),
            "tool_calls" => !msg.tool_calls.is_empty(),
            "reasoning_content" => !msg.reasoning.is_empty(),
            _ => false,
        })?;
        m.end()
    }
}

/// The texts of a turn's reasoning blocks as one `reasoning_content`.
struct ReasoningText<'a>(&'a [Reasoning]);

impl Serialize for ReasoningText<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            [one] => s.serialize_str(&one.text),
            many => s.serialize_str(&many.iter().map(|r| r.text.as_str()).collect::<String>()),
        }
    }
}

/// A message's content.
struct ContentView<'a>(&'a Content);

impl Serialize for ContentView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Content::Text(t) => s.serialize_str(t),
            Content::Parts(parts) => Each(parts, PartView).serialize(s),
        }
    }
}

/// One content part.
struct PartView<'a>(&'a ContentPart);

impl Serialize for PartView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            ContentPart::Text { text, extra } => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("type", "text")?;
                m.serialize_entry("text", text)?;
                put_extra(&mut m, extra, |k| k == "type" || k == "text")?;
                m.end()
            }
            ContentPart::Image { url, detail, extra } => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("type", "image_url")?;
                m.serialize_entry("image_url", &ImageUrlView { url, detail })?;
                put_extra(&mut m, extra, |k| k == "type" || k == "image_url")?;
                m.end()
            }
            ContentPart::Other(o) => o.serialize(s),
        }
    }
}

/// `{"url", "detail"}` of an image part.
struct ImageUrlView<'a> {
    url: &'a str,
    detail: &'a Option<String>,
}

impl Serialize for ImageUrlView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("url", self.url)?;
        if let Some(d) = self.detail {
            m.serialize_entry("detail", d)?;
        }
        m.end()
    }
}

/// A whole tool call of a message.
struct ToolCallView<'a>(&'a ToolCall);

impl Serialize for ToolCallView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let call = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &call.id)?;
        if !call.extra.contains_key("type") {
            m.serialize_entry("type", "function")?;
        }
        m.serialize_entry(
            "function",
            &FunctionCallView {
                name: Some(&call.name),
                arguments: &call.arguments,
                rest: call.extra.get("function"),
            },
        )?;
        put_extra(&mut m, &call.extra, |k| k == "id" || k == "function")?;
        m.end()
    }
}

/// The `function` of a tool call or of a piece of one: `rest` holds the keys the wire sent
/// besides `name` and `arguments`.
pub(super) struct FunctionCallView<'a> {
    pub(super) name: Option<&'a str>,
    pub(super) arguments: &'a str,
    pub(super) rest: Option<&'a Value>,
}

impl Serialize for FunctionCallView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(n) = self.name {
            m.serialize_entry("name", n)?;
        }
        m.serialize_entry("arguments", self.arguments)?;
        if let Some(Value::Object(rest)) = self.rest {
            put_extra(&mut m, rest, |k| {
                k == "arguments" || (k == "name" && self.name.is_some())
            })?;
        }
        m.end()
    }
}
