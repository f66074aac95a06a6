//! Budget periods and the calendar math behind them: where a period starts and ends, and
//! times as RFC 3339 UTC. Calendar periods are UTC (no time zone database). The type itself
//! is the configuration's ([`crate::config::Period`]), parsed once when it is read.

pub use crate::config::{Period, PeriodError};

use crate::config::period::DAY_MS;
use crate::short_text::ShortText;

impl Period {
    /// The start of the period that contains `now` (unix ms).
    pub fn start(&self, now: i64) -> i64 {
        match self {
            Period::Total => 0,
            Period::Daily => now.div_euclid(DAY_MS) * DAY_MS,
            Period::Weekly => {
                let days = now.div_euclid(DAY_MS);
                // 1970-01-01 was a Thursday: Monday is 3 days before day 0 modulo 7.
                let since_monday = (days + 3).rem_euclid(7);
                (days - since_monday) * DAY_MS
            }
            Period::Monthly => {
                let (y, m, _) = civil_from_days(now.div_euclid(DAY_MS));
                days_from_civil(y, m, 1) * DAY_MS
            }
            Period::Every(len) => now.div_euclid(*len) * len,
        }
    }

    /// When the period that started at `start` ends; `None` for `total`.
    pub fn end(&self, start: i64) -> Option<i64> {
        match self {
            Period::Total => None,
            Period::Daily => Some(start + DAY_MS),
            Period::Weekly => Some(start + 7 * DAY_MS),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(start.div_euclid(DAY_MS));
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some(days_from_civil(y, m, 1) * DAY_MS)
            }
            Period::Every(len) => Some(start + len),
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Unix ms as RFC 3339 UTC (`2026-11-28T00:00:00Z`).
pub fn rfc3339(ms: i64) -> String {
    Rfc3339(ms).to_string()
}

/// Unix ms written as [`rfc3339`] writes them, in place.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub i64);

impl Rfc3339 {
    /// The time as `YYYY-MM-DDTHH:MM:SSZ` (what `Display` writes), digit by digit.
    pub fn text(self) -> ShortText {
        let days = self.0.div_euclid(DAY_MS);
        let rest = (self.0.rem_euclid(DAY_MS) / 1000) as u64;
        let (y, m, d) = civil_from_days(days);
        let mut t = ShortText::default();
        if y < 0 {
            // Before year 0, as `{:04}` writes it: the sign, then three digits or more.
            t.push_str("-");
            t.push_u64(y.unsigned_abs(), 3);
        } else {
            t.push_u64(y as u64, 4);
        }
        for (sep, n) in [
            ("-", m as u64),
            ("-", d as u64),
            ("T", rest / 3600),
            (":", rest % 3600 / 60),
            (":", rest % 60),
        ] {
            t.push_str(sep);
            t.push_u64(n, 2);
        }
        t.push_str("Z");
        t
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// Parses a time given as unix milliseconds, an RFC 3339 UTC time (`...Z`) or a date
/// (`YYYY-MM-DD`, midnight UTC).
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || {
        format!("{s:?} is not a time: use unix milliseconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")
    };
    let num = |a: usize, b: usize| -> Result<i64, String> {
        s.get(a..b)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    if s.len() < 10 || &s[4..5] != "-" || &s[7..8] != "-" {
        return Err(bad());
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, mo, d) * DAY_MS;
    if s.len() > 10 {
        let t = &s[10..];
        if !(t.starts_with('T') || t.starts_with(' ')) || !t.ends_with('Z') || t.len() < 10 {
            return Err(bad());
        }
        let (h, mi, se) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
        if h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        ms += (h * 3600 + mi * 60 + se) * 1000;
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_795_000_000_000; // 2026-11-18T...Z

    #[test]
    fn times_are_written_as_the_format_string_writes_them() {
        // From before year 0 to after 9999, every second of one day, and some leap days.
        let mut times = vec![
            i64::MIN / 2,
            -62_200_000_000_000,
            -1,
            0,
            1,
            253_402_300_800_000,
        ];
        times.extend((0..86_400).map(|s| T + s * 1000));
        times.extend((0..400).map(|y| y * 366 * DAY_MS + 59 * DAY_MS));
        for ms in times {
            let days = ms.div_euclid(DAY_MS);
            let rest = ms.rem_euclid(DAY_MS) / 1000;
            let (y, m, d) = civil_from_days(days);
            let want = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                rest / 3600,
                rest % 3600 / 60,
                rest % 60
            );
            assert_eq!(Rfc3339(ms).text(), want.as_str(), "{ms}");
        }
    }

    #[test]
    fn calendar_periods_are_utc() {
        let now = parse_time("2026-11-27T15:04:05Z").unwrap();
        let at = |s: &str| parse_time(s).unwrap();
        assert_eq!(Period::Daily.start(now), at("2026-11-27"));
        assert_eq!(Period::Daily.end(at("2026-11-27")), Some(at("2026-11-28")));
        // 2026-11-27 is a Friday; the week began on Monday the 23rd.
        assert_eq!(Period::Weekly.start(now), at("2026-11-23"));
        assert_eq!(Period::Weekly.end(at("2026-11-23")), Some(at("2026-11-30")));
        assert_eq!(Period::Monthly.start(now), at("2026-11-01"));
        assert_eq!(
            Period::Monthly.end(at("2026-11-01")),
            Some(at("2026-12-01"))
        );
        assert_eq!(
            Period::Monthly.end(at("2026-12-01")),
            Some(at("2027-01-01"))
        );
        assert_eq!(
            Period::Monthly.start(at("2024-02-29T23:59:59Z")),
            at("2024-02-01")
        );
        assert_eq!(
            Period::Monthly.end(at("2024-02-01")),
            Some(at("2024-03-01"))
        );
        assert_eq!(
            Period::Every(12 * 3_600_000).start(now),
            at("2026-11-27T12:00:00Z")
        );
        assert_eq!(Period::Total.start(now), 0);
        assert_eq!(Period::Total.end(0), None);
        assert_eq!(rfc3339(at("2026-11-28")), "2026-11-28T00:00:00Z");
        assert_eq!(rfc3339(now), "2026-11-27T15:04:05Z");
        const { assert!(T > 0) };
    }

    #[test]
    fn civil_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("0").unwrap(), 0);
        assert_eq!(parse_time("1970-01-02").unwrap(), DAY_MS);
        assert_eq!(parse_time("1970-01-01T00:01:00Z").unwrap(), 60_000);
        assert!(parse_time("1970-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
