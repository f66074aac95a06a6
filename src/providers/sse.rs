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

#[cfg(test)]
mod tests {
    use super::*;

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
