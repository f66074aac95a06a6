//! W3C Trace Context (`traceparent`, `tracestate`): parsed from a caller's headers or gRPC
//! metadata, and written on the upstream request.

/// A caller's span, as its `traceparent` (and `tracestate`) named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of tollgate's server span.
    pub parent_id: [u8; 8],
    /// The trace flags; bit 0 is `sampled`.
    pub flags: u8,
    /// The caller's `tracestate`, passed on as it came (when it is plain and short).
    pub tracestate: Option<String>,
}

/// The most `tracestate` tollgate passes on (the W3C limit is 512 characters).
const MAX_TRACESTATE: usize = 512;

impl TraceParent {
    /// Parses a `traceparent` value (version `00`, or a later version read as `00` as the W3C
    /// spec asks); `None` when it is malformed, so the request starts a new trace.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceParent> {
        let v = traceparent.trim();
        let b = v.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = lower_hex(&v[0..2])?;
        if version[0] == 0xff || (version[0] == 0 && b.len() != 55) {
            return None;
        }
        if b.len() > 55 && b[55] != b'-' {
            return None;
        }
        let trace_id: [u8; 16] = lower_hex(&v[3..35])?.try_into().ok()?;
        let parent_id: [u8; 8] = lower_hex(&v[36..52])?.try_into().ok()?;
        let flags = lower_hex(&v[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE
                    && s.bytes().all(|c| (0x20..0x7f).contains(&c))
            })
            .map(str::to_string);
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
            tracestate,
        })
    }

    /// Whether the caller recorded its span (then tollgate records its own).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The `traceparent` value of span `span_id` in trace `trace_id`.
pub fn format_traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> String {
    format!(
        "00-{}-{}-{:02x}",
        hex::encode(trace_id),
        hex::encode(span_id),
        flags
    )
}

/// Lowercase hex only: the W3C spec refuses uppercase.
fn lower_hex(s: &str) -> Option<Vec<u8>> {
    if !s
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    hex::decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_version_00_header_and_round_trips() {
        let p = TraceParent::parse(GOOD, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(hex::encode(p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(p.parent_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        assert_eq!(p.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(format_traceparent(&p.trace_id, &p.parent_id, p.flags), GOOD);
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_00_and_not_sampled_is_kept() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future";
        let p = TraceParent::parse(v, None).expect("later versions are read");
        assert!(!p.sampled());
    }

    #[test]
    fn an_unsafe_tracestate_is_dropped() {
        let p = TraceParent::parse(GOOD, Some("a=b\r\nx-api-key: sk")).expect("valid");
        assert_eq!(p.tracestate, None);
        let long = "a=".to_string() + &"b".repeat(600);
        assert_eq!(
            TraceParent::parse(GOOD, Some(&long)).unwrap().tracestate,
            None
        );
    }
}
