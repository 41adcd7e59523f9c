//! The one place that reads the wall clock. Everything that stamps or compares
//! times calls [`now`], so tests and clippy (`disallowed-methods`) can keep it
//! that way.

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// Fixed-width so that text comparison is time comparison.
const DB_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// The current UTC time, shifted by `BLAST_CLOCK_SKEW_SECS` when set: a
/// test hook to run a worker on a host whose clock is off. Leases and
/// claims never use this clock (they use the database's), which is what
/// the tests with a skewed worker show.
#[allow(clippy::disallowed_methods)]
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc() + skew()
}

fn skew() -> time::Duration {
    static SKEW: std::sync::OnceLock<time::Duration> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var("BLAST_CLOCK_SKEW_SECS")
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .map_or(time::Duration::ZERO, time::Duration::seconds)
    })
}

/// A timestamp as stored in the database: RFC 3339 UTC with milliseconds, so it
/// sorts and compares correctly as text in both SQLite and PostgreSQL.
pub fn db_timestamp(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(DB_FORMAT)
        .unwrap_or_default()
}

/// Parses a [`db_timestamp`] back; None for anything else.
pub fn parse_db_timestamp(s: &str) -> Option<OffsetDateTime> {
    time::PrimitiveDateTime::parse(s, DB_FORMAT)
        .ok()
        .map(|t| t.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_timestamps_have_fixed_millisecond_form() {
        let t = time::macros::datetime!(2026-11-29 18:00:00.123456 UTC);
        assert_eq!(db_timestamp(t), "2026-11-29T18:00:00.123Z");
        let t = time::macros::datetime!(2026-11-29 18:00:00 UTC);
        assert_eq!(db_timestamp(t), "2026-11-29T18:00:00.000Z");
        assert_eq!(parse_db_timestamp("2026-11-29T18:00:00.000Z"), Some(t));
        assert_eq!(parse_db_timestamp("yesterday"), None);
    }
}
