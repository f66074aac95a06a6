//! The budget period as a typed value: parsed once, when the configuration (or an admin
//! request, or a stored row) is read. The calendar math lives with the budgets
//! (`core::policy::budget::period`); this is the leaf both the configuration and the core use.

use serde::{Deserialize, Deserializer};

/// One day in milliseconds.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// A budget period. Calendar periods are UTC; weeks start on Monday; a duration is a fixed
/// window of that length aligned to the Unix epoch (so `12h` resets at 00:00 and 12:00 UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
    /// A fixed window of this many milliseconds (at least one minute).
    Every(i64),
}

/// Why a text is not a period.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    /// Neither a period's name nor a duration.
    #[error(
        "{0:?} is not a period: use daily, weekly, monthly, total or a duration like \"12h\" (s, m, h, d, w)"
    )]
    Unknown(String),
    /// A duration under a minute.
    #[error("{0:?}: a budget period is at least one minute")]
    TooShort(String),
}

impl Period {
    /// Parses `daily`, `weekly`, `monthly`, `total` or a duration: a number and a unit of
    /// `s`, `m`, `h`, `d` or `w` (`"12h"`, `"30m"`, `"7d"`), at least one minute.
    pub fn parse(s: &str) -> Result<Period, PeriodError> {
        let s = s.trim();
        match s {
            "daily" => return Ok(Period::Daily),
            "weekly" => return Ok(Period::Weekly),
            "monthly" => return Ok(Period::Monthly),
            "total" => return Ok(Period::Total),
            _ => {}
        }
        let bad = || PeriodError::Unknown(s.to_string());
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = s.split_at(split);
        let n: i64 = n.parse().map_err(|_| bad())?;
        let unit_ms = match unit {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => DAY_MS,
            "w" => 7 * DAY_MS,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
        if ms < 60_000 {
            return Err(PeriodError::TooShort(s.to_string()));
        }
        Ok(Period::Every(ms))
    }

    /// The canonical name, as stored.
    pub fn name(&self) -> String {
        match self {
            Period::Daily => "daily".into(),
            Period::Weekly => "weekly".into(),
            Period::Monthly => "monthly".into(),
            Period::Total => "total".into(),
            Period::Every(ms) => {
                for (unit, size) in [
                    ("w", 7 * DAY_MS),
                    ("d", DAY_MS),
                    ("h", 3_600_000),
                    ("m", 60_000),
                ] {
                    if ms % size == 0 {
                        return format!("{}{unit}", ms / size);
                    }
                }
                format!("{}s", ms / 1000)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Period, D::Error> {
        let s = String::deserialize(d)?;
        Period::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_name() {
        for (s, name) in [
            ("daily", "daily"),
            ("weekly", "weekly"),
            ("monthly", "monthly"),
            ("total", "total"),
            ("12h", "12h"),
            ("720m", "12h"),
            ("90m", "90m"),
            ("7d", "1w"),
            ("3600s", "1h"),
        ] {
            assert_eq!(Period::parse(s).unwrap().name(), name, "{s}");
        }
        for bad in ["", "yearly", "12", "h", "-1h", "1.5h"] {
            assert_eq!(
                Period::parse(bad),
                Err(PeriodError::Unknown(bad.to_string())),
                "{bad}"
            );
        }
        assert_eq!(
            Period::parse("10s"),
            Err(PeriodError::TooShort("10s".into()))
        );
    }

    #[test]
    fn deserializes_from_its_name_or_says_why_not() {
        #[derive(Deserialize)]
        struct T {
            period: Period,
        }
        let t: T = toml::from_str("period = \"12h\"").unwrap();
        assert_eq!(t.period, Period::Every(12 * 3_600_000));
        let err = toml::from_str::<T>("period = \"yearly\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"yearly\" is not a period"), "{err}");
    }
}
