//! What a failed upstream call means: a transport error classified, the caller-safe message of
//! an error body, and the `Retry-After` of a refusal.

use std::time::Duration;

use serde_json::Value;

use crate::providers::UpstreamError;

/// A connect that passed `connect_timeout_ms` is a timeout (hyper reports it as a connect
/// error whose cause timed out, so that is asked first); other connection failures are
/// `Connect`; anything else while sending is a bad response.
pub(super) fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    if e.is_connect() {
        if caused_by_timeout(e) {
            UpstreamError::Timeout("connect")
        } else {
            UpstreamError::Connect(deepest_cause(e))
        }
    } else {
        UpstreamError::BadResponse(deepest_cause(e))
    }
}

fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// The innermost cause of an error: short, and free of the URL.
pub(super) fn deepest_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        deepest = s.to_string();
        source = s.source();
    }
    deepest
}

/// The `error.message` of an error body (OpenAI's and Anthropic's shapes both keep it there),
/// or the start of the body.
pub(super) fn error_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
            return m.to_string();
        }
    }
    let t = text.trim();
    if t.is_empty() {
        "no body".into()
    } else {
        t.chars().take(300).collect()
    }
}

/// `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date (measured from `now_ms`,
/// the gateway clock's now, so that a test clock decides how long a date-given cooldown is).
pub(super) fn retry_after(h: &http::HeaderMap, now_ms: i64) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let v = h.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let when = httpdate_parse(v)?;
    let now = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(now_ms).unwrap_or(0));
    Some(when.duration_since(now).unwrap_or_default())
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP requires senders to use.
fn httpdate_parse(s: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date() {
        let t = httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            784111777
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h, 0), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h, 0), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn retry_after_as_a_date_counts_from_the_given_now() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "retry-after",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        let now_ms = 784_111_777_000 - 42_000;
        assert_eq!(retry_after(&h, now_ms), Some(Duration::from_secs(42)));
        assert_eq!(retry_after(&h, now_ms + 60_000), Some(Duration::ZERO));
    }

    #[test]
    fn error_messages_of_both_shapes() {
        assert_eq!(error_message(r#"{"error":{"message":"m1"}}"#), "m1");
        assert_eq!(
            error_message(r#"{"type":"error","error":{"type":"overloaded_error","message":"m2"}}"#),
            "m2"
        );
        assert_eq!(error_message(""), "no body");
    }
}
