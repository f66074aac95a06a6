//! Incremental Server-Sent Events parsing: bytes in as they arrive, `data` payloads out as soon
//! as their event is complete. Nothing is buffered beyond the current event.

use bytes::{Buf, BytesMut};

/// A line or event longer than the parser's cap: a hostile or broken upstream, never an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an SSE line or event from the upstream exceeds {limit} bytes")]
pub struct SseTooLong {
    /// The cap that was passed.
    pub limit: usize,
}

/// Splits a byte stream into SSE `data` payloads.
pub struct SseParser {
    buf: BytesMut,
    data: Option<String>,
    /// How far into `buf` is known to hold no `\n`, so a read scans only the new bytes.
    clean: usize,
    /// The longest line or event's data kept before giving up.
    limit: usize,
    /// Bytes examined for a line end, over the parser's life (tests check the work is linear).
    scanned: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl SseParser {
    /// A parser that refuses a line, or an event's data, longer than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            data: None,
            clean: 0,
            limit,
            scanned: 0,
        }
    }

    /// Bytes examined so far while looking for line ends.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Feeds bytes; returns the payloads of the events they complete, or an error once a
    /// line or an event outgrows the cap (the parser is then spent).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseTooLong> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let fresh = &self.buf[self.clean..];
            let found = fresh.iter().position(|&b| b == b'\n');
            self.scanned += found.map_or(fresh.len(), |i| i + 1) as u64;
            let Some(i) = found else {
                self.clean = self.buf.len();
                break;
            };
            let pos = self.clean + i;
            self.clean = 0;
            let mut line = self.buf.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            self.line(&line, &mut out);
            if self.data.as_ref().is_some_and(|d| d.len() > self.limit) {
                return Err(SseTooLong { limit: self.limit });
            }
        }
        if self.buf.len() > self.limit {
            return Err(SseTooLong { limit: self.limit });
        }
        Ok(out)
    }

    /// Ends the stream; returns a final event that had no blank line after it.
    pub fn finish(&mut self) -> Option<String> {
        if !self.buf.is_empty() {
            let rest = self.buf.split();
            self.clean = 0;
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
pub struct EventSplitter {
    buf: BytesMut,
    /// Where the search for the event's end resumes: the bytes before it hold no end.
    from: usize,
    /// The longest event kept before giving up.
    limit: usize,
    /// Bytes examined for an event end, over the splitter's life.
    scanned: u64,
}

impl Default for EventSplitter {
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl EventSplitter {
    /// A splitter that refuses an event longer than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            from: 0,
            limit,
            scanned: 0,
        }
    }

    /// Bytes examined so far while looking for event ends.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Feeds bytes; returns the events they complete, or an error once an event outgrows the
    /// cap.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<RawEventBytes>, SseTooLong> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let (end, looked) = event_end(&self.buf, self.from);
            self.scanned += looked as u64;
            let Some(end) = end else {
                // A `\n` or `\n\r` at the very end may be completed by the next read.
                self.from = self.buf.len().saturating_sub(2);
                break;
            };
            self.from = 0;
            let raw = self.buf.split_to(end).freeze();
            if raw.len() > self.limit {
                return Err(SseTooLong { limit: self.limit });
            }
            out.push(with_data(raw));
        }
        if self.buf.len() > self.limit {
            return Err(SseTooLong { limit: self.limit });
        }
        Ok(out)
    }

    /// Ends the stream; returns what is left (an event with no blank line after it).
    pub fn finish(&mut self) -> Option<RawEventBytes> {
        self.from = 0;
        (!self.buf.is_empty()).then(|| with_data(self.buf.split().freeze()))
    }
}

/// One event's exact bytes and its `data` payload.
pub type RawEventBytes = (bytes::Bytes, Option<String>);

/// Where the first event in `buf` ends (after its blank line), searching from `from`, and how
/// many bytes the search examined.
fn event_end(buf: &[u8], from: usize) -> (Option<usize>, usize) {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return (Some(i + 2), i + 1 - from),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => {
                    return (Some(i + 3), i + 1 - from)
                }
                _ => {}
            }
        }
        i += 1;
    }
    (None, buf.len().saturating_sub(from))
}

fn with_data(raw: bytes::Bytes) -> RawEventBytes {
    let mut p = SseParser::default();
    // Without a cap the parser cannot fail; the splitter has already bounded the event.
    let mut data = p.push(&raw).unwrap_or_default();
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
    let new_data = crate::api::native::replace_string(data.as_bytes(), path, value)?;
    with_event_data(raw, data, &new_data)
}

