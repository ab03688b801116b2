//! The messenger's client protocol, pure: frame payloads in, typed requests out; replies in,
//! payloads out; and the rules for names, texts and search patterns. Nothing here touches a
//! socket. Every message travels in one `u32` frame (4-byte big-endian length, then the
//! payload below), so message boundaries never depend on how the bytes were read.
//!
//! ```text
//! client → server (1-byte operation, then |-separated ASCII fields)
//!   01 NAME[|NONCE]          register (NONCE: a client-chosen u64 that makes a resend say ok)
//!   02 NAME[|SESSION]        login (SESSION: a client-chosen u64; a login with the SESSION
//!                            the account is logged in with elsewhere takes that session
//!                            over, closing its connection: a client that lost its way to
//!                            a server logs in again through another)
//!   03 PATTERN               search
//!   04 FROM|TO|ID|TEXT       send (ID: a client-chosen u64; a resend is never delivered twice)
//!   05 NAME                  logout
//!   06 NAME                  delete the account and its pending messages
//!   07                       quit
//!   08 EPOCH.SEQ             confirm: every message up to that number has arrived (never
//!                            answered)
//! server → client (1-byte status, then fields)
//!   20                       ok
//!   21 COUNT:u16             logged in; COUNT pending messages follow, one 30 frame each
//!   22 COUNT:u16 NAME|NAME…  search results, sorted
//!   30 EPOCH.SEQ|FROM|TEXT   a message: its number, unique forever, increasing per recipient
//!                            in one history (see [`MessageId`])
//!   40 ID                    not the primary; server ID (decimal) is
//!   41                       no primary at the moment; try again shortly
//!   50…5a                    the request broke a rule; see [`Violation`]
//! ```
//!
//! NAME: 1–50 ASCII letters and digits. TEXT: 1–262 printable ASCII bytes (0x20–0x7e), `|`
//! included: it is the last field. PATTERN: 1–50 letters, digits and `*`, where `*` matches
//! any run of characters, the empty run included. IDs and NONCEs: 1–20 decimal digits that
//! fit a u64.

use std::fmt;

/// Longest username, in bytes.
pub const MAX_NAME: usize = 50;
/// Longest message text, in bytes.
pub const MAX_TEXT: usize = 262;
/// Longest search pattern, in bytes.
pub const MAX_PATTERN: usize = 50;
/// Most entries a 2-byte count can announce: search results returned, and messages kept
/// for one user (a send to a full mailbox is refused).
pub const MAX_LIST: usize = u16::MAX as usize;

/// Operation codes, the first byte of a request.
pub mod op {
    /// `01 NAME[|NONCE]`
    pub const REGISTER: u8 = 0x01;
    /// `02 NAME`
    pub const LOGIN: u8 = 0x02;
    /// `03 PATTERN`
    pub const SEARCH: u8 = 0x03;
    /// `04 FROM|TO|ID|TEXT`
    pub const SEND: u8 = 0x04;
    /// `05 NAME`
    pub const LOGOUT: u8 = 0x05;
    /// `06 NAME`
    pub const DELETE: u8 = 0x06;
    /// `07`
    pub const QUIT: u8 = 0x07;
    /// `08 ID`
    pub const CONFIRM: u8 = 0x08;
}

