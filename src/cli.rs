//! Parsers for command-line values that several binaries share (argh's `from_str_fn`), so a
//! flag reads the same way on every binary that has it.

use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;

/// A number of seconds, fractions allowed (`0.25`, `300`), zero included.
///
/// # Errors
/// Text that is not a finite, non-negative number small enough for a [`Duration`].
pub fn seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("expected a number of seconds such as 2 or 0.5, got {text:?}"))
}

/// As [`seconds`], but more than zero (an idle timeout of zero would close every
/// connection at once).
///
/// # Errors
/// As [`seconds`], and zero.
pub fn positive_seconds(text: &str) -> Result<Duration, String> {
    match seconds(text)? {
        d if d.is_zero() => Err(format!("expected more than 0 seconds, got {text:?}")),
        d => Ok(d),
    }
}

/// A comma-separated list of `HOST:PORT` addresses (`--peers`, `--addr A,B,C`), each
/// resolved to its first address, in order.
///
/// # Errors
/// An entry that does not resolve, or an empty list.
pub fn addresses(text: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let addrs = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("{s:?} is not a HOST:PORT address"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if addrs.is_empty() {
        return Err("no addresses given".into());
    }
    Ok(addrs)
}

/// A size in bytes: a number with an optional binary suffix, `4096`, `512k`, `64m`, `1g`
/// (`kb`, `mb`, `gb` and `kib`, `mib`, `gib` too).
///
/// # Errors
/// Anything else, or a size that does not fit in 64 bits.
pub fn byte_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (number, suffix) = lower.split_at(digits);
    let shift = match suffix {
        "" | "b" => Some(0),
        "k" | "kb" | "kib" => Some(10),
        "m" | "mb" | "mib" => Some(20),
        "g" | "gb" | "gib" => Some(30),
        _ => None,
    };
    shift
        .zip(number.parse::<u64>().ok())
        .and_then(|(shift, n)| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("bad size {text:?} (expected e.g. 4096, 512k, 64m or 1g)"))
}

/// `--max-client-memory SIZE` (see [`crate::budget`]): as [`byte_size`], at least 1 MiB
/// (a smaller budget could not hold one connection's first frame).
///
/// # Errors
/// As [`byte_size`], and sizes under 1 MiB.
pub fn client_memory(text: &str) -> Result<usize, String> {
    let n = byte_size(text)?;
    if n < 1 << 20 {
        return Err(format!(
            "expected at least 1m of client memory, got {text:?}"
        ));
    }
    usize::try_from(n).map_err(|_| format!("{text:?} does not fit this machine's addresses"))
}

/// How a `--check` or `--repair` run of a file the project writes ends: the report on
/// stdout as `WHAT: report` and exit 0 (usable, or repaired), 1 (a check found damage); or
/// the error on stderr and exit 2 (unreadable, not such a file, or not repairable).
pub fn report_check(what: impl Display, result: std::io::Result<(String, bool)>) -> ExitCode {
    match result {
        Ok((text, damaged)) => {
            println!("{what}: {text}");
            ExitCode::from(u8::from(damaged))
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_and_whole_numbers() {
        assert_eq!(seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(seconds("300"), Ok(Duration::from_secs(300)));
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert_eq!(positive_seconds("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["-1", "nan", "inf", "1e300", "", "1s"] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert!(positive_seconds("0").unwrap_err().contains("more than 0"));
    }

    #[test]
    fn sizes_with_and_without_suffixes() {
        assert_eq!(byte_size("4096"), Ok(4096));
        assert_eq!(byte_size("512k"), Ok(512 << 10));
        assert_eq!(byte_size("64MiB"), Ok(64 << 20));
        assert_eq!(byte_size("1g"), Ok(1 << 30));
        for bad in ["", "m", "1t", "-1", "99999999999999999999g"] {
            assert!(byte_size(bad).is_err(), "{bad}");
        }
        assert_eq!(client_memory("256m"), Ok(256 << 20));
        assert!(client_memory("100k").unwrap_err().contains("at least 1m"));
    }
}