/// An event's bytes with its data `data` (one line, so verbatim in the bytes) replaced by
/// `new_data`; `None` when the bytes do not hold it.
pub fn with_event_data(raw: &[u8], data: &str, new_data: &[u8]) -> Option<bytes::Bytes> {
    let data_at = |i: usize| raw.get(i..i + data.len()) == Some(data.as_bytes());
    // Where the first `data:` field's value starts (after its one optional space) is where
    // the data is, but for a payload of several lines; only then is it searched for.
    let at = memchr::memmem::find(raw, b"data:")
        .map(|i| {
            if raw.get(i + 5) == Some(&b' ') {
                i + 6
            } else {
                i + 5
            }
        })
        .filter(|&i| data_at(i))
        .or_else(|| memchr::memmem::find(raw, data.as_bytes()))?;
    let mut out = Vec::with_capacity(raw.len() - data.len() + new_data.len());
    out.extend_from_slice(&raw[..at]);
    out.extend_from_slice(new_data);
    out.extend_from_slice(&raw[at + data.len()..]);
    Some(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_events_keep_their_bytes() {
        let mut s = EventSplitter::default();
        assert!(s.push(b"event: ping\ndata: {}").unwrap().is_empty());
        let got = s.push(b"\n\nevent: a\r\ndata: 1\r\n\r\n: c\n\n").unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0].0[..], b"event: ping\ndata: {}\n\n");
        assert_eq!(got[0].1.as_deref(), Some("{}"));
        assert_eq!(&got[1].0[..], b"event: a\r\ndata: 1\r\n\r\n");
        assert_eq!(got[1].1.as_deref(), Some("1"));
        assert_eq!(got[2].1, None);
        assert!(s.finish().is_none());
    }

    #[test]
    fn event_data_is_replaced_where_it_is() {
        let replaced = |raw: &str, data: &str| {
            String::from_utf8(
                with_event_data(raw.as_bytes(), data, b"NEW")
                    .unwrap()
                    .to_vec(),
            )
            .unwrap()
        };
        assert_eq!(
            replaced("data: {\"a\":1}\n\n", "{\"a\":1}"),
            "data: NEW\n\n"
        );
        assert_eq!(replaced("data:{}\r\n\r\n", "{}"), "data:NEW\r\n\r\n");
        assert_eq!(
            replaced("event: x\ndata: {}\n\n", "{}"),
            "event: x\ndata: NEW\n\n"
        );
        // Data of several lines is not verbatim in the bytes.
        assert!(with_event_data(b"data: a\ndata: b\n\n", "a\nb", b"NEW").is_none());
        assert!(with_event_data(b"data: x\n\n", "y", b"NEW").is_none());
    }

    #[test]
    fn events_split_across_reads() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(
            p.push(b":1}\n\ndata: [DONE]\r\n\r\n").unwrap(),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn comments_and_multiline() {
        let mut p = SseParser::default();
        assert_eq!(
            p.push(b": ping\n\ndata: a\ndata: b\n\n").unwrap(),
            vec!["a\nb"]
        );
        assert_eq!(p.push(b"data: tail").unwrap(), Vec::<String>::new());
        assert_eq!(p.finish().as_deref(), Some("tail"));
    }

    /// A 10 MB line fed in 1 KB pieces: each byte is examined for a line end a bounded number
    /// of times (the old parser rescanned the whole buffer on every read: ~50 G bytes).
    #[test]
    fn a_long_line_in_small_pieces_is_scanned_once() {
        const TOTAL: usize = 10 << 20;
        let piece = vec![b'x'; 1024];
        let mut p = SseParser::default();
        assert!(p.push(b"data: ").unwrap().is_empty());
        for _ in 0..TOTAL / 1024 {
            assert!(p.push(&piece).unwrap().is_empty());
        }
        assert_eq!(p.push(b"\n\n").unwrap().len(), 1);
        assert!(
            p.scanned() <= (TOTAL + 16) as u64,
            "scanned {}",
            p.scanned()
        );

        let mut s = EventSplitter::default();
        assert!(s.push(b"data: ").unwrap().is_empty());
        for _ in 0..TOTAL / 1024 {
            assert!(s.push(&piece).unwrap().is_empty());
        }
        let got = s.push(b"\n\n").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.len(), TOTAL + 8);
        // At most two bytes are looked at again per read (an end split across reads).
        let bound = (TOTAL + 16 + 2 * (TOTAL / 1024 + 2)) as u64;
        assert!(s.scanned() <= bound, "scanned {}", s.scanned());
    }

    #[test]
    fn an_event_end_split_across_reads_is_found() {
        let mut s = EventSplitter::default();
        assert!(s.push(b"data: 1\n").unwrap().is_empty());
        assert!(s.push(b"\r").unwrap().is_empty());
        let got = s.push(b"\ndata: 2\n").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].0[..], b"data: 1\n\r\n");
        assert_eq!(s.push(b"\n").unwrap()[0].1.as_deref(), Some("2"));
    }

    #[test]
    fn a_line_or_event_over_the_cap_is_an_error() {
        let piece = vec![b'x'; 1024];
        let mut p = SseParser::with_limit(64 * 1024);
        let mut failed = false;
        for _ in 0..100 {
            if p.push(&piece).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a never-ending line must fail");
        // Many short data lines in one event count too.
        let mut p = SseParser::with_limit(64 * 1024);
        let line = [b"data: ".as_slice(), &piece, b"\n"].concat();
        let err = (0..100).find_map(|_| p.push(&line).err());
        assert_eq!(err, Some(SseTooLong { limit: 64 * 1024 }));
        // Whole events under the cap pass.
        let mut p = SseParser::with_limit(64 * 1024);
        for _ in 0..100 {
            assert_eq!(p.push(&[&line[..], b"\n"].concat()).unwrap().len(), 1);
        }

        let mut s = EventSplitter::with_limit(64 * 1024);
        let err = (0..100).find_map(|_| s.push(&line).err());
        assert_eq!(err, Some(SseTooLong { limit: 64 * 1024 }));
    }
}
