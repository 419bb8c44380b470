//! UTC timestamps as `2026-11-25T10:00:00.123Z`, for audit events and the
//! policy input. Written out by hand because both are made on every request
//! and the general-purpose formatter (parsing a format description, then
//! dispatching per component) showed up in profiles of the request path.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds from 1970-01-01 to 10000-01-01: four-digit years only.
const MAX_SECS: u64 = 253_402_300_800;

/// `t` in UTC with millisecond precision. The clock, not a peer, supplies
/// `t`; one set before 1970 or past year 9999 is not worth a panic, so it
/// is clamped to that range.
pub fn millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, ms) = if d.as_secs() >= MAX_SECS {
        (MAX_SECS - 1, 999)
    } else {
        (d.as_secs(), d.subsec_millis())
    };
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    let mut out = String::with_capacity(24);
    push_digits(&mut out, u64::from(year), 4);
    out.push('-');
    push_digits(&mut out, u64::from(month), 2);
    out.push('-');
    push_digits(&mut out, u64::from(day), 2);
    out.push('T');
    push_digits(&mut out, rem / 3600, 2);
    out.push(':');
    push_digits(&mut out, rem % 3600 / 60, 2);
    out.push(':');
    push_digits(&mut out, rem % 60, 2);
    out.push('.');
    push_digits(&mut out, u64::from(ms), 3);
    out.push('Z');
    out
}

fn push_digits(out: &mut String, n: u64, width: u32) {
    for i in (0..width).rev() {
        let digit = (n / 10u64.pow(i)) % 10;
        out.push(char::from(b'0' + digit as u8));
    }
}

/// (year, month, day) of a day count since 1970-01-01, by Howard Hinnant's
/// `civil_from_days` for the proleptic Gregorian calendar, restricted to
/// non-negative days.
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    // All three fit: year < 10000 by MAX_SECS, month <= 12, day <= 31.
    (year as u32, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn reference(t: SystemTime) -> String {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        time::OffsetDateTime::from(t).format(&format).unwrap()
    }

    #[test]
    fn known_instants() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(millis(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(millis(at(1_795_600_800, 123)), "2026-11-25T10:00:00.123Z");
        assert_eq!(millis(at(MAX_SECS - 1, 999)), "9999-12-31T23:59:59.999Z");
        assert_eq!(millis(at(MAX_SECS + 5, 0)), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            millis(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    proptest! {
        #[test]
        fn agrees_with_the_time_crate(nanos in 0u64..u64::MAX) {
            let t = UNIX_EPOCH + Duration::from_nanos(nanos);
            prop_assert_eq!(millis(t), reference(t));
        }

        #[test]
        fn agrees_over_all_years(secs in 0u64..MAX_SECS, ms in 0u64..1000) {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms);
            prop_assert_eq!(millis(t), reference(t));
        }
    }
}
