//! What lets a request pass through to an upstream that speaks the caller's own wire: which
//! inbound API a request came in on, the body exactly as the caller sent it, and a byte-exact
//! rewrite of one JSON string value (the `model`) that leaves every other byte alone.

use std::ops::Range;

use bytes::Bytes;

/// Which inbound API a model request came in on (the `api` label and ledger column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Api {
    /// OpenAI chat completions (HTTP `/v1/chat/completions`, gRPC `Complete`/`StreamComplete`).
    #[default]
    ChatCompletions,
    /// The Anthropic Messages API (`/v1/messages`).
    Messages,
    /// OpenAI embeddings (HTTP `/v1/embeddings`, gRPC `Embed`).
    Embeddings,
    /// The OpenAI Responses API (`/v1/responses`).
    Responses,
}

impl Api {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Messages => "messages",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
        }
    }
}

/// A request body in the caller's own wire, kept for an upstream that speaks it natively.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeBody {
    /// The wire the body is in.
    pub api: Api,
    /// The body exactly as received.
    pub body: Bytes,
    /// The caller's `anthropic-version`, if sent.
    pub anthropic_version: Option<String>,
    /// The caller's `anthropic-beta` values, in order.
    pub anthropic_beta: Vec<String>,
    /// The body asks for a stream's usage for tollgate's accounting, not the caller's (an
    /// OpenAI chat stream given `stream_options.include_usage`): the usage is kept from the
    /// caller.
    pub hide_usage: bool,
    /// Why the body cannot be translated for an upstream that does not speak its wire (it
    /// needs state or a built-in tool only such an upstream has); `None` when it can be.
    pub untranslatable: Option<String>,
}

/// `json` with the string value at `path` (object keys from the top) replaced by `value`,
/// every other byte as it was. `None` when `json` has no string at `path`.
pub fn replace_string(json: &[u8], path: &[&str], value: &str) -> Option<Vec<u8>> {
    Some(replace_span(json, string_span(json, path)?, value))
}

/// `json` with the bytes at `span` (a JSON value's) replaced by the string `value`, every
/// other byte as it was.
pub fn replace_span(json: &[u8], span: Range<usize>, value: &str) -> Vec<u8> {
    // Room for the quotes and a few escapes; the string is encoded straight into the output.
    let mut out = Vec::with_capacity(json.len() + value.len() + 8);
    out.extend_from_slice(&json[..span.start]);
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(&json[span.end..]);
    out
}

/// An answer's bytes with its top-level `model` string set to `model`; as they were when there
/// is none.
pub fn with_model(answer: Bytes, model: &str) -> Bytes {
    replace_string(&answer, &["model"], model)
        .map(Bytes::from)
        .unwrap_or(answer)
}

/// `json`, an object, with `member` (`"key":value`) written as its first member, every other
/// byte as it was; `None` when `json` is not an object.
pub fn with_first_member(json: &[u8], member: &str) -> Option<Vec<u8>> {
    let mut s = Scanner { b: json, i: 0 };
    s.ws();
    if s.peek()? != b'{' {
        return None;
    }
    let open = s.i + 1;
    s.i = open;
    s.ws();
    let empty = s.peek()? == b'}';
    let mut out = Vec::with_capacity(json.len() + member.len() + 1);
    out.extend_from_slice(&json[..open]);
    out.extend_from_slice(member.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&json[open..]);
    Some(out)
}

/// `json` with its top-level member `key` taken out when that member is `null` (and with it
/// the comma that joined it to a neighbour), every other byte as it was; `None` when there is
/// no such member.
pub fn without_null_member(json: &[u8], key: &str) -> Option<Vec<u8>> {
    let mut s = Scanner { b: json, i: 0 };
    let (key_start, value) = s.member_with_key(key)?;
    if &json[value.clone()] != b"null" {
        return None;
    }
    let before = json[..key_start].trim_ascii_end();
    let (cut_from, cut_to) = if before.last() == Some(&b',') {
        // A member after another: its comma goes with it.
        (before.len() - 1, value.end)
    } else {
        // The first member: the comma after it goes, when there is one.
        let after = &json[value.end..];
        let gap = after.len() - after.trim_ascii_start().len();
        match after.get(gap) {
            Some(b',') => (key_start, value.end + gap + 1),
            _ => (key_start, value.end),
        }
    };
    let mut out = Vec::with_capacity(json.len());
    out.extend_from_slice(&json[..cut_from]);
    out.extend_from_slice(&json[cut_to..]);
    Some(out)
}

/// The byte range (quotes included) of the string value at `path`.
fn string_span(json: &[u8], path: &[&str]) -> Option<Range<usize>> {
    let mut s = Scanner { b: json, i: 0 };
    let range = if path.is_empty() {
        s.value_range()?
    } else {
        // Each object on the path is scanned once, by `member` (which reads it to its end).
        s.ws();
        let mut range = s.i..s.i;
        for key in path {
            let mut inner = Scanner {
                b: json,
                i: range.start,
            };
            range = inner.member(key)?;
        }
        range
    };
    (json.get(range.start) == Some(&b'"')).then_some(range)
}

