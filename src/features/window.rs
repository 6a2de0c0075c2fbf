//! Time windows written as `30d`, `7d`, `12h`, `90m`.

use std::fmt;

use chrono::Duration;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A positive duration in whole minutes, at most 366 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    minutes: i64,
}

const MAX_MINUTES: i64 = 366 * 24 * 60;

impl Window {
    /// The longest window accepted.
    pub const LONGEST: Window = Window {
        minutes: MAX_MINUTES,
    };

    pub fn parse(field: &str, raw: &str) -> Result<Self> {
        let raw = raw.trim();
        let bad = || {
            Error::invalid(
                field,
                format!("'{raw}' is not a window such as 30d, 12h or 90m"),
            )
        };
        // The unit is the last character, whatever its width: slicing at a byte offset
        // would panic inside a multi-byte character (found by fuzzing the rules).
        let Some((at, _)) = raw.char_indices().last().filter(|&(at, _)| at > 0) else {
            return Err(bad());
        };
        let (number, unit) = raw.split_at(at);
        let n: i64 = number.parse().map_err(|_| bad())?;
        let per_unit = match unit {
            "m" => 1,
            "h" => 60,
            "d" => 24 * 60,
            "w" => 7 * 24 * 60,
            _ => return Err(bad()),
        };
        let minutes = n.checked_mul(per_unit).ok_or_else(bad)?;
        if minutes <= 0 || minutes > MAX_MINUTES {
            return Err(Error::invalid(field, "must be between 1m and 366d"));
        }
        Ok(Window { minutes })
    }

    pub fn days(days: i64) -> Self {
        Window {
            minutes: days * 24 * 60,
        }
    }

    pub fn minutes(self) -> i64 {
        self.minutes
    }

    pub fn duration(self) -> Duration {
        Duration::minutes(self.minutes)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.minutes;
        if m % (24 * 60) == 0 {
            write!(f, "{}d", m / (24 * 60))
        } else if m % 60 == 0 {
            write!(f, "{}h", m / 60)
        } else {
            write!(f, "{m}m")
        }
    }
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Window::parse("window", &raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (raw, minutes, shown) in [
            ("30d", 43200, "30d"),
            ("12h", 720, "12h"),
            ("90m", 90, "90m"),
            ("1w", 10080, "7d"),
        ] {
            let w = Window::parse("within", raw).unwrap();
            assert_eq!(w.minutes(), minutes);
            assert_eq!(w.to_string(), shown);
        }
        for bad in [
            "", "d", "0d", "-1d", "5y", "400d", "x3d", "Л", "1Л", "Лd", "é", "3日",
        ] {
            let err = Window::parse("within", bad).unwrap_err().to_string();
            assert!(err.starts_with("within: "), "{err}");
        }
    }
}
