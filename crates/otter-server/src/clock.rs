//! How the server writes time: RFC 3339 UTC with milliseconds for every
//! stored and reported instant, Unix seconds for link expiry.
//!
//! The fixed-width format (`2026-11-25T10:00:00.000Z`) sorts as text, which
//! the store relies on. Only this module reads the clock, so the rest of the
//! server can take `now` as an argument.

use time::OffsetDateTime;
use time::macros::format_description;

/// The current time, formatted for storage.
pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

/// The instant `age` ago, formatted for storage (to compare with stored times).
pub fn rfc3339_ago(age: std::time::Duration) -> String {
    format_rfc3339(OffsetDateTime::now_utc() - age)
}

/// Current Unix time in seconds.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Formats an instant as RFC 3339 UTC with exactly three fractional digits.
pub fn format_rfc3339(at: OffsetDateTime) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    // Formatting a UTC instant with a fixed description only fails for years
    // outside 0..=9999, which the system clock does not produce.
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_with_milliseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_764_064_800_123_456_789).unwrap();
        assert_eq!(format_rfc3339(at), "2025-11-25T10:00:00.123Z");
        let whole = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(format_rfc3339(whole), "1970-01-01T00:00:00.000Z");
    }
}
