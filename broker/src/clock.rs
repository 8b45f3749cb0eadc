//! The wall clock, in one place: server timestamps of messages, token
//! expiry, upload and membership times. A clock before the Unix epoch
//! reads as 0 rather than failing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Current time in seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
