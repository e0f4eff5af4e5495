//! Points in time as the protocol writes them: RFC 3339 in UTC with microseconds.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: microseconds since the Unix epoch, UTC.
///
/// An integer keeps the stores simple (one INTEGER / BIGINT column) and makes
/// comparisons in SQL index-friendly. The server's clock produces
/// these; it lives here because every timestamp on the wire is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    pub fn plus(self, duration: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(duration.as_micros().min(i64::MAX as u128) as i64),
        )
    }

    pub fn minus(self, duration: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_sub(duration.as_micros().min(i64::MAX as u128) as i64),
        )
    }

    /// The time from `earlier` to `self`; zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    pub fn from_system_time(time: SystemTime) -> Self {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Timestamp(after.as_micros().min(i64::MAX as u128) as i64),
            Err(before) => Timestamp(-(before.duration().as_micros().min(i64::MAX as u128) as i64)),
        }
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-29T16:23:41.486972Z`.
    pub fn to_rfc3339(self) -> String {
        humantime::format_rfc3339_micros(self.to_system_time()).to_string()
    }

    /// Parses RFC 3339 with a `Z` suffix (what this server writes).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        humantime::parse_rfc3339_weak(text)
            .ok()
            .map(Self::from_system_time)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("expected an RFC 3339 time, got {text:?}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_reads_back_what_it_writes() {
        let time = Timestamp::from_micros(1_796_000_000_123_456);
        let json = serde_json::to_string(&time).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), time);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }
}
