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

/// Longest message a log line holds, in bytes: past it the message is cut (`… (cut)`) and
/// its formatting stopped. Every line a peer can make longer should show the peer's part
/// as a [`Preview`]; this bounds the lines nobody thought of.
pub const MAX_MESSAGE: usize = 16 << 10;

/// Writes one line, `2026-11-22T01:50:12.123Z message`, in a single write so lines from
/// different threads do not mix.
pub fn write(args: fmt::Arguments<'_>) {
    let line = line(SystemTime::now(), args);
    if VIA_EPRINT.load(Ordering::Relaxed) {
        eprint!("{line}");
    } else {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// The line [`write`] writes: timestamp, message cut at [`MAX_MESSAGE`], newline.
fn line(now: SystemTime, args: fmt::Arguments<'_>) -> String {
    let mut line = timestamp(now);
    line.push(' ');
    let mut cut = Cut::new(&mut line, MAX_MESSAGE);
    let _ = fmt::write(&mut cut, args);
    if cut.cut {
        line.push_str("… (cut)");
    }
    line.push('\n');
    line
}

/// A writer that passes writes on to `out` until `left` bytes are spent, then cuts (at a
/// character boundary) and fails, which ends the formatting early.
struct Cut<W> {
    out: W,
    left: usize,
    cut: bool,
}

impl<W: fmt::Write> Cut<W> {
    fn new(out: W, left: usize) -> Cut<W> {
        Cut {
            out,
            left,
            cut: false,
        }
    }
}

impl<W: fmt::Write> fmt::Write for Cut<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() <= self.left {
            self.left -= s.len();
            return self.out.write_str(s);
        }
        let mut end = self.left;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.out.write_str(&s[..end])?;
        self.left = 0;
        self.cut = true;
        Err(fmt::Error)
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

/// Bytes of a peer's value a log line shows, by default ([`Preview`]).
pub const PREVIEW: usize = 256;

/// A value's `Debug` form cut to at most `.1` bytes, for a log line that shows something
/// a peer sent: `log_info!("ignoring {}", Preview(&msg, PREVIEW))`. The formatting stops
/// at the cut, so a value of a megabyte costs neither a line of several megabytes (a
/// term's `Debug` runs to several times its text) nor the memory and time to build one.
/// Its `Debug` form also escapes what could forge or garble a log line (a newline, a
/// terminal's escape sequences).
pub struct Preview<'a, T: ?Sized>(pub &'a T, pub usize);

impl<T: fmt::Debug + ?Sized> fmt::Display for Preview<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cut = Cut::new(&mut *f, self.1);
        let result = fmt::write(&mut cut, format_args!("{:?}", self.0));
        if cut.cut {
            f.write_str("… (cut)")
        } else {
            result
        }
    }
}

/// Lines a connection's bad requests may take in the log, each shown whole: past them,
/// bad requests are counted, and the count is logged once when the connection ends.
pub const BAD_REQUEST_LINES: u32 = 3;

/// One connection's allowance of log lines: the first few are logged, the rest only
/// counted, so a client that sends a million bad lines of two bytes each costs the log
/// a few lines, not a million (about 60 times what it sent).
#[derive(Debug)]
pub struct Quota {
    left: u32,
    suppressed: u64,
}

impl Quota {
    /// An allowance of `lines` lines.
    pub const fn new(lines: u32) -> Quota {
        Quota {
            left: lines,
            suppressed: 0,
        }
    }

    /// Whether the next line may be logged; when not, it is counted.
    pub fn allow(&mut self) -> bool {
        if self.left > 0 {
            self.left -= 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Lines counted and not logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
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
    fn a_preview_cuts_the_debug_form_and_stops_formatting_there() {
        assert_eq!(Preview(&"short", 100).to_string(), "\"short\"");
        assert_eq!(Preview(&"a\nb", 100).to_string(), "\"a\\nb\"");
        assert_eq!(Preview(&vec![1, 2, 3], 4).to_string(), "[1, … (cut)");
        // A cut inside a character keeps it whole or leaves it out.
        assert_eq!(Preview(&"ééé", 4).to_string(), "\"é… (cut)");
        // Formatting ends at the cut: a value whose Debug would run forever is cut too.
        struct Endless;
        impl fmt::Debug for Endless {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                loop {
                    f.write_str("more ")?;
                }
            }
        }
        assert_eq!(Preview(&Endless, 12).to_string(), "more more mo… (cut)");
        let big: Vec<u64> = (0..1_000_000).collect();
        assert!(Preview(&big, PREVIEW).to_string().len() <= PREVIEW + "… (cut)".len());
    }

    #[test]
    fn a_log_line_is_cut_at_the_longest_message() {
        let short = line(UNIX_EPOCH, format_args!("hello"));
        assert_eq!(short, "1970-01-01T00:00:00.000Z hello\n");
        let huge = "x".repeat(1 << 20);
        let long = line(UNIX_EPOCH, format_args!("peer said {huge}"));
        assert_eq!(long.len(), 25 + MAX_MESSAGE + "… (cut)\n".len());
        assert!(
            long.ends_with("xxx… (cut)\n"),
            "{}",
            &long[long.len() - 20..]
        );
    }

    #[test]
    fn a_quota_allows_its_lines_then_counts() {
        let mut q = Quota::new(2);
        let allowed: Vec<bool> = (0..5).map(|_| q.allow()).collect();
        assert_eq!(allowed, [true, true, false, false, false]);
        assert_eq!(q.suppressed(), 3);
        assert!(!Quota::new(0).allow());
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_312_212_123);
        assert_eq!(timestamp(t), "2026-11-22T01:50:12.123Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