/// Status codes, the first byte of a reply.
pub mod status {
    /// `20`
    pub const OK: u8 = 0x20;
    /// `21 COUNT:u16`
    pub const LOGGED_IN: u8 = 0x21;
    /// `22 COUNT:u16 NAME|NAME…`
    pub const FOUND: u8 = 0x22;
    /// `30 ID|FROM|TEXT`
    pub const DELIVER: u8 = 0x30;
    /// `40 ID`
    pub const REDIRECT: u8 = 0x40;
    /// `41`
    pub const UNAVAILABLE: u8 = 0x41;
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create an account (does not log in).
    Register {
        /// The new username.
        name: String,
        /// Makes a resend of this very request answer ok instead of `NameTaken`.
        nonce: Option<u64>,
    },
    /// Log in; pending messages are handed over.
    Login {
        /// The account.
        name: String,
        /// The client's session token: a login with the token of the connection the
        /// account is logged in on replaces that session.
        session: Option<u64>,
    },
    /// Usernames matching a pattern.
    Search {
        /// Letters, digits and `*`.
        pattern: String,
    },
    /// Send a message.
    Send {
        /// The sender: must be the logged-in user.
        from: String,
        /// The recipient: must exist.
        to: String,
        /// Chosen by the client; a resend with the same id is acknowledged, not re-sent.
        id: u64,
        /// The message.
        text: String,
    },
    /// Log out.
    Logout {
        /// Must be the logged-in user (the seed's confirmation).
        name: String,
    },
    /// Delete the account and its pending messages, and log out.
    Delete {
        /// Must be the logged-in user.
        name: String,
    },
    /// Log out if logged in, and close the connection.
    Quit,
    /// Every message up to `upto` has arrived: they are no longer kept.
    Confirm {
        /// The number of the last message received on this connection.
        upto: MessageId,
    },
}

/// A rule a request broke; each has its own status code, and nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Violation {
    /// `50`: unknown operation, missing or extra field, or an id that is not a u64.
    BadRequest = 0x50,
    /// `51`: a username that is not 1–50 letters and digits.
    BadName = 0x51,
    /// `52`: a text that is not 1–262 printable ASCII bytes.
    BadText = 0x52,
    /// `53`: a pattern that is not 1–50 letters, digits and `*`.
    BadPattern = 0x53,
    /// `54`: register of a name that exists.
    NameTaken = 0x54,
    /// `55`: login as, or send to, a user that does not exist.
    NoSuchUser = 0x55,
    /// `56`: send, logout or delete while logged out.
    NotLoggedIn = 0x56,
    /// `57`: register or login while logged in.
    AlreadyLoggedIn = 0x57,
    /// `58`: login to an account logged in on another connection.
    InUse = 0x58,
    /// `59`: send, logout or delete naming someone other than the logged-in user.
    WrongUser = 0x59,
    /// `5a`: no room: a send to a recipient who already has 65,535 messages waiting, or a
    /// register while the server holds its maximum of accounts (`--max-accounts`).
    Full = 0x5A,
}

impl Violation {
    /// Every violation, in code order.
    pub const ALL: [Violation; 11] = [
        Violation::BadRequest,
        Violation::BadName,
        Violation::BadText,
        Violation::BadPattern,
        Violation::NameTaken,
        Violation::NoSuchUser,
        Violation::NotLoggedIn,
        Violation::AlreadyLoggedIn,
        Violation::InUse,
        Violation::WrongUser,
        Violation::Full,
    ];

    /// The status byte.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The violation a status byte names.
    pub fn from_code(code: u8) -> Option<Violation> {
        Violation::ALL.into_iter().find(|v| v.code() == code)
    }

    /// What the rule says, for people.
    pub fn message(self) -> &'static str {
        match self {
            Violation::BadRequest => "malformed request",
            Violation::BadName => "a username is 1 to 50 letters and digits",
            Violation::BadText => "a message is 1 to 262 printable ASCII characters",
            Violation::BadPattern => "a pattern is 1 to 50 letters, digits and *",
            Violation::NameTaken => "that username is taken",
            Violation::NoSuchUser => "no such user",
            Violation::NotLoggedIn => "log in first",
            Violation::AlreadyLoggedIn => "log out first",
            Violation::InUse => "that account is logged in elsewhere",
            Violation::WrongUser => "that is not the logged-in user",
            Violation::Full => {
                "no room: the recipient has too many messages waiting, or there are too many \
                 accounts"
            }
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:02x})", self.message(), self.code())
    }
}

impl std::error::Error for Violation {}

/// A message's number: the epoch and sequence number of the change that sent it, written
/// `EPOCH.SEQ` on the wire. Epochs belong to one primary each and a primary gives each
/// sequence number of its epoch to one change, so no two messages ever share a number,
/// whatever failovers and partitions did; numbers compare epoch first, the order of any
/// one history, so a recipient's messages arrive in increasing order. After a network
/// split has healed, a client may see numbers of an abandoned epoch (from the primary that
/// lost): a client deduplicates per epoch (a number at or below the highest seen *of the
/// same epoch* is a repeat), never across epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    /// The epoch of the primary that stored the message.
    pub epoch: u64,
    /// The sequence number of its change in that primary's log.
    pub seq: u64,
}

