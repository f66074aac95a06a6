//! Incremental Server-Sent Events parsing: bytes in as they arrive, `data` payloads out as soon
//! as their event is complete. Nothing is buffered beyond the current event.

use bytes::{Buf, BytesMut};

/// Splits a byte stream into SSE `data` payloads.
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; returns the payloads of the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line = self.buf.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            self.line(&line, &mut out);
        }
        out
    }

    /// Ends the stream; returns a final event that had no blank line after it.
    pub fn finish(&mut self) -> Option<String> {
        if !self.buf.is_empty() {
            let rest = self.buf.split();
            let mut out = Vec::new();
            self.line(&rest, &mut out);
        }
        self.data.take()
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(d) = self.data.take() {
                out.push(d);
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, mut value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        if value.first() == Some(&b' ') {
            value.advance(1);
        }
        if field == b"data" {
            let value = String::from_utf8_lossy(value);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            }
        }
    }
}

/// Splits a byte stream into whole SSE events, each as its exact bytes (the blank line that
/// ends it included) and its `data` payload, for a pass-through that must not change a byte.
#[derive(Default)]
pub struct EventSplitter {
    buf: BytesMut,
}

impl EventSplitter {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(bytes::Bytes, Option<String>)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let raw = self.buf.split_to(end).freeze();
            out.push(with_data(raw));
        }
        out
    }

    /// Ends the stream; returns what is left (an event with no blank line after it).
    pub fn finish(&mut self) -> Option<(bytes::Bytes, Option<String>)> {
        (!self.buf.is_empty()).then(|| with_data(self.buf.split().freeze()))
    }
}

/// Where the first event in `buf` ends (after its blank line), if it is complete.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

fn with_data(raw: bytes::Bytes) -> (bytes::Bytes, Option<String>) {
    let mut p = SseParser::default();
    let mut data = p.push(&raw);
    data.extend(p.finish());
    (raw, data.into_iter().next())
}

/// An event's bytes with the string at `path` of its data replaced by `value`. The data is one
/// line in the streams Anthropic and OpenAI send, so it appears verbatim in the bytes; `None`
/// when it does not or has no string there.
pub fn rewrite_event_data(
    raw: &[u8],
    data: &str,
    path: &[&str],
    value: &str,
) -> Option<bytes::Bytes> {
    let text = std::str::from_utf8(raw).ok()?;
    let at = text.find(data)?;
    let new_data = crate::api::native::replace_string(data.as_bytes(), path, value)?;
    let mut out = Vec::with_capacity(raw.len() + value.len());
    out.extend_from_slice(&raw[..at]);
    out.extend_from_slice(&new_data);
    out.extend_from_slice(&raw[at + data.len()..]);
    Some(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_events_keep_their_bytes() {
        let mut s = EventSplitter::default();
        assert!(s.push(b"event: ping\ndata: {}").is_empty());
        let got = s.push(b"\n\nevent: a\r\ndata: 1\r\n\r\n: c\n\n");
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0].0[..], b"event: ping\ndata: {}\n\n");
        assert_eq!(got[0].1.as_deref(), Some("{}"));
        assert_eq!(&got[1].0[..], b"event: a\r\ndata: 1\r\n\r\n");
        assert_eq!(got[1].1.as_deref(), Some("1"));
        assert_eq!(got[2].1, None);
        assert!(s.finish().is_none());
    }

    #[test]
    fn events_split_across_reads() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.push(b":1}\n\ndata: [DONE]\r\n\r\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn comments_and_multiline() {
        let mut p = SseParser::default();
        assert_eq!(p.push(b": ping\n\ndata: a\ndata: b\n\n"), vec!["a\nb"]);
        assert_eq!(p.push(b"data: tail"), Vec::<String>::new());
        assert_eq!(p.finish().as_deref(), Some("tail"));
    }
}
