//! Wall-clock time as the protocol writes it, and durations as the configuration writes them.
//! Deadlines use `Instant`; these are for timestamps clients and Redis read.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now as RFC 3339 in UTC with milliseconds (`2026-11-21T22:13:25.443Z`), the protocol's
/// timestamps.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Seconds since the Unix epoch (JWT `exp` and `iat`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (history entries' write time in Redis).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An optional duration, written as `duration` writes one.
pub(crate) mod duration_opt {
    use serde::Deserializer;
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// Durations are written as `"10s"`, `"500ms"`, `"1h"`.
pub(crate) mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write it like \"10s\" or \"500ms\""
            ))
        })
    }
}
