//! Wall-clock time as the protocol writes it. Durations and deadlines use `Instant`; these are
//! for timestamps clients and Redis read.

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
