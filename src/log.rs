//! Logging to stderr: one timestamped line per event worth a line. Routine events (a client
//! connected or left) are written only in verbose mode (`--verbose` on every server binary).
//!
//! Tests that run servers in their own process call [`capture_in_tests`]: lines then go
//! through `eprint!`, which the test harness captures and shows only for a failing test,
//! instead of straight to stderr between the test results.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static VERBOSE: AtomicBool = AtomicBool::new(false);
static VIA_EPRINT: AtomicBool = AtomicBool::new(cfg!(test));

/// Turns routine-event logging on or off for the whole process.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Whether routine events are logged.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Sends every later line through `eprint!` rather than straight to stderr, for the rest
/// of the process. The test harness captures what `eprint!` writes on a test's thread and
/// on the threads it spawns (a server's accept and connection threads included) and prints
/// it only if that test fails. Not for servers in production: `eprint!` panics when stderr
/// is a closed pipe, where a direct write fails quietly. (The crate's own unit tests have
/// it on from the start.)
pub fn capture_in_tests() {
    VIA_EPRINT.store(true, Ordering::Relaxed);
}

/// Writes one line, `2026-11-22T01:50:12.123Z message`, in a single write so lines from
/// different threads do not mix.
pub fn write(args: fmt::Arguments<'_>) {
    let line = format!("{} {args}\n", timestamp(SystemTime::now()));
    if VIA_EPRINT.load(Ordering::Relaxed) {
        eprint!("{line}");
    } else {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// RFC 3339 UTC with milliseconds, computed without a date crate.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Logs one line to stderr.
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::log::write(format_args!($($arg)*)) };
}

/// Logs one line to stderr in verbose mode only.
#[macro_export]
macro_rules! log_debug {
    ($($arg:tt)*) => {
        if $crate::log::verbose() {
            $crate::log::write(format_args!($($arg)*))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_312_212_123);
        assert_eq!(timestamp(t), "2026-11-22T01:50:12.123Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