/// A minimal JSON scanner: it finds value boundaries without building values.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skips a string starting at the current `"`; returns the range of its raw contents
    /// (between the quotes, escapes as written).
    fn string(&mut self) -> Option<Range<usize>> {
        if self.peek()? != b'"' {
            return None;
        }
        self.i += 1;
        let start = self.i;
        // Most of an answer's bytes are in its strings: jump from one quote or backslash to
        // the next instead of stepping over every byte.
        while let Some(at) = memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?) {
            self.i += at;
            if self.b[self.i] == b'\\' {
                self.i += 2;
            } else {
                self.i += 1;
                return Some(start..self.i - 1);
            }
        }
        None
    }

    /// Whether the raw string contents at `raw` say `key`: compared as bytes, decoded only
    /// when written with escapes (the scan itself allocates nothing).
    fn says(&self, raw: Range<usize>, key: &str) -> bool {
        let text = &self.b[raw.clone()];
        if !text.contains(&b'\\') {
            return text == key.as_bytes();
        }
        serde_json::from_slice::<String>(&self.b[raw.start - 1..raw.end + 1])
            .is_ok_and(|k| k == key)
    }

    /// Skips one value; returns its range.
    fn value_range(&mut self) -> Option<Range<usize>> {
        self.ws();
        let start = self.i;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while self.i < self.b.len() && !matches!(self.b[self.i], b',' | b'}' | b']') {
                    self.i += 1;
                }
                while self.i > start && matches!(self.b[self.i - 1], b' ' | b'\t' | b'\n' | b'\r') {
                    self.i -= 1;
                }
            }
        }
        Some(start..self.i)
    }

    /// In the object at the current position, the range of the value of `key` (the last one
    /// when it repeats, as a JSON parser keeps it).
    fn member(&mut self, key: &str) -> Option<Range<usize>> {
        self.member_with_key(key).map(|(_, value)| value)
    }

    /// [`Self::member`], with where the member's key starts (its opening quote).
    fn member_with_key(&mut self, key: &str) -> Option<(usize, Range<usize>)> {
        self.ws();
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
        let mut found = None;
        loop {
            self.ws();
            match self.peek()? {
                b'}' => return found,
                b',' => {
                    self.i += 1;
                    continue;
                }
                _ => {}
            }
            let key_start = self.i;
            let k = self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            let r = self.value_range()?;
            if self.says(k, key) {
                found = Some((key_start, r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_model_bytes() {
        let body = br#"{ "max_tokens" : 5,"model":"claude-x",  "messages":[{"model":"no"}], "z": 1.50e0 }"#;
        let out = replace_string(body, &["model"], "claude-y").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{ "max_tokens" : 5,"model":"claude-y",  "messages":[{"model":"no"}], "z": 1.50e0 }"#
        );
    }

    #[test]
    fn a_key_written_with_escapes_is_the_same_key() {
        let body = br#"{"mod\u0065l":"a","x":"\"model\""}"#;
        let out = replace_string(body, &["model"], "b").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"mod\u0065l":"b","x":"\"model\""}"#
        );
        assert!(replace_string(br#"{"mode":"a","models":"b"}"#, &["model"], "x").is_none());
        assert!(replace_string(br#"{"model":"unterminated}"#, &["model"], "x").is_none());
        // A body cut short after its model is not rewritten; of two models the last is the one.
        assert!(replace_string(br#"{"model":"a","x":["b\"#, &["model"], "x").is_none());
        assert_eq!(
            replace_string(br#"{"model":"a","model":"b"}"#, &["model"], "c").unwrap(),
            br#"{"model":"a","model":"c"}"#
        );
    }

    #[test]
    fn a_first_member_goes_in_before_the_others() {
        let member = r#""stream_options":{"include_usage":true}"#;
        assert_eq!(
            with_first_member(br#" {"model":"m", "stream":true}"#, member).unwrap(),
            br#" {"stream_options":{"include_usage":true},"model":"m", "stream":true}"#
        );
        assert_eq!(
            with_first_member(b"{ }", member).unwrap(),
            br#"{"stream_options":{"include_usage":true} }"#
        );
        assert!(with_first_member(b"[1]", member).is_none());
        assert!(with_first_member(b"", member).is_none());
    }

    #[test]
    fn a_null_member_is_taken_out_with_one_comma() {
        let cut = |json: &str| {
            without_null_member(json.as_bytes(), "usage").map(|b| String::from_utf8(b).unwrap())
        };
        assert_eq!(
            cut(r#"{"id":"x","usage":null,"z":1}"#).unwrap(),
            r#"{"id":"x","z":1}"#
        );
        assert_eq!(
            cut(r#"{"id":"x" , "usage" : null}"#).unwrap(),
            r#"{"id":"x" }"#
        );
        assert_eq!(
            cut(r#"{"usage":null , "id":"x"}"#).unwrap(),
            r#"{ "id":"x"}"#
        );
        assert_eq!(cut(r#"{ "usage":null }"#).unwrap(), r#"{  }"#);
        // Only a top-level `null` goes; a value, a nested one or none leaves the bytes alone.
        assert!(cut(r#"{"usage":{"prompt_tokens":1}}"#).is_none());
        assert!(cut(r#"{"choices":[{"usage":null}]}"#).is_none());
        assert!(cut(r#"{"id":"x"}"#).is_none());
    }

    #[test]
    fn nested_path_and_escapes() {
        let body = br#"{"type":"message_start","message":{"id":"m\"1","model":"a\u00e9","x":[1,{"y":"}"}]}}"#;
        let out = replace_string(body, &["message", "model"], "p/m").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"type":"message_start","message":{"id":"m\"1","model":"p/m","x":[1,{"y":"}"}]}}"#
        );
        assert!(replace_string(body, &["model"], "x").is_none());
        assert!(replace_string(b"[1]", &["model"], "x").is_none());
        assert!(replace_string(br#"{"model":5}"#, &["model"], "x").is_none());
    }
}
