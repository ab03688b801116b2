//! Framing: cutting a byte stream into messages and back.
//!
//! Four framings share one decoder ([`FrameReader`]) and one encoder ([`encode_frame`]):
//!
//! ```text
//! line     payload ... '\n'             a '\r' right before the '\n' is dropped on read
//! ascii10  "%10d" length | payload     10 ASCII bytes, right-aligned, space-padded (Python b'%10d' % n)
//! u16      u16 big-endian length | payload   Erlang {packet,2}
//! u32      u32 big-endian length | payload   Erlang {packet,4}
//! ```
//!
//! The decoder contract is the same for all four: `Ok(Some(frame))`, `Ok(None)` when the
//! peer closed cleanly at a frame boundary, `Err(FrameError::Truncated)` when it closed
//! mid-frame. An over-limit frame is `Err(FrameError::TooLong)` and is skipped, so the
//! stream stays in sync; a header that is not a length (`BadHeader`) loses sync for good.

mod reader;
mod writer;

pub(crate) use reader::{find_byte, find_newline};
pub use reader::{FrameReader, Frames};
pub use writer::{begin_frame, encode_frame, end_frame, FrameWriter, SharedFrameWriter};

use std::fmt;
use std::io;
use std::str::FromStr;

/// Default longest line, excluding its `\n` (and a `\r` before it).
pub const DEFAULT_MAX_LINE: usize = 1 << 20;
/// Default largest payload a size-prefixed frame may declare.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// The wire framings, named as on the command line (`--framing line|ascii10|u16|u32`).
///
/// Example: [`FrameReader`], [`encode_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Framing {
    /// Newline-terminated text, as Erlang's `{packet,line}` and the course's Python servers.
    #[default]
    Line,
    /// 10-byte ASCII decimal length, as `b'%10d' % len(msg)` in the course's `message.py`.
    Ascii10,
    /// 2-byte big-endian length, as Erlang's `{packet,2}`.
    U16,
    /// 4-byte big-endian length, as Erlang's `{packet,4}`.
    U32,
}

impl Framing {
    /// Every framing, in CLI order.
    pub const ALL: [Framing; 4] = [Framing::Line, Framing::Ascii10, Framing::U16, Framing::U32];

    /// The CLI word for this framing.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Line => "line",
            Framing::Ascii10 => "ascii10",
            Framing::U16 => "u16",
            Framing::U32 => "u32",
        }
    }

    /// Bytes of header before the payload (0 for `line`).
    pub fn header_len(self) -> usize {
        match self {
            Framing::Line => 0,
            Framing::Ascii10 => 10,
            Framing::U16 => 2,
            Framing::U32 => 4,
        }
    }

    /// The largest payload the header can express (`line` has no length header).
    pub fn max_encodable(self) -> u64 {
        match self {
            Framing::Line => u64::MAX,
            Framing::Ascii10 => 9_999_999_999,
            Framing::U16 => u16::MAX as u64,
            Framing::U32 => u32::MAX as u64,
        }
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--framing` word that names no framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFraming(pub String);

impl fmt::Display for UnknownFraming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown framing {:?} (expected line, ascii10, u16 or u32)",
            self.0
        )
    }
}

impl std::error::Error for UnknownFraming {}

impl FromStr for Framing {
    type Err = UnknownFraming;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Framing::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFraming(s.to_owned()))
    }
}

/// Size limits a decoder enforces.
///
/// Example: [`FrameReader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line (`line` framing), excluding the `\n` and a `\r` before it.
    pub max_line: usize,
    /// Largest declared payload (size-prefixed framings).
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: DEFAULT_MAX_LINE,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl Limits {
    /// The limit that applies to `framing`.
    pub fn for_framing(&self, framing: Framing) -> usize {
        match framing {
            Framing::Line => self.max_line,
            _ => self.max_frame,
        }
    }
}

/// Everything that can go wrong while reading or writing frames.
#[derive(Debug)]
pub enum FrameError {
    /// A frame longer than the limit. On read the decoder skips it and stays in sync, so the
    /// connection can go on; on write the payload was too large for the header.
    TooLong {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// A size header that is not a length; the stream has lost sync.
    BadHeader {
        /// The header bytes as received.
        header: Vec<u8>,
    },
    /// The peer closed the connection in the middle of a frame.
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// A `line` payload that contains `\n` cannot be written as one line.
    Delimiter,
    /// The socket failed (including read timeouts, see [`FrameError::is_timeout`]).
    Io(io::Error),
}

impl FrameError {
    /// True for a read that timed out (an idle connection), as opposed to a broken one.
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    /// True when the connection can go on after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::TooLong { .. } | FrameError::Delimiter)
    }

    /// A short snake_case word for `{error,Reason}` replies and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLong { .. } => "too_long",
            FrameError::BadHeader { .. } => "bad_header",
            FrameError::Truncated { .. } => "truncated",
            FrameError::Delimiter => "unencodable",
            FrameError::Io(_) => "io",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong { limit } => write!(f, "frame longer than {limit} bytes"),
            FrameError::BadHeader { header } => {
                write!(f, "bad size header {:?}", String::from_utf8_lossy(header))
            }
            FrameError::Truncated { buffered } => write!(
                f,
                "connection closed mid-frame ({buffered} bytes of an unfinished frame)"
            ),
            FrameError::Delimiter => f.write_str("payload contains a newline; not a line frame"),
            FrameError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Parses a size header, or says why it is not one.
///
/// `ascii10` accepts leading spaces or zeros before the digits and nothing else (no sign, no
/// trailing spaces, not all blank), exactly what `b'%10d' % n` and `b'%010d' % n` produce.
pub(crate) fn parse_header(framing: Framing, header: &[u8]) -> Option<u64> {
    match framing {
        Framing::Line => None,
        Framing::U16 => Some(u16::from_be_bytes([header[0], header[1]]) as u64),
        Framing::U32 => {
            Some(u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as u64)
        }
        Framing::Ascii10 => {
            let digits_at = header.iter().position(|&b| b != b' ')?;
            let digits = &header[digits_at..];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(
                digits
                    .iter()
                    .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_words_round_trip() {
        for f in Framing::ALL {
            assert_eq!(f.name().parse::<Framing>().unwrap(), f);
            assert_eq!(f.to_string(), f.name());
        }
        let err = "packet4".parse::<Framing>().unwrap_err();
        assert!(err.to_string().contains("packet4"));
    }

    #[test]
    fn ascii10_headers() {
        let ok = |h: &[u8]| parse_header(Framing::Ascii10, h);
        assert_eq!(ok(b"         5"), Some(5));
        assert_eq!(ok(b"0000000005"), Some(5));
        assert_eq!(ok(b"   0000012"), Some(12));
        assert_eq!(ok(b"9999999999"), Some(9_999_999_999));
        assert_eq!(ok(b"         0"), Some(0));
        for bad in [
            &b"          "[..],
            b"5         ",
            b"        -5",
            b"        +5",
            b"    12 345",
            b"\t        5",
            b"0x0000000a",
        ] {
            assert_eq!(ok(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn errors_say_what_happened() {
        let e = FrameError::TooLong { limit: 10 };
        assert!(e.is_recoverable());
        assert_eq!(e.reason(), "too_long");
        assert!(e.to_string().contains("10"));
        let e = FrameError::Io(io::Error::new(io::ErrorKind::WouldBlock, "idle"));
        assert!(e.is_timeout());
        assert!(std::error::Error::source(&e).is_some());
        assert!(!FrameError::Truncated { buffered: 3 }.is_recoverable());
    }
}
