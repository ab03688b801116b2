//! The port listener's wire protocol, pure: requests and replies as bytes, no I/O.
//!
//! ```text
//! writer → listener   {remote_msg,Msg}\n      Msg into the channel; no reply (the course's format)
//! reader → listener   remote_read\n           ← {remote_msg,Msg}\n once a message is there
//! reader → listener   {remote_read,Ms}\n      ← {remote_msg,Msg}\n, or timeout\n after Ms ms
//! anything else                               ← {error,Reason}\n; the connection goes on
//! ```

use crate::term::{self, Term, TermError};
use std::fmt;
use std::time::Duration;

/// A line a port listener understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `{remote_msg,Msg}`: write Msg into the channel.
    Msg(Term),
    /// `remote_read` (no timeout) or `{remote_read,Ms}`: answer with the next message.
    Read {
        /// How long to wait for a message before answering `timeout`.
        timeout: Option<Duration>,
    },
}

/// A line a port listener cannot act on; answered `{error,Reason}`.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestError {
    /// Not a term (or beyond the term limits).
    Term(TermError),
    /// A line longer than the framing limit (it was skipped).
    TooLong,
    /// A term, but not a request.
    Unknown,
}

impl RequestError {
    /// The `Reason` of the `{error,Reason}` reply.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::Term(e) => e.reason_atom(),
            RequestError::TooLong => "too_long",
            RequestError::Unknown => "unknown_request",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Term(e) => write!(f, "malformed line: {e}"),
            RequestError::TooLong => f.write_str("line too long"),
            RequestError::Unknown => {
                f.write_str("not a request ({remote_msg,Msg}, remote_read, {remote_read,Ms})")
            }
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Term(e) => Some(e),
            _ => None,
        }
    }
}

/// Parses one line (without its `\n`) under `limits`.
///
/// # Errors
/// When the line is not a term, or a term that is not a request.
pub fn parse_request(line: &[u8], limits: &term::Limits) -> Result<Request, RequestError> {
    match term::parse_bytes_with(line, limits).map_err(RequestError::Term)? {
        Term::Atom(verb) if verb == "remote_read" => Ok(Request::Read { timeout: None }),
        Term::Tuple(mut items) if items.len() == 2 && items[0].is_atom("remote_msg") => {
            Ok(Request::Msg(items.pop().unwrap_or(Term::Tuple(Vec::new()))))
        }
        Term::Tuple(items) if items.len() == 2 && items[0].is_atom("remote_read") => {
            let ms = items[1].as_int().and_then(|ms| u64::try_from(ms).ok());
            let ms = ms.ok_or(RequestError::Unknown)?;
            Ok(Request::Read {
                timeout: Some(Duration::from_millis(ms)),
            })
        }
        _ => Err(RequestError::Unknown),
    }
}

/// Appends `{remote_msg,Msg}\n`: a write request, and the answer to a read.
pub fn write_msg(msg: &Term, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{remote_msg,");
    msg.write_to(out);
    out.extend_from_slice(b"}\n");
}

/// Appends a read request: `remote_read\n`, or `{remote_read,Ms}\n` with a timeout.
pub fn write_read(timeout: Option<Duration>, out: &mut Vec<u8>) {
    match timeout {
        None => out.extend_from_slice(b"remote_read\n"),
        Some(t) => {
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
            out.extend_from_slice(format!("{{remote_read,{ms}}}\n").as_bytes());
        }
    }
}

/// Appends `timeout\n`.
pub fn write_timeout(out: &mut Vec<u8>) {
    out.extend_from_slice(b"timeout\n");
}

/// Appends `{error,Reason}\n`.
pub fn write_error(reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{error,");
    Term::atom(reason).write_to(out);
    out.extend_from_slice(b"}\n");
}

/// The answer to a read request.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadReply {
    /// `{remote_msg,Msg}`
    Msg(Term),
    /// `timeout`
    Timeout,
}

/// Parses the answer to a read request; `None` for anything else (an `{error,...}` line
/// included), which the caller reports as it came.
pub fn parse_read_reply(line: &[u8], limits: &term::Limits) -> Option<ReadReply> {
    match term::parse_bytes_with(line, limits).ok()? {
        Term::Atom(word) if word == "timeout" => Some(ReadReply::Timeout),
        Term::Tuple(mut items) if items.len() == 2 && items[0].is_atom("remote_msg") => {
            items.pop().map(ReadReply::Msg)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(line: &str) -> Result<Request, RequestError> {
        parse_request(line.as_bytes(), &term::Limits::default())
    }

    #[test]
    fn requests() {
        assert_eq!(
            request("{remote_msg,{ping,1,{remote_chan,{127,0,0,1},40123}}}"),
            Ok(Request::Msg(
                term::parse("{ping,1,{remote_chan,{127,0,0,1},40123}}").unwrap()
            ))
        );
        assert_eq!(
            request(" { remote_msg , \"hi\" } . "),
            Ok(Request::Msg(Term::str("hi")))
        );
        assert_eq!(request("remote_read"), Ok(Request::Read { timeout: None }));
        assert_eq!(
            request("{remote_read,250}"),
            Ok(Request::Read {
                timeout: Some(Duration::from_millis(250))
            })
        );
        for unknown in [
            "{remote_msg}",
            "{remote_msg,a,b}",
            "{remote_read,-1}",
            "{remote_read,x}",
            "hello",
            "[]",
        ] {
            assert_eq!(request(unknown), Err(RequestError::Unknown), "{unknown}");
        }
        let bad = request("{remote_msg,").unwrap_err();
        assert_eq!(bad.reason(), "bad_term");
        assert!(bad.to_string().contains("malformed line"));
        assert_eq!(
            request(&format!("{}1{}", "[".repeat(70), "]".repeat(70)))
                .unwrap_err()
                .reason(),
            "too_deep"
        );
        assert_eq!(
            parse_request(b"{remote_msg,\xff}", &term::Limits::default())
                .unwrap_err()
                .reason(),
            "invalid_utf8"
        );
        assert_eq!(request("").unwrap_err().reason(), "bad_term");
    }

    #[test]
    fn writes_exact_bytes() {
        let mut out = Vec::new();
        write_msg(&term::parse("{pong,7}").unwrap(), &mut out);
        write_read(None, &mut out);
        write_read(Some(Duration::from_millis(1500)), &mut out);
        write_timeout(&mut out);
        write_error("unknown_request", &mut out);
        assert_eq!(
            out,
            b"{remote_msg,{pong,7}}\nremote_read\n{remote_read,1500}\ntimeout\n{error,unknown_request}\n"
        );
    }

    #[test]
    fn read_replies() {
        let reply = |s: &str| parse_read_reply(s.as_bytes(), &term::Limits::default());
        assert_eq!(reply("timeout"), Some(ReadReply::Timeout));
        assert_eq!(
            reply("{remote_msg,[1,2]}"),
            Some(ReadReply::Msg(term::parse("[1,2]").unwrap()))
        );
        assert_eq!(reply("{error,bad_term}"), None);
        assert_eq!(reply("{remote_msg"), None);
    }
}