impl MessageId {
    /// `EPOCH.SEQ`, each 1–20 decimal digits that fit a u64.
    pub fn parse(field: &[u8]) -> Option<MessageId> {
        let dot = field.iter().position(|&b| b == b'.')?;
        Some(MessageId {
            epoch: parse_u64(&field[..dot])?,
            seq: parse_u64(&field[dot + 1..])?,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

/// A message as a recipient receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// Its number: unique forever, increasing per recipient within one history.
    pub id: MessageId,
    /// The sender.
    pub from: String,
    /// The text.
    pub text: String,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `20`
    Ok,
    /// `21`: logged in; `count` deliveries follow.
    LoggedIn {
        /// Pending messages handed over.
        count: u16,
    },
    /// `22`: matching usernames.
    Found(Vec<String>),
    /// `30`: a message.
    Deliver(Delivery),
    /// `40`: talk to this server instead.
    Redirect(usize),
    /// `41`: no primary now.
    Unavailable,
    /// `50…5a`
    Refused(Violation),
}

/// Whether `name` is a valid username.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Whether `text` is a valid message.
pub fn valid_text(text: &str) -> bool {
    (1..=MAX_TEXT).contains(&text.len()) && text.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Whether `pattern` is a valid search pattern.
pub fn valid_pattern(pattern: &str) -> bool {
    (1..=MAX_PATTERN).contains(&pattern.len())
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'*')
}

/// Whether `name` matches `pattern`, `*` matching any run of characters (empty included).
/// Compiles the pattern for this one name: to match many names, compile it once with
/// [`Glob::new`].
pub fn matches(pattern: &str, name: &str) -> bool {
    Glob::new(pattern).matches(name)
}

/// A search pattern compiled to match many names in time linear in each name.
///
/// A pattern of literal bytes and `*` is its literal runs between the stars: without a
/// star, a name matches only if it is the pattern; with one, the first run must start the
/// name, the last must end it, and the runs between must occur in order, without overlap,
/// between those two. Taking each middle run at its leftmost occurrence after the one
/// before is never wrong (a later occurrence leaves less room for the rest), so one pass
/// decides: the prefix and suffix compared, each middle run found with Knuth–Morris–Pratt
/// in what is left of the name. At most `len(pattern) + 2 × len(name)` byte comparisons
/// per name, where greedy backtracking to the last `*` can take `len(pattern) ×
/// len(name)`: a search holds the server's lock while it runs through every account.
#[derive(Debug, Clone)]
pub struct Glob {
    /// No `*`: the name must be `first`.
    exact: bool,
    /// The run before the first `*` (the whole pattern if there is none).
    first: Vec<u8>,
    /// The run after the last `*`.
    last: Vec<u8>,
    /// The non-empty runs between stars, in order, each with its KMP border table.
    middle: Vec<(Vec<u8>, Vec<usize>)>,
    /// Literal bytes in all: a shorter name cannot match.
    literal: usize,
}

impl Glob {
    /// Compiles `pattern`.
    pub fn new(pattern: &str) -> Glob {
        let runs: Vec<&[u8]> = pattern.as_bytes().split(|&b| b == b'*').collect();
        let first = runs[0].to_vec();
        let literal = runs.iter().map(|r| r.len()).sum();
        if runs.len() == 1 {
            return Glob {
                exact: true,
                first,
                last: Vec::new(),
                middle: Vec::new(),
                literal,
            };
        }
        let middle = runs[1..runs.len() - 1]
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| (r.to_vec(), borders(r)))
            .collect();
        Glob {
            exact: false,
            first,
            last: runs[runs.len() - 1].to_vec(),
            middle,
            literal,
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.matches_counting(name, &mut 0)
    }

    /// Whether `name` matches; adds the byte comparisons made to `steps` (at most
    /// `len(pattern) + 2 × len(name)`).
    pub fn matches_counting(&self, name: &str, steps: &mut u64) -> bool {
        let n = name.as_bytes();
        if n.len() < self.literal || (self.exact && n.len() != self.literal) {
            return false;
        }
        let end = n.len() - self.last.len();
        if !equal(&self.first, &n[..self.first.len()], steps)
            || !equal(&self.last, &n[end..], steps)
        {
            return false;
        }
        let mut at = self.first.len();
        for (run, borders) in &self.middle {
            match find(&n[at..end], run, borders, steps) {
                Some(after) => at += after,
                None => return false,
            }
        }
        true
    }
}

/// Whether `a` and `b` (of the same length) are equal, counting comparisons.
fn equal(a: &[u8], b: &[u8], steps: &mut u64) -> bool {
    for (x, y) in a.iter().zip(b) {
        *steps += 1;
        if x != y {
            return false;
        }
    }
    true
}

/// KMP's border table of `run`: entry `k` is the length of the longest proper prefix of
/// `run[..=k]` that is also its suffix.
fn borders(run: &[u8]) -> Vec<usize> {
    let mut table = vec![0; run.len()];
    let mut k = 0;
    for i in 1..run.len() {
        while k > 0 && run[i] != run[k] {
            k = table[k - 1];
        }
        if run[i] == run[k] {
            k += 1;
        }
        table[i] = k;
    }
    table
}

/// Where the leftmost occurrence of `run` (non-empty, with its `borders`) in `text` ends,
/// in at most `2 × len(text)` comparisons: each one either moves on in the text or falls
/// back along the borders, which never falls back further than it moved on.
fn find(text: &[u8], run: &[u8], borders: &[usize], steps: &mut u64) -> Option<usize> {
    let mut j = 0;
    for (i, &b) in text.iter().enumerate() {
        loop {
            *steps += 1;
            if run[j] == b {
                j += 1;
                break;
            }
            if j == 0 {
                break;
            }
            j = borders[j - 1];
        }
        if j == run.len() {
            return Some(i + 1);
        }
    }
    None
}

/// Parses 1–20 decimal digits that fit a u64.
fn parse_u64(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn name_field(field: &[u8]) -> Result<String, Violation> {
    match std::str::from_utf8(field) {
        Ok(s) if valid_name(s) => Ok(s.to_owned()),
        _ => Err(Violation::BadName),
    }
}

/// Decodes a request payload.
///
/// # Errors
/// The [`Violation`] to answer with: `BadRequest` for an unknown operation or a missing,
/// extra or non-numeric field; `BadName`, `BadText` or `BadPattern` for a field that breaks
/// its rule. Fields are checked left to right.
pub fn decode_request(payload: &[u8]) -> Result<Request, Violation> {
    let (&code, body) = payload.split_first().ok_or(Violation::BadRequest)?;
    match code {
        op::REGISTER => {
            let mut fields = body.splitn(2, |&b| b == b'|');
            let name = name_field(fields.next().unwrap_or_default())?;
            let nonce = match fields.next() {
                Some(n) => Some(parse_u64(n).ok_or(Violation::BadRequest)?),
                None => None,
            };
            Ok(Request::Register { name, nonce })
        }
        op::LOGIN => {
            let mut fields = body.splitn(2, |&b| b == b'|');
            let name = name_field(fields.next().unwrap_or_default())?;
            let session = match fields.next() {
                Some(s) => Some(parse_u64(s).ok_or(Violation::BadRequest)?),
                None => None,
            };
            Ok(Request::Login { name, session })
        }
        op::SEARCH => match std::str::from_utf8(body) {
            Ok(p) if valid_pattern(p) => Ok(Request::Search {
                pattern: p.to_owned(),
            }),
            _ => Err(Violation::BadPattern),
        },
        op::SEND => {
            let mut fields = body.splitn(4, |&b| b == b'|');
            let (Some(from), Some(to), Some(id), Some(text)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(Violation::BadRequest);
            };
            let from = name_field(from)?;
            let to = name_field(to)?;
            let id = parse_u64(id).ok_or(Violation::BadRequest)?;
            let text = match std::str::from_utf8(text) {
                Ok(t) if valid_text(t) => t.to_owned(),
                _ => return Err(Violation::BadText),
            };
            Ok(Request::Send { from, to, id, text })
        }
        op::LOGOUT => Ok(Request::Logout {
            name: name_field(body)?,
        }),
        op::DELETE => Ok(Request::Delete {
            name: name_field(body)?,
        }),
        op::QUIT if body.is_empty() => Ok(Request::Quit),
        op::CONFIRM => Ok(Request::Confirm {
            upto: MessageId::parse(body).ok_or(Violation::BadRequest)?,
        }),
        _ => Err(Violation::BadRequest),
    }
}

/// Appends the payload of `request` to `out`. Fields are written as given: encoding an
/// invalid name produces a request the server refuses, which is what tests want.
pub fn encode_request(request: &Request, out: &mut Vec<u8>) {
    match request {
        Request::Register { name, nonce } => {
            out.push(op::REGISTER);
            out.extend_from_slice(name.as_bytes());
            if let Some(n) = nonce {
                out.extend_from_slice(format!("|{n}").as_bytes());
            }
        }
        Request::Login { name, session } => {
            out.push(op::LOGIN);
            out.extend_from_slice(name.as_bytes());
            if let Some(s) = session {
                out.extend_from_slice(format!("|{s}").as_bytes());
            }
        }
        Request::Search { pattern } => {
            out.push(op::SEARCH);
            out.extend_from_slice(pattern.as_bytes());
        }
        Request::Send { from, to, id, text } => {
            out.push(op::SEND);
            out.extend_from_slice(format!("{from}|{to}|{id}|{text}").as_bytes());
        }
        Request::Logout { name } => {
            out.push(op::LOGOUT);
            out.extend_from_slice(name.as_bytes());
        }
        Request::Delete { name } => {
            out.push(op::DELETE);
            out.extend_from_slice(name.as_bytes());
        }
        Request::Quit => out.push(op::QUIT),
        Request::Confirm { upto } => {
            out.push(op::CONFIRM);
            out.extend_from_slice(upto.to_string().as_bytes());
        }
    }
}

/// Appends the payload of `reply` to `out`. A `Found` list longer than [`MAX_LIST`] is cut
/// to that length, so the count always tells the truth.
pub fn encode_reply(reply: &Reply, out: &mut Vec<u8>) {
    match reply {
        Reply::Ok => out.push(status::OK),
        Reply::LoggedIn { count } => {
            out.push(status::LOGGED_IN);
            out.extend_from_slice(&count.to_be_bytes());
        }
        Reply::Found(names) => {
            let names = &names[..names.len().min(MAX_LIST)];
            out.push(status::FOUND);
            out.extend_from_slice(&(names.len() as u16).to_be_bytes());
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    out.push(b'|');
                }
                out.extend_from_slice(name.as_bytes());
            }
        }
        Reply::Deliver(d) => {
            out.push(status::DELIVER);
            out.extend_from_slice(format!("{}|{}|{}", d.id, d.from, d.text).as_bytes());
        }
        Reply::Redirect(id) => {
            out.push(status::REDIRECT);
            out.extend_from_slice(id.to_string().as_bytes());
        }
        Reply::Unavailable => out.push(status::UNAVAILABLE),
        Reply::Refused(v) => out.push(v.code()),
    }
}

/// Decodes a reply payload; `None` when it is not one.
pub fn decode_reply(payload: &[u8]) -> Option<Reply> {
    let (&code, body) = payload.split_first()?;
    let count = |body: &[u8]| -> Option<(u16, usize)> {
        let c = body.get(..2)?;
        Some((u16::from_be_bytes([c[0], c[1]]), 2))
    };
    match code {
        status::OK if body.is_empty() => Some(Reply::Ok),
        status::LOGGED_IN if body.len() == 2 => Some(Reply::LoggedIn {
            count: count(body)?.0,
        }),
        status::FOUND => {
            let (n, at) = count(body)?;
            let rest = std::str::from_utf8(&body[at..]).ok()?;
            let names: Vec<String> = if n == 0 {
                Vec::new()
            } else {
                rest.split('|').map(str::to_owned).collect()
            };
            let ok = names.len() == n as usize
                && (n > 0 || rest.is_empty())
                && names.iter().all(|n| valid_name(n));
            ok.then_some(Reply::Found(names))
        }
        status::DELIVER => {
            let mut fields = body.splitn(3, |&b| b == b'|');
            let id = MessageId::parse(fields.next()?)?;
            let from = std::str::from_utf8(fields.next()?).ok()?.to_owned();
            let text = std::str::from_utf8(fields.next()?).ok()?.to_owned();
            Some(Reply::Deliver(Delivery { id, from, text }))
        }
        status::REDIRECT => Some(Reply::Redirect(usize::try_from(parse_u64(body)?).ok()?)),
        status::UNAVAILABLE if body.is_empty() => Some(Reply::Unavailable),
        _ if body.is_empty() => Violation::from_code(code).map(Reply::Refused),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(bytes: &[u8]) -> Result<Request, Violation> {
        decode_request(bytes)
    }

    #[test]
    fn names_texts_and_patterns_at_their_limits() {
        assert!(valid_name("a") && valid_name(&"Z9".repeat(25)));
        assert!(!valid_name("") && !valid_name(&"a".repeat(51)));
        for bad in ["a b", "a|b", "é", "a_b", "a-b", "a*"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_text(" ") && valid_text(&"~".repeat(262)) && valid_text("a|b|c"));
        assert!(!valid_text("") && !valid_text(&"x".repeat(263)));
        assert!(!valid_text("tab\there") && !valid_text("nl\n") && !valid_text("\x7f"));
        assert!(valid_pattern("*") && valid_pattern("a*b") && valid_pattern(&"*".repeat(50)));
        assert!(!valid_pattern("") && !valid_pattern("a?") && !valid_pattern(&"a".repeat(51)));
    }

    #[test]
    fn wildcards_match_any_run() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ba", false),
            ("*a", "bba", true),
            ("*a", "ab", false),
            ("a*c", "abbbc", true),
            ("a*c", "abcb", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("**x**", "x", true),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("*ab*ab*", "xabyab", true),
            ("*aab", "aaab", true),
            ("A*", "abc", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(matches(p, n), want, "{p} vs {n}");
        }
    }

    /// The matcher as it was until the linear one replaced it (greedy, a mismatch backs
    /// up to the last `*`, which takes one more byte): the reference for its meaning.
    /// `steps` counts its loop turns, one comparison each at most.
    fn backtracking(pattern: &str, name: &str, steps: &mut u64) -> bool {
        let (p, n) = (pattern.as_bytes(), name.as_bytes());
        let (mut i, mut j) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while j < n.len() {
            *steps += 1;
            if i < p.len() && p[i] == b'*' {
                star = Some((i, j));
                i += 1;
            } else if i < p.len() && p[i] == n[j] {
                i += 1;
                j += 1;
            } else if let Some((si, sj)) = star {
                i = si + 1;
                j = sj + 1;
                star = Some((si, sj + 1));
            } else {
                return false;
            }
        }
        p[i..].iter().all(|&b| b == b'*')
    }

    /// Checks one pair against the reference, and the linear matcher's bound.
    fn agree(pattern: &str, name: &str) {
        let mut steps = 0;
        let got = Glob::new(pattern).matches_counting(name, &mut steps);
        assert_eq!(
            got,
            backtracking(pattern, name, &mut 0),
            "{pattern:?} vs {name:?}"
        );
        assert_eq!(matches(pattern, name), got, "{pattern:?} vs {name:?}");
        let bound = (pattern.len() + 2 * name.len()) as u64;
        assert!(steps <= bound, "{pattern:?} vs {name:?}: {steps} > {bound}");
    }

    /// Every string of `alphabet` up to `max` bytes long.
    fn all_strings(alphabet: &[u8], max: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    /// xorshift64*: reproducible randomness without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }

        fn string(&mut self, alphabet: &[u8], max: usize) -> String {
            let len = self.below(max + 1);
            (0..len)
                .map(|_| alphabet[self.below(alphabet.len())] as char)
                .collect()
        }
    }

    #[test]
    fn the_linear_matcher_means_what_the_backtracking_one_did() {
        // Edge cases: the empty pattern, stars only, stars at either end, a name equal to
        // the pattern, runs that overlap themselves, prefix and suffix that would overlap.
        let patterns = [
            "",
            "*",
            "**",
            "***",
            "a",
            "a*",
            "*a",
            "*a*",
            "a**b",
            "**a**",
            "ab*ba",
            "aa*aa",
            "*aab",
            "*aa*aa*",
            "*abab*",
            "a*a",
            "aba*aba",
            "*ab*ab*ab",
            "abc",
            "A*",
            "*0*",
        ];
        let names = [
            "", "a", "aa", "aaa", "aaaa", "ab", "ba", "aba", "abab", "ababab", "aab", "aaab",
            "abba", "aabaa", "abc", "abcd", "ABC", "x0y", "0",
        ];
        for p in patterns {
            agree(p, p);
            for n in names {
                agree(p, n);
            }
        }
        // Exhaustively, over a small alphabet: every pattern of up to 6 bytes against
        // every name of up to 7.
        let names = all_strings(b"ab", 7);
        for p in all_strings(b"ab*", 6) {
            for n in &names {
                agree(&p, n);
            }
        }
        // At random, up to the protocol's lengths: names often made from the pattern (each
        // `*` filled with a random run), sometimes with one byte changed, so that matches
        // and near misses both come up.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..50_000 {
            let alphabet: &[u8] = if round % 2 == 0 { b"ab*" } else { b"abcXY09**" };
            let pattern = rng.string(alphabet, MAX_PATTERN);
            let mut name = match rng.below(3) {
                0 => rng.string(b"abcXY09", MAX_NAME),
                _ => pattern
                    .chars()
                    .map(|c| match c {
                        '*' => rng.string(b"abcXY09", 4),
                        c => c.to_string(),
                    })
                    .collect(),
            };
            if !name.is_empty() && rng.below(2) == 0 {
                let at = rng.below(name.len());
                let c = b"abcXY09"[rng.below(7)] as char;
                name.replace_range(at..=at, &c.to_string());
            }
            agree(&pattern, &name);
        }
    }

    #[test]
    fn a_hostile_pattern_costs_the_linear_matcher_linear_time() {
        // Near misses that make backtracking try every split of the name.
        let cases = [
            (format!("*{}b", "a".repeat(24)), "a".repeat(MAX_NAME)),
            (format!("{}b", "*a".repeat(24)), "a".repeat(MAX_NAME)),
            (format!("*{}b", "ab".repeat(24)), "ab".repeat(MAX_NAME / 2)),
            (format!("*{}b*", "a".repeat(24)), "a".repeat(MAX_NAME)),
            (format!("*{}b*", "a".repeat(47)), "a".repeat(MAX_NAME)),
        ];
        for (p, n) in &cases {
            assert!(valid_pattern(p) && valid_name(n));
            let (mut linear, mut old) = (0, 0);
            assert!(!Glob::new(p).matches_counting(n, &mut linear));
            assert!(!backtracking(p, n, &mut old));
            assert!(linear <= (p.len() + 2 * n.len()) as u64, "{p}: {linear}");
            assert!(old > linear, "{p}: backtracking {old}, linear {linear}");
        }
    }

    #[test]
    fn requests_decode_byte_by_byte() {
        assert_eq!(
            req(b"\x01alice"),
            Ok(Request::Register {
                name: "alice".into(),
                nonce: None
            })
        );
        assert_eq!(
            req(b"\x01alice|42"),
            Ok(Request::Register {
                name: "alice".into(),
                nonce: Some(42)
            })
        );
        assert_eq!(
            req(b"\x02bob"),
            Ok(Request::Login {
                name: "bob".into(),
                session: None
            })
        );
        assert_eq!(
            req(b"\x02bob|77"),
            Ok(Request::Login {
                name: "bob".into(),
                session: Some(77)
            })
        );
        assert_eq!(
            req(b"\x03b*"),
            Ok(Request::Search {
                pattern: "b*".into()
            })
        );
        assert_eq!(
            req(b"\x04a|b|7|hi | there"),
            Ok(Request::Send {
                from: "a".into(),
                to: "b".into(),
                id: 7,
                text: "hi | there".into()
            })
        );
        assert_eq!(req(b"\x05a"), Ok(Request::Logout { name: "a".into() }));
        assert_eq!(req(b"\x06a"), Ok(Request::Delete { name: "a".into() }));
        assert_eq!(req(b"\x07"), Ok(Request::Quit));
        assert_eq!(
            req(b"\x083.18446744073709551615"),
            Ok(Request::Confirm {
                upto: MessageId {
                    epoch: 3,
                    seq: u64::MAX
                }
            })
        );
    }

    #[test]
    fn each_malformed_request_names_its_rule() {
        use Violation::*;
        let cases: [(&[u8], Violation); 20] = [
            (b"", BadRequest),
            (b"\x09x", BadRequest),
            (b"\x01", BadName),
            (b"\x01bad name", BadName),
            (b"\x01ok|", BadRequest),
            (b"\x01ok|-1", BadRequest),
            (b"\x02\xff", BadName),
            (b"\x03", BadPattern),
            (b"\x03a?", BadPattern),
            (b"\x04a|b|1", BadRequest),
            (b"\x04a|b|x|hi", BadRequest),
            (b"\x04a|b|18446744073709551616|hi", BadRequest),
            (b"\x04a|b b|1|hi", BadName),
            (b"\x04a|b|1|", BadText),
            (b"\x04a|b|1|tab\t", BadText),
            (b"\x07x", BadRequest),
            (b"\x08", BadRequest),
            (b"\x087", BadRequest),
            (b"\x081.", BadRequest),
            (b"\x081.2.3", BadRequest),
        ];
        for (bytes, want) in cases {
            assert_eq!(req(bytes), Err(want), "{bytes:?}");
        }
    }

    #[test]
    fn requests_round_trip() {
        let all = [
            Request::Register {
                name: "a1".into(),
                nonce: Some(9),
            },
            Request::Register {
                name: "a1".into(),
                nonce: None,
            },
            Request::Login {
                name: "a1".into(),
                session: Some(5),
            },
            Request::Search {
                pattern: "*1".into(),
            },
            Request::Send {
                from: "a1".into(),
                to: "b2".into(),
                id: u64::MAX,
                text: "|x|".into(),
            },
            Request::Logout { name: "a1".into() },
            Request::Delete { name: "a1".into() },
            Request::Quit,
            Request::Confirm {
                upto: MessageId::default(),
            },
        ];
        for r in all {
            let mut out = Vec::new();
            encode_request(&r, &mut out);
            assert_eq!(decode_request(&out), Ok(r));
        }
    }

    #[test]
    fn replies_byte_by_byte_and_round_trip() {
        let enc = |r: &Reply| {
            let mut out = Vec::new();
            encode_reply(r, &mut out);
            out
        };
        let cases: Vec<(Reply, &[u8])> = vec![
            (Reply::Ok, b"\x20"),
            (Reply::LoggedIn { count: 258 }, b"\x21\x01\x02"),
            (Reply::Found(vec![]), b"\x22\x00\x00"),
            (
                Reply::Found(vec!["ann".into(), "bob".into()]),
                b"\x22\x00\x02ann|bob",
            ),
            (
                Reply::Deliver(Delivery {
                    id: MessageId { epoch: 3, seq: 12 },
                    from: "ann".into(),
                    text: "a|b".into(),
                }),
                b"\x303.12|ann|a|b",
            ),
            (Reply::Redirect(2), b"\x402"),
            (Reply::Unavailable, b"\x41"),
            (Reply::Refused(Violation::Full), b"\x5a"),
        ];
        for (reply, bytes) in cases {
            assert_eq!(enc(&reply), bytes);
            assert_eq!(decode_reply(bytes), Some(reply));
        }
        for v in Violation::ALL {
            assert_eq!(decode_reply(&[v.code()]), Some(Reply::Refused(v)));
        }
        for bad in [
            &b""[..],
            b"\x20x",
            b"\x21\x00",
            b"\x22\x00\x01",
            b"\x30x|a|b",
            b"\x3012|a|b",
            b"\x5b",
        ] {
            assert_eq!(decode_reply(bad), None, "{bad:?}");
        }
    }
}
