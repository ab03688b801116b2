//! Erlang term text: parses the one-term-per-line values the course's channel library and
//! servers exchange, and prints terms back in a form `erl_scan` + `erl_parse` read.
//! Data terms only: no pids, references, funs, binaries, maps or improper lists.
//!
//! Accepted text (`ws` is space, tab, `\r`, `\n`; Erlang's `parse_term` wants the final
//! `.`, the course's writers omit it, so it is optional):
//!
//! ```text
//! line    = ws term ws [ "." ws ]
//! term    = atom | integer | float | string { ws string } | tuple | list
//! tuple   = "{" ws [ term { ws "," ws term } ws ] "}"
//! list    = "[" ws [ term { ws "," ws term } ws ] "]"
//! atom    = lower { namechar }                  lower = a-z, namechar = A-Z a-z 0-9 _ @
//!         | "'" { char | escape } "'"
//! integer = [ sign ws ] ( digits | base "#" based_digits | "$" ( char | escape ) )
//! float   = [ sign ws ] digits "." digits [ ( "e" | "E" ) [ sign ] digits ]
//! string  = '"' { char | escape } '"'           adjacent strings concatenate
//! digits  = digit { [ "_" ] digit }             base = 2..36, sign = "+" | "-"
//! escape  = "\" ( "b" | "d" | "e" | "f" | "n" | "r" | "s" | "t" | "v"
//!               | octal [ octal [ octal ] ] | "x" hex hex | "x{" hex { hex } "}"
//!               | "^" ( a-z | "@".."_" | "?" ) | any other char, meaning itself )
//! ```
//!
//! Like Erlang, the parser also takes Latin-1 letters in bare atoms (`ß`..`ÿ` first) and
//! reserved words as bare atoms (`end`); the printer quotes all of those, so what it writes
//! is accepted by every Erlang reader. Printed text is UTF-8 with non-ASCII characters
//! as-is: an Erlang reader on a `list`-mode socket gets bytes, and must decode them
//! (`unicode:characters_to_list/1`) to see the same code points.
//!
//! # Depth
//!
//! Parsing and printing use an explicit stack, never recursion per nesting level, so
//! hostile input cannot exhaust a small thread stack. The derived `Drop`, `Clone`,
//! `PartialEq` and `Debug` of [`Term`] do recurse; [`Limits::max_depth`] keeps parsed terms
//! shallow enough for them, while a term built by code (or parsed with a raised limit) is
//! the caller's responsibility to keep shallow.

use std::fmt::{self, Write as _};
use std::str::FromStr;

/// Longest atom Erlang accepts, in characters; a longer one is a `system_limit` there.
const MAX_ATOM_CHARS: usize = 255;

/// An Erlang data term.
///
/// `Str` is what a `"..."` literal parses to. Erlang itself has no string type: a string is
/// a list of character codes, so `"hi"` and `[104,105]` are the same term to an Erlang node
/// (see [`Term::as_text`]).
///
/// `Float` holds finite values when parsed. Erlang text has no spelling for infinities or
/// NaN, so printing writes those as the atoms `inf`, `neg_inf` and `nan`, which read back
/// as atoms. `-0.0` keeps its sign both ways (OTP 27 tells it apart from `0.0`).
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// An atom, by name, without quotes.
    Atom(String),
    /// An integer; Erlang's are unbounded, this codec refuses what `i64` cannot hold.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `"..."` string literal.
    Str(String),
    /// `{A,B,...}`
    Tuple(Vec<Term>),
    /// `[A,B,...]`, proper lists only.
    List(Vec<Term>),
}

impl Term {
    /// `Term::Atom` of `name`.
    pub fn atom(name: &str) -> Term {
        Term::Atom(name.to_owned())
    }

    /// `Term::Str` of `text`, printed as `"..."`.
    pub fn str(text: &str) -> Term {
        Term::Str(text.to_owned())
    }

    /// `Term::Int`.
    pub fn int(value: i64) -> Term {
        Term::Int(value)
    }

    /// `Term::Float`.
    pub fn float(value: f64) -> Term {
        Term::Float(value)
    }

    /// `Term::Tuple`.
    pub fn tuple(items: Vec<Term>) -> Term {
        Term::Tuple(items)
    }

    /// `Term::List`.
    pub fn list(items: Vec<Term>) -> Term {
        Term::List(items)
    }

    /// The name of an atom.
    pub fn as_atom(&self) -> Option<&str> {
        match self {
            Term::Atom(name) => Some(name),
            _ => None,
        }
    }

    /// The value of an integer (a `$c` literal included).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Term::Int(value) => Some(*value),
            _ => None,
        }
    }

    /// The value of a float; integers give `None`, as Erlang keeps `1` and `1.0` apart.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Term::Float(value) => Some(*value),
            _ => None,
        }
    }

    /// The elements of a tuple.
    pub fn as_tuple(&self) -> Option<&[Term]> {
        match self {
            Term::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The elements of a list; a `Str` gives `None` (see [`Term::as_text`]).
    pub fn as_list(&self) -> Option<&[Term]> {
        match self {
            Term::List(items) => Some(items),
            _ => None,
        }
    }

    /// The text of an Erlang string: a `Str`, or a `List` whose elements are all integers
    /// that are Unicode scalar values (`[104,105]` is `"hi"`, `[]` is `""`).
    ///
    /// Atoms give `None`: whether `hello` may stand for `"hello"` is the caller's choice.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Term::Str(text) => Some(text.clone()),
            Term::List(items) => items
                .iter()
                .map(|item| {
                    let code = u32::try_from(item.as_int()?).ok()?;
                    char::from_u32(code)
                })
                .collect(),
            _ => None,
        }
    }

    /// Whether this is the atom `name`.
    pub fn is_atom(&self, name: &str) -> bool {
        self.as_atom() == Some(name)
    }

    /// Splits a tuple whose first element is an atom into that tag and the other elements:
    /// `{send,Name,Text}` gives `("send", [Name, Text])`. Anything else, including a bare
    /// atom such as `disconnect`, gives `None`.
    pub fn tagged(&self) -> Option<(&str, &[Term])> {
        let (tag, rest) = self.as_tuple()?.split_first()?;
        Some((tag.as_atom()?, rest))
    }

    /// Appends the term's text, exactly what `Display` writes, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail, and write_term fails only when its sink does.
        let _ = write_term(self, &mut ByteSink(out));
    }
}

/// Canonical text: no spaces (like Erlang's `~w`), atoms quoted only when they must be,
/// floats always with digits on both sides of a `.`.
impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_term(self, f)
    }
}

impl FromStr for Term {
    type Err = TermError;

    fn from_str(text: &str) -> Result<Term, TermError> {
        parse(text)
    }
}

/// Bounds on what one parse may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tuples and lists open at once; a scalar at top level is depth 0, `[[1]]` is
    /// depth 2. This is also what keeps the recursive `Drop` of a parsed term safe.
    pub max_depth: usize,
    /// Longest input in bytes, checked before anything is scanned.
    pub max_len: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_depth: 64,
            max_len: 1 << 20,
        }
    }
}

/// Why a parse failed, and the byte offset into the input where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermError {
    /// What went wrong.
    pub kind: TermErrorKind,
    /// Byte offset into the input where it went wrong.
    pub offset: usize,
}

/// The kinds of [`TermError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TermErrorKind {
    /// The input stopped inside a term (or held none).
    UnexpectedEnd,
    /// A character that cannot start or continue a term here.
    UnexpectedChar(char),
    /// `\x` without hex digits, `\^` with a character that has no control code, or a code
    /// point that is not a Unicode scalar value.
    BadEscape,
    /// A malformed integer: a base outside 2..36, a missing digit after `#`, or a digit
    /// too large for its base.
    BadInteger,
    /// An integer outside `i64`.
    IntegerOutOfRange,
    /// A malformed float (`1e10`, `1.0e`), or one too large for an `f64`.
    BadFloat,
    /// An atom of more than 255 characters, which no Erlang node would accept.
    AtomTooLong,
    /// More tuples and lists open at once than [`Limits::max_depth`].
    TooDeep {
        /// The `max_depth` in force.
        limit: usize,
    },
    /// Input longer than [`Limits::max_len`]; the offset is the limit.
    TooLong {
        /// The `max_len` in force.
        limit: usize,
    },
    /// Bytes given to [`parse_bytes`] that are not UTF-8.
    InvalidUtf8,
    /// Erlang syntax that is valid but not a data term this codec carries.
    Unsupported(&'static str),
    /// Something other than whitespace after the term and its optional `.`.
    TrailingInput,
}

impl TermError {
    fn new(kind: TermErrorKind, offset: usize) -> TermError {
        TermError { kind, offset }
    }

    /// A short atom naming the failure, for `{error,Reason}` replies.
    pub fn reason_atom(&self) -> &'static str {
        match self.kind {
            TermErrorKind::TooDeep { .. } => "too_deep",
            TermErrorKind::TooLong { .. } => "too_long",
            TermErrorKind::InvalidUtf8 => "invalid_utf8",
            TermErrorKind::Unsupported(_) => "unsupported",
            _ => "bad_term",
        }
    }
}

impl fmt::Display for TermError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TermErrorKind::UnexpectedEnd => f.write_str("unexpected end of input")?,
            TermErrorKind::UnexpectedChar(c) => write!(f, "unexpected {c:?}")?,
            TermErrorKind::BadEscape => f.write_str("bad escape sequence")?,
            TermErrorKind::BadInteger => f.write_str("malformed integer")?,
            TermErrorKind::IntegerOutOfRange => f.write_str("integer out of 64-bit range")?,
            TermErrorKind::BadFloat => f.write_str("malformed or out-of-range float")?,
            TermErrorKind::AtomTooLong => {
                write!(f, "atom longer than {MAX_ATOM_CHARS} characters")?;
            }
            TermErrorKind::TooDeep { limit } => write!(f, "nesting deeper than {limit}")?,
            // The offset is the limit itself, so saying it twice adds nothing.
            TermErrorKind::TooLong { limit } => {
                return write!(f, "input longer than {limit} bytes");
            }
            TermErrorKind::InvalidUtf8 => f.write_str("invalid UTF-8")?,
            TermErrorKind::Unsupported(what) => write!(f, "unsupported {what}")?,
            TermErrorKind::TrailingInput => f.write_str("trailing input after the term")?,
        }
        write!(f, " at byte {}", self.offset)
    }
}

impl std::error::Error for TermError {}

/// Parses one term with the default [`Limits`].
///
/// # Errors
///
/// Fails when `text` is not exactly one term (see the module grammar), optionally followed
/// by `.`, with whitespace around; or when it breaks a limit.
pub fn parse(text: &str) -> Result<Term, TermError> {
    parse_with(text, &Limits::default())
}

/// Parses one term read off the wire with the default [`Limits`].
///
/// # Errors
///
/// As [`parse`], plus `InvalidUtf8` when `bytes` are not UTF-8.
pub fn parse_bytes(bytes: &[u8]) -> Result<Term, TermError> {
    parse_bytes_with(bytes, &Limits::default())
}

/// Parses one term read off the wire under `limits`.
///
/// # Errors
///
/// As [`parse_bytes`], with `limits` in place of the defaults.
pub fn parse_bytes_with(bytes: &[u8], limits: &Limits) -> Result<Term, TermError> {
    // Checked before UTF-8 validation so an oversized input costs nothing to refuse.
    check_len(bytes.len(), limits)?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| TermError::new(TermErrorKind::InvalidUtf8, e.valid_up_to()))?;
    parse_with(text, limits)
}

/// Parses one term under `limits`.
///
/// # Errors
///
/// As [`parse`], with `limits` in place of the defaults.
pub fn parse_with(text: &str, limits: &Limits) -> Result<Term, TermError> {
    check_len(text.len(), limits)?;
    Parser {
        src: text,
        bytes: text.as_bytes(),
        pos: 0,
        max_depth: limits.max_depth,
    }
    .parse_line()
}

fn check_len(len: usize, limits: &Limits) -> Result<(), TermError> {
    if len > limits.max_len {
        let limit = limits.max_len;
        return Err(TermError::new(TermErrorKind::TooLong { limit }, limit));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    Tuple,
    List,
}

impl Seq {
    fn close(self) -> u8 {
        match self {
            Seq::Tuple => b'}',
            Seq::List => b']',
        }
    }

    fn build(self, items: Vec<Term>) -> Term {
        match self {
            Seq::Tuple => Term::Tuple(items),
            Seq::List => Term::List(items),
        }
    }
}

/// A tuple or list whose closing bracket has not been read yet.
struct Open {
    seq: Seq,
    items: Vec<Term>,
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    max_depth: usize,
}

impl Parser<'_> {
    fn parse_line(mut self) -> Result<Term, TermError> {
        // The open tuples and lists live here, on the heap, so nesting depth never turns
        // into call depth.
        let mut stack: Vec<Open> = Vec::new();
        'value: loop {
            self.skip_ws();
            let mut term = match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    if stack.len() >= self.max_depth {
                        let limit = self.max_depth;
                        return Err(self.error(TermErrorKind::TooDeep { limit }));
                    }
                    let seq = if open == b'{' { Seq::Tuple } else { Seq::List };
                    self.pos += 1;
                    self.skip_ws();
                    if self.peek() != Some(seq.close()) {
                        stack.push(Open {
                            seq,
                            items: Vec::new(),
                        });
                        continue 'value;
                    }
                    self.pos += 1;
                    seq.build(Vec::new())
                }
                _ => self.scalar()?,
            };
            // A finished term goes into its enclosing sequence, which may finish in turn.
            loop {
                let Some(open) = stack.last_mut() else {
                    return self.finish(term);
                };
                open.items.push(term);
                let seq = open.seq;
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        continue 'value;
                    }
                    Some(c) if c == seq.close() => {
                        self.pos += 1;
                        let items = stack.pop().map_or_else(Vec::new, |open| open.items);
                        term = seq.build(items);
                    }
                    Some(b'|') if seq == Seq::List => {
                        return Err(self.error(TermErrorKind::Unsupported("improper list [H|T]")));
                    }
                    _ => return Err(self.unexpected()),
                }
            }
        }
    }

    fn finish(&mut self, term: Term) -> Result<Term, TermError> {
        self.skip_ws();
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.skip_ws();
        }
        if self.pos < self.bytes.len() {
            return Err(self.error(TermErrorKind::TrailingInput));
        }
        Ok(term)
    }

    fn scalar(&mut self) -> Result<Term, TermError> {
        match self.peek() {
            Some(b'a'..=b'z') => self.bare_atom(),
            Some(b'\'') => {
                let start = self.pos;
                let name = self.quoted(b'\'')?;
                if name.chars().count() > MAX_ATOM_CHARS {
                    return Err(TermError::new(TermErrorKind::AtomTooLong, start));
                }
                Ok(Term::Atom(name))
            }
            Some(b'"') => self.strings(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'$') => self.number(),
            Some(b'<') if self.peek_at(1) == Some(b'<') => {
                Err(self.error(TermErrorKind::Unsupported("binary <<...>>")))
            }
            Some(b'<') => Err(self.error(TermErrorKind::Unsupported("pid <...>"))),
            Some(b'#') if self.peek_at(1) == Some(b'{') => {
                Err(self.error(TermErrorKind::Unsupported("map #{...}")))
            }
            Some(b'#') => Err(self.error(TermErrorKind::Unsupported(
                "reference, port, fun or record #...",
            ))),
            _ => match self.peek_char() {
                Some(c) if is_atom_start(c) => self.bare_atom(),
                _ => Err(self.unexpected()),
            },
        }
    }

    fn bare_atom(&mut self) -> Result<Term, TermError> {
        let start = self.pos;
        let mut chars = 0;
        let mut end = self.bytes.len();
        for (i, c) in self.src[start..].char_indices() {
            if i > 0 && !is_name_char(c) {
                end = start + i;
                break;
            }
            chars += 1;
        }
        if chars > MAX_ATOM_CHARS {
            return Err(TermError::new(TermErrorKind::AtomTooLong, start));
        }
        self.pos = end;
        Ok(Term::Atom(self.src[start..end].to_owned()))
    }

    /// One or more adjacent string literals, concatenated as Erlang does.
    fn strings(&mut self) -> Result<Term, TermError> {
        let mut text = self.quoted(b'"')?;
        loop {
            let before_ws = self.pos;
            self.skip_ws();
            if self.peek() != Some(b'"') {
                self.pos = before_ws;
                return Ok(Term::Str(text));
            }
            text.push_str(&self.quoted(b'"')?);
        }
    }

    /// The body of a `'...'` or `"..."` literal; `self.pos` is at the opening quote.
    fn quoted(&mut self, quote: u8) -> Result<String, TermError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let run = self.pos;
            while let Some(b) = self.peek() {
                if b == quote || b == b'\\' {
                    break;
                }
                self.pos += 1;
            }
            // Runs end at an ASCII byte or the end, so they are whole UTF-8 sequences.
            out.push_str(&self.src[run..self.pos]);
            match self.peek() {
                None => return Err(self.error(TermErrorKind::UnexpectedEnd)),
                Some(b'\\') => out.push(self.escape()?),
                Some(_) => {
                    self.pos += 1;
                    return Ok(out);
                }
            }
        }
    }

    /// One escape sequence, as `erl_scan` reads it; `self.pos` is at the backslash.
    fn escape(&mut self) -> Result<char, TermError> {
        let start = self.pos;
        self.pos += 1;
        let bad = TermError::new(TermErrorKind::BadEscape, start);
        let Some(c) = self.peek_char() else {
            return Err(self.error(TermErrorKind::UnexpectedEnd));
        };
        self.pos += c.len_utf8();
        let code = match c {
            '0'..='7' => {
                let mut code = c as u32 - u32::from(b'0');
                for _ in 0..2 {
                    match self.peek() {
                        Some(d @ b'0'..=b'7') => {
                            code = code * 8 + u32::from(d - b'0');
                            self.pos += 1;
                        }
                        _ => break,
                    }
                }
                code
            }
            'x' if self.peek() == Some(b'{') => {
                self.pos += 1;
                let digits = self.pos;
                let mut code: u32 = 0;
                loop {
                    match self.peek() {
                        Some(b'}') if self.pos > digits => break,
                        Some(d) if d.is_ascii_hexdigit() => {
                            // Saturate: any value past the Unicode range is equally invalid,
                            // and leading zeros must not be mistaken for overflow.
                            code = code.saturating_mul(16).saturating_add(hex_value(d));
                            self.pos += 1;
                        }
                        None => return Err(self.error(TermErrorKind::UnexpectedEnd)),
                        Some(_) => return Err(bad),
                    }
                }
                self.pos += 1;
                code
            }
            'x' => match (self.peek(), self.peek_at(1)) {
                (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                    self.pos += 2;
                    hex_value(h) * 16 + hex_value(l)
                }
                _ => return Err(bad),
            },
            '^' => {
                let Some(ctrl) = self.peek_char() else {
                    return Err(self.error(TermErrorKind::UnexpectedEnd));
                };
                self.pos += ctrl.len_utf8();
                match ctrl {
                    '?' => 0x7f,
                    '@'..='_' | 'a'..='z' => ctrl as u32 & 0x1f,
                    _ => return Err(bad),
                }
            }
            'b' => 0x08,
            'd' => 0x7f,
            'e' => 0x1b,
            'f' => 0x0c,
            'n' => 0x0a,
            'r' => 0x0d,
            's' => 0x20,
            't' => 0x09,
            'v' => 0x0b,
            // Erlang reads any other escaped character as itself: \\ \' \" and also \q.
            other => return Ok(other),
        };
        char::from_u32(code).ok_or(bad)
    }

    fn number(&mut self) -> Result<Term, TermError> {
        let start = self.pos;
        let negative = match self.peek() {
            Some(b'-') => true,
            Some(b'+') => false,
            _ => return self.unsigned_number(start, false),
        };
        self.pos += 1;
        // erl_parse reads the sign as an operator token, so whitespace may follow it.
        self.skip_ws();
        self.unsigned_number(start, negative)
    }

    fn unsigned_number(&mut self, start: usize, negative: bool) -> Result<Term, TermError> {
        let out_of_range = TermError::new(TermErrorKind::IntegerOutOfRange, start);
        if self.peek() == Some(b'$') {
            self.pos += 1;
            let code = match self.peek_char() {
                None => return Err(self.error(TermErrorKind::UnexpectedEnd)),
                Some('\\') => self.escape()?,
                Some(c) => {
                    self.pos += c.len_utf8();
                    c
                }
            };
            return Ok(Term::Int(
                apply_sign(u64::from(code), negative).ok_or(out_of_range)?,
            ));
        }
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(self.unexpected());
        }
        let digits = self.pos;
        self.digit_run(10);
        let decimal = digit_value(&self.bytes[digits..self.pos], 10);

        let term = match self.peek() {
            Some(b'#') => {
                let radix = match decimal {
                    Some(radix @ 2..=36) => radix as u32,
                    _ => return Err(TermError::new(TermErrorKind::BadInteger, start)),
                };
                self.pos += 1;
                let based = self.pos;
                self.digit_run(radix);
                if self.pos == based {
                    return Err(self.error(TermErrorKind::BadInteger));
                }
                let magnitude = digit_value(&self.bytes[based..self.pos], radix);
                // A letter or digit right after is one too large for the base (`2#102`).
                if self.peek().is_some_and(|b| b.is_ascii_alphanumeric()) {
                    return Err(self.error(TermErrorKind::BadInteger));
                }
                Term::Int(
                    magnitude
                        .and_then(|m| apply_sign(m, negative))
                        .ok_or(out_of_range)?,
                )
            }
            Some(b'.') if self.peek_at(1).is_some_and(|b| b.is_ascii_digit()) => {
                self.pos += 1;
                self.digit_run(10);
                if matches!(self.peek(), Some(b'e' | b'E')) {
                    self.pos += 1;
                    if matches!(self.peek(), Some(b'+' | b'-')) {
                        self.pos += 1;
                    }
                    if !matches!(self.peek(), Some(b'0'..=b'9')) {
                        return Err(TermError::new(TermErrorKind::BadFloat, start));
                    }
                    self.digit_run(10);
                }
                let literal: String = self.src[digits..self.pos]
                    .chars()
                    .filter(|&c| c != '_')
                    .collect();
                let value = match literal.parse::<f64>() {
                    Ok(value) if value.is_finite() => value,
                    _ => return Err(TermError::new(TermErrorKind::BadFloat, start)),
                };
                Term::Float(if negative { -value } else { value })
            }
            // Valid in many languages but not in Erlang, which needs the `.` (`1.0e10`).
            Some(b'e' | b'E') => return Err(TermError::new(TermErrorKind::BadFloat, start)),
            _ => Term::Int(
                decimal
                    .and_then(|m| apply_sign(m, negative))
                    .ok_or(out_of_range)?,
            ),
        };
        // `12ab` or `1.5_`: Erlang would scan two tokens here, which no term allows.
        match self.peek_char() {
            Some(c) if is_name_char(c) => Err(self.unexpected()),
            _ => Ok(term),
        }
    }

    /// Skips digits of `radix` with single `_` separators between them, as Erlang allows.
    fn digit_run(&mut self, radix: u32) {
        let is_digit = |b: Option<u8>| b.is_some_and(|b| char::from(b).is_digit(radix));
        let start = self.pos;
        while is_digit(self.peek())
            || (self.pos > start && self.peek() == Some(b'_') && is_digit(self.peek_at(1)))
        {
            self.pos += 1;
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<u8> {
        self.bytes.get(self.pos + ahead).copied()
    }

    fn peek_char(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn error(&self, kind: TermErrorKind) -> TermError {
        TermError::new(kind, self.pos)
    }

    fn unexpected(&self) -> TermError {
        match self.peek_char() {
            Some(c) => self.error(TermErrorKind::UnexpectedChar(c)),
            None => self.error(TermErrorKind::UnexpectedEnd),
        }
    }
}

/// The value of a digit run (separators included), or `None` past `u64`.
fn digit_value(digits: &[u8], radix: u32) -> Option<u64> {
    digits
        .iter()
        .filter(|&&b| b != b'_')
        .try_fold(0u64, |acc, &b| {
            let digit = char::from(b).to_digit(radix)?;
            acc.checked_mul(u64::from(radix))?
                .checked_add(u64::from(digit))
        })
}

fn apply_sign(magnitude: u64, negative: bool) -> Option<i64> {
    if negative {
        // Through the unsigned magnitude, so -9223372036854775808 is reachable.
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

fn hex_value(digit: u8) -> u32 {
    char::from(digit).to_digit(16).unwrap_or(0)
}

/// Erlang's unquoted-atom start: ASCII or Latin-1 lowercase.
fn is_atom_start(c: char) -> bool {
    c.is_ascii_lowercase() || (('ß'..='ÿ').contains(&c) && c != '÷')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == '_'
        || c == '@'
        || (('À'..='ÿ').contains(&c) && c != '×' && c != '÷')
}

/// Whether `name` may be written without quotes. Stricter than the parser: ASCII only, so
/// the text does not depend on how the reader decodes bytes.
fn is_bare_atom(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'@')
        && !is_reserved_word(name)
}

fn is_reserved_word(name: &str) -> bool {
    matches!(
        name,
        "after"
            | "and"
            | "andalso"
            | "band"
            | "begin"
            | "bnot"
            | "bor"
            | "bsl"
            | "bsr"
            | "bxor"
            | "case"
            | "catch"
            | "cond"
            | "div"
            | "else"
            | "end"
            | "fun"
            | "if"
            | "let"
            | "maybe"
            | "not"
            | "of"
            | "or"
            | "orelse"
            | "receive"
            | "rem"
            | "try"
            | "when"
            | "xor"
    )
}

/// Lets `write_to` share the `fmt::Write` printer without a `String` in between.
struct ByteSink<'a>(&'a mut Vec<u8>);

impl fmt::Write for ByteSink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn write_term<W: fmt::Write>(term: &Term, out: &mut W) -> fmt::Result {
    /// A tuple or list being written: the elements not yet written and its closing bracket.
    struct Open<'t> {
        rest: std::slice::Iter<'t, Term>,
        close: char,
        first: bool,
    }
    // Explicit, like the parser's, so a deep term built by code prints on any stack.
    let mut stack: Vec<Open<'_>> = Vec::new();
    let mut next = term;
    loop {
        match next {
            Term::Atom(name) if is_bare_atom(name) => out.write_str(name)?,
            Term::Atom(name) => write_quoted(name, '\'', out)?,
            Term::Int(value) => write!(out, "{value}")?,
            Term::Float(value) => write_float(*value, out)?,
            Term::Str(text) => write_quoted(text, '"', out)?,
            Term::Tuple(items) | Term::List(items) => {
                let (open, close) = match next {
                    Term::Tuple(_) => ('{', '}'),
                    _ => ('[', ']'),
                };
                out.write_char(open)?;
                stack.push(Open {
                    rest: items.iter(),
                    close,
                    first: true,
                });
            }
        }
        loop {
            let Some(open) = stack.last_mut() else {
                return Ok(());
            };
            if let Some(item) = open.rest.next() {
                if !open.first {
                    out.write_char(',')?;
                }
                open.first = false;
                next = item;
                break;
            }
            out.write_char(open.close)?;
            stack.pop();
        }
    }
}

/// Writes `text` between `quote`s. Escapes only what must be escaped for `erl_scan`, plus
/// control characters, so the text stays on one line; other characters go out as UTF-8.
fn write_quoted<W: fmt::Write>(text: &str, quote: char, out: &mut W) -> fmt::Result {
    out.write_char(quote)?;
    let mut run = 0;
    for (i, c) in text.char_indices() {
        let escaped = match c {
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\\' => Some("\\\\"),
            '"' if quote == '"' => Some("\\\""),
            '\'' if quote == '\'' => Some("\\'"),
            c if c < ' ' || c == '\x7f' => None,
            _ => continue,
        };
        out.write_str(&text[run..i])?;
        match escaped {
            Some(escape) => out.write_str(escape)?,
            // Exactly two digits, which is all Erlang's `\xHH` reads, whatever follows.
            None => write!(out, "\\x{:02X}", u32::from(c))?,
        }
        run = i + c.len_utf8();
    }
    out.write_str(&text[run..])?;
    out.write_char(quote)
}

/// Writes the shortest text that reads back as the same `f64`, in Erlang's float syntax.
fn write_float<W: fmt::Write>(value: f64, out: &mut W) -> fmt::Result {
    if value.is_nan() {
        return out.write_str("nan");
    }
    if value.is_infinite() {
        return out.write_str(if value > 0.0 { "inf" } else { "neg_inf" });
    }
    let magnitude = value.abs();
    if magnitude == 0.0 || (1e-5..1e16).contains(&magnitude) {
        // Rust's `{}` is shortest-round-trip without an exponent; it has a `.` exactly when
        // the value has a fraction, since dropping one would name an integer.
        write!(out, "{value}")?;
        if value.fract() == 0.0 {
            out.write_str(".0")?;
        }
        Ok(())
    } else {
        // `{:e}` writes `1e20` for a one-digit mantissa; Erlang needs `1.0e20`.
        write!(DotBeforeExponent { out, dotted: false }, "{value:e}")
    }
}

/// Passes text through, inserting `.0` before an `e` that no `.` came before.
struct DotBeforeExponent<'w, W> {
    out: &'w mut W,
    dotted: bool,
}

impl<W: fmt::Write> fmt::Write for DotBeforeExponent<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !self.dotted {
            if s.contains('.') {
                self.dotted = true;
            } else if let Some(e) = s.find('e') {
                self.dotted = true;
                self.out.write_str(&s[..e])?;
                self.out.write_str(".0")?;
                return self.out.write_str(&s[e..]);
            }
        }
        self.out.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atom(name: &str) -> Term {
        Term::atom(name)
    }

    fn int(value: i64) -> Term {
        Term::int(value)
    }

    fn ok(text: &str) -> Term {
        match parse(text) {
            Ok(term) => term,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn err(text: &str) -> TermError {
        match parse(text) {
            Ok(term) => panic!("{text:?} parsed as {term:?}"),
            Err(e) => e,
        }
    }

    fn fails(text: &str, kind: TermErrorKind, offset: usize) {
        assert_eq!(err(text), TermError { kind, offset }, "{text:?}");
    }

    /// Equality that tells `-0.0` from `0.0`, which the derived one does not.
    fn same(a: &Term, b: &Term) -> bool {
        match (a, b) {
            (Term::Float(x), Term::Float(y)) => x.to_bits() == y.to_bits(),
            (Term::Tuple(xs), Term::Tuple(ys)) | (Term::List(xs), Term::List(ys)) => {
                xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same(x, y))
            }
            _ => a == b,
        }
    }

    fn printed(term: &Term) -> String {
        let text = term.to_string();
        let mut bytes = b"prefix".to_vec();
        term.write_to(&mut bytes);
        assert_eq!(&bytes[6..], text.as_bytes(), "write_to and Display differ");
        text
    }

    const STACK: usize = 128 * 1024;

    fn on_small_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("the small-stack thread panicked");
    }

    /// Takes a term apart without recursion, for terms deeper than `Drop` can handle.
    fn dismantle(term: Term) {
        let mut pending = vec![term];
        while let Some(term) = pending.pop() {
            if let Term::Tuple(items) | Term::List(items) = term {
                pending.extend(items);
            }
        }
    }

    #[test]
    fn classic_protocol_examples() {
        let chan = Term::tuple(vec![
            atom("remote_chan"),
            Term::tuple(vec![int(127), int(0), int(0), int(1)]),
            int(40123),
        ]);
        assert_eq!(ok("{remote_chan,{127,0,0,1},40123}"), chan);
        let just = ok("{just,{remote_chan,{127,0,0,1},40123}}\n");
        assert_eq!(just, Term::tuple(vec![atom("just"), chan.clone()]));
        assert_eq!(printed(&just), "{just,{remote_chan,{127,0,0,1},40123}}");

        let msg = ok("{remote_msg,[104,105]}");
        let (tag, rest) = msg.tagged().expect("tagged");
        assert_eq!(tag, "remote_msg");
        assert_eq!(rest[0].as_text().as_deref(), Some("hi"));
        assert_eq!(printed(&msg), "{remote_msg,[104,105]}");
    }

    #[test]
    fn whitespace_and_final_dot() {
        let expected = Term::tuple(vec![atom("a"), Term::list(vec![int(1), int(2)])]);
        for text in [
            "{a,[1,2]}",
            "{a,[1,2]}.",
            " \t{ a , [ 1 ,\r\n2 ] }\r\n",
            "{a,[1,2]} . \n",
            "{a,[1,2]}.\n",
        ] {
            assert_eq!(ok(text), expected, "{text:?}");
        }
        assert_eq!(ok("{ }"), Term::tuple(vec![]));
        assert_eq!(ok("[\n]"), Term::list(vec![]));
        assert_eq!(ok("1."), int(1));
    }

    #[test]
    fn atoms() {
        assert_eq!(ok("hello"), atom("hello"));
        assert_eq!(ok("a@b_C9"), atom("a@b_C9"));
        assert_eq!(ok("'Hello World'"), atom("Hello World"));
        assert_eq!(ok("''"), atom(""));
        assert_eq!(ok(r"'it\'s'"), atom("it's"));
        assert_eq!(ok("'\"'"), atom("\""));
        assert_eq!(ok("'\\n'"), atom("\n"));
        // Latin-1 letters and reserved words, as Erlang's own printer may write them.
        assert_eq!(ok("ßtraße"), atom("ßtraße"));
        assert_eq!(ok("{end,of}"), Term::tuple(vec![atom("end"), atom("of")]));
        assert!(ok("disconnect").is_atom("disconnect"));
        assert!(!ok("disconnect").is_atom("exit"));

        let longest = "a".repeat(255);
        assert_eq!(ok(&longest), atom(&longest));
        assert_eq!(ok(&format!("'{longest}'")), atom(&longest));
        fails(&"a".repeat(256), TermErrorKind::AtomTooLong, 0);
        fails(
            &format!("['{}']", "é".repeat(256)),
            TermErrorKind::AtomTooLong,
            1,
        );
    }

    #[test]
    fn atoms_print_bare_only_when_erlang_reads_them_bare() {
        for (name, text) in [
            ("hello", "hello"),
            ("a@b_C9", "a@b_C9"),
            ("Hello", "'Hello'"),
            ("_x", "'_x'"),
            ("9", "'9'"),
            ("", "''"),
            ("hello world", "'hello world'"),
            ("it's", r"'it\'s'"),
            ("a\\b", r"'a\\b'"),
            ("say \"hi\"", "'say \"hi\"'"),
            ("tab\there", r"'tab\there'"),
            ("é", "'é'"),
            ("end", "'end'"),
            ("maybe", "'maybe'"),
            ("ends", "ends"),
        ] {
            assert_eq!(printed(&atom(name)), text, "{name:?}");
            assert_eq!(ok(text), atom(name), "{text:?}");
        }
    }

    #[test]
    fn reserved_words_round_trip_quoted() {
        let words = "after and andalso band begin bnot bor bsl bsr bxor case catch cond div \
                     end fun if let maybe else not of or orelse receive rem try when xor";
        for word in words.split_whitespace() {
            let text = printed(&atom(word));
            assert_eq!(text, format!("'{word}'"));
            assert_eq!(ok(&text), atom(word));
        }
    }

    #[test]
    fn integers() {
        assert_eq!(ok("0"), int(0));
        assert_eq!(ok("42"), int(42));
        assert_eq!(ok("-42"), int(-42));
        assert_eq!(ok("+42"), int(42));
        assert_eq!(ok("- 42"), int(-42));
        assert_eq!(ok("007"), int(7));
        assert_eq!(ok("1_000_000"), int(1_000_000));
        assert_eq!(ok("9223372036854775807"), int(i64::MAX));
        assert_eq!(ok("-9223372036854775808"), int(i64::MIN));
        assert_eq!(ok("[-1,-2]"), Term::list(vec![int(-1), int(-2)]));
        fails("9223372036854775808", TermErrorKind::IntegerOutOfRange, 0);
        fails(
            "[-9223372036854775809]",
            TermErrorKind::IntegerOutOfRange,
            1,
        );
        fails(
            "99999999999999999999999",
            TermErrorKind::IntegerOutOfRange,
            0,
        );
        assert_eq!(printed(&int(i64::MIN)), "-9223372036854775808");
    }

    #[test]
    fn based_integers() {
        assert_eq!(ok("16#ff"), int(255));
        assert_eq!(ok("16#FF"), int(255));
        assert_eq!(ok("-16#ff"), int(-255));
        assert_eq!(ok("2#1010"), int(10));
        assert_eq!(ok("8#777"), int(511));
        assert_eq!(ok("36#zz"), int(36 * 36 - 1));
        assert_eq!(ok("16#ff_ff"), int(0xffff));
        assert_eq!(ok("16#7fffffffffffffff"), int(i64::MAX));
        assert_eq!(ok("-16#8000000000000000"), int(i64::MIN));
        fails("16#8000000000000000", TermErrorKind::IntegerOutOfRange, 0);
        fails("1#0", TermErrorKind::BadInteger, 0);
        fails("37#0", TermErrorKind::BadInteger, 0);
        fails("99999999999999999999#0", TermErrorKind::BadInteger, 0);
        fails("16#", TermErrorKind::BadInteger, 3);
        fails("16#g", TermErrorKind::BadInteger, 3);
        fails("2#102", TermErrorKind::BadInteger, 4);
    }

    #[test]
    fn char_literals() {
        assert_eq!(ok("$a"), int(97));
        assert_eq!(ok("$ "), int(32));
        assert_eq!(ok("$é"), int(0xe9));
        assert_eq!(ok("$€"), int(0x20ac));
        assert_eq!(ok(r"$\n"), int(10));
        assert_eq!(ok(r"$\\"), int(92));
        assert_eq!(ok(r"$\x{1F600}"), int(0x1f600));
        assert_eq!(ok("-$a"), int(-97));
        assert_eq!(ok("[$h,$i]").as_text().as_deref(), Some("hi"));
        fails("$", TermErrorKind::UnexpectedEnd, 1);
        fails("$ab", TermErrorKind::TrailingInput, 2);
        fails("[$ab]", TermErrorKind::UnexpectedChar('b'), 3);
    }

    #[test]
    fn floats() {
        assert_eq!(ok("1.5"), Term::float(1.5));
        assert_eq!(ok("-0.25"), Term::float(-0.25));
        assert_eq!(ok("+0.5"), Term::float(0.5));
        assert_eq!(ok("1.0e10"), Term::float(1.0e10));
        assert_eq!(ok("2.5E-3"), Term::float(2.5e-3));
        assert_eq!(ok("2.5e+3"), Term::float(2500.0));
        assert_eq!(ok("1_000.000_5"), Term::float(1000.0005));
        assert_eq!(
            ok("{1.5,x}"),
            Term::tuple(vec![Term::float(1.5), atom("x")])
        );
        let negative_zero = ok("-0.0").as_float().expect("float");
        assert!(negative_zero == 0.0 && negative_zero.is_sign_negative());

        fails("1e10", TermErrorKind::BadFloat, 0);
        fails("[1E5]", TermErrorKind::BadFloat, 1);
        fails("1.0e", TermErrorKind::BadFloat, 0);
        fails("1.0e+", TermErrorKind::BadFloat, 0);
        fails("1.0e400", TermErrorKind::BadFloat, 0);
        fails("-1.0e400", TermErrorKind::BadFloat, 0);
        fails(".5", TermErrorKind::UnexpectedChar('.'), 0);
        fails("1.e5", TermErrorKind::TrailingInput, 2);
        fails("1.5.5", TermErrorKind::TrailingInput, 4);
        fails("12ab", TermErrorKind::UnexpectedChar('a'), 2);
        fails("1_", TermErrorKind::UnexpectedChar('_'), 1);
        fails("1__0", TermErrorKind::UnexpectedChar('_'), 1);
    }

    #[test]
    fn floats_print_in_erlang_syntax() {
        for (value, text) in [
            (1.0, "1.0"),
            (1.5, "1.5"),
            (-0.25, "-0.25"),
            (0.1, "0.1"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (123456789012345.0, "123456789012345.0"),
            (1e16, "1.0e16"),
            (1e20, "1.0e20"),
            (1.5e20, "1.5e20"),
            (-1e20, "-1.0e20"),
            (1e-5, "0.00001"),
            (1e-7, "1.0e-7"),
            (2.5e-7, "2.5e-7"),
            (f64::MAX, "1.7976931348623157e308"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
            (5e-324, "5.0e-324"),
        ] {
            let term = Term::float(value);
            assert_eq!(printed(&term), text);
            assert!(same(&ok(text), &term), "{text}");
        }
        assert_eq!(printed(&Term::float(f64::INFINITY)), "inf");
        assert_eq!(printed(&Term::float(f64::NEG_INFINITY)), "neg_inf");
        assert_eq!(printed(&Term::float(f64::NAN)), "nan");
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(ok(r#""hello""#), Term::str("hello"));
        assert_eq!(ok(r#""""#), Term::str(""));
        assert_eq!(ok(r#""héllo €😀""#), Term::str("héllo €😀"));
        assert_eq!(ok("\"two\nlines\""), Term::str("two\nlines"));
        assert_eq!(ok(r#""it's""#), Term::str("it's"));
        for (escape, expected) in [
            (r"\b", "\x08"),
            (r"\d", "\x7f"),
            (r"\e", "\x1b"),
            (r"\f", "\x0c"),
            (r"\n", "\n"),
            (r"\r", "\r"),
            (r"\s", " "),
            (r"\t", "\t"),
            (r"\v", "\x0b"),
            (r"\\", "\\"),
            (r"\'", "'"),
            (r#"\""#, "\""),
            (r"\0", "\0"),
            (r"\7", "\x07"),
            (r"\12", "\n"),
            (r"\101", "A"),
            (r"\777", "\u{1ff}"),
            (r"\1011", "A1"),
            (r"\18", "\x018"),
            (r"\x41", "A"),
            (r"\x4a", "J"),
            (r"\x411", "A1"),
            (r"\x{41}", "A"),
            (r"\x{0000041}", "A"),
            (r"\x{20AC}", "€"),
            (r"\x{1f600}", "😀"),
            (r"\x{10FFFF}", "\u{10ffff}"),
            (r"\^a", "\x01"),
            (r"\^z", "\x1a"),
            (r"\^A", "\x01"),
            (r"\^@", "\0"),
            (r"\^[", "\x1b"),
            (r"\^?", "\x7f"),
            (r"\q", "q"),
            (r"\é", "é"),
            ("\\\n", "\n"),
        ] {
            let text = format!("\"<{escape}>\"");
            assert_eq!(ok(&text), Term::Str(format!("<{expected}>")), "{text}");
            let quoted_atom = format!("'<{escape}>'");
            assert_eq!(ok(&quoted_atom), Term::Atom(format!("<{expected}>")));
        }
        fails(r#""\x{110000}""#, TermErrorKind::BadEscape, 1);
        fails(r#""\x{D800}""#, TermErrorKind::BadEscape, 1);
        fails(r#""\x{FFFFFFFFFFFF}""#, TermErrorKind::BadEscape, 1);
        fails(r#""\x{}""#, TermErrorKind::BadEscape, 1);
        fails(r#""\x{4g}""#, TermErrorKind::BadEscape, 1);
        fails(r#"[1,"ab\xZZ"]"#, TermErrorKind::BadEscape, 6);
        fails(r#""\x4""#, TermErrorKind::BadEscape, 1);
        fails(r#""\^1""#, TermErrorKind::BadEscape, 1);
        fails(r#""\x{41"#, TermErrorKind::UnexpectedEnd, 6);
        fails(r#""abc\"#, TermErrorKind::UnexpectedEnd, 5);
        fails(r#""abc"#, TermErrorKind::UnexpectedEnd, 4);
        fails("'abc", TermErrorKind::UnexpectedEnd, 4);
    }

    #[test]
    fn adjacent_strings_concatenate() {
        assert_eq!(ok(r#""ab" "cd""#), Term::str("abcd"));
        assert_eq!(ok(r#""ab""cd""#), Term::str("abcd"));
        assert_eq!(
            ok("{\"a\"\n \"b\" \"c\",1}"),
            Term::tuple(vec![Term::str("abc"), int(1)])
        );
        assert_eq!(ok(r#""ab" ."#), Term::str("ab"));
        fails(r#""ab" 'cd'"#, TermErrorKind::TrailingInput, 5);
    }

    #[test]
    fn strings_print_with_erlang_escapes() {
        for (text, expected) in [
            ("hi", r#""hi""#),
            ("", r#""""#),
            ("say \"hi\"", r#""say \"hi\"""#),
            ("it's", r#""it's""#),
            ("a\\b", r#""a\\b""#),
            ("l1\nl2\r\n\tx", r#""l1\nl2\r\n\tx""#),
            ("\0\x01\x1b\x1f\x7f", r#""\x00\x01\x1B\x1F\x7F""#),
            ("\x01a", r#""\x01a""#),
            ("héllo €😀", "\"héllo €😀\""),
        ] {
            let term = Term::str(text);
            assert_eq!(printed(&term), expected);
            assert_eq!(ok(expected), term);
        }
    }

    #[test]
    fn accessors() {
        let send = ok(r#"{send,"bob",[104,105]}"#);
        let (tag, rest) = send.tagged().expect("tagged");
        assert_eq!(tag, "send");
        assert_eq!(
            rest,
            &[Term::str("bob"), Term::list(vec![int(104), int(105)])][..]
        );
        assert_eq!(rest[0].as_text().as_deref(), Some("bob"));
        assert_eq!(rest[1].as_text().as_deref(), Some("hi"));
        assert_eq!(send.as_tuple().map(<[Term]>::len), Some(3));
        assert_eq!(send.as_list(), None);
        assert_eq!(ok("[]").as_list(), Some(&[][..]));
        assert_eq!(ok("[]").as_text().as_deref(), Some(""));
        assert_eq!(ok("[8364,128512]").as_text().as_deref(), Some("€😀"));
        assert_eq!(ok("[55296]").as_text(), None);
        assert_eq!(ok("[-1]").as_text(), None);
        assert_eq!(ok("[4294967393]").as_text(), None);
        assert_eq!(ok("[104,x]").as_text(), None);
        assert_eq!(ok("hi").as_text(), None);
        assert_eq!(ok("5").as_int(), Some(5));
        assert_eq!(ok("five").as_int(), None);
        assert_eq!(ok("five").as_atom(), Some("five"));
        assert_eq!(ok("\"five\"").as_atom(), None);
        assert_eq!(ok("disconnect").tagged(), None);
        assert_eq!(ok("{}").tagged(), None);
        assert_eq!(ok("{1,2}").tagged(), None);
        assert_eq!(ok("{exit}").tagged(), Some(("exit", &[][..])));
        assert_eq!("{a}".parse::<Term>(), Ok(Term::tuple(vec![atom("a")])));
    }

    #[test]
    fn structural_errors_and_offsets() {
        fails("", TermErrorKind::UnexpectedEnd, 0);
        fails("  \n", TermErrorKind::UnexpectedEnd, 3);
        fails(".", TermErrorKind::UnexpectedChar('.'), 0);
        fails("{a,}", TermErrorKind::UnexpectedChar('}'), 3);
        fails("{,a}", TermErrorKind::UnexpectedChar(','), 1);
        fails("{a b}", TermErrorKind::UnexpectedChar('b'), 3);
        fails("{a,b]", TermErrorKind::UnexpectedChar(']'), 4);
        fails("[a,b}", TermErrorKind::UnexpectedChar('}'), 4);
        fails("{a,{b,c}", TermErrorKind::UnexpectedEnd, 8);
        fails("[1,2", TermErrorKind::UnexpectedEnd, 4);
        fails("}", TermErrorKind::UnexpectedChar('}'), 0);
        fails("Var", TermErrorKind::UnexpectedChar('V'), 0);
        fails("{_}", TermErrorKind::UnexpectedChar('_'), 1);
        fails("{a,%x}", TermErrorKind::UnexpectedChar('%'), 3);
        fails("{a,€}", TermErrorKind::UnexpectedChar('€'), 3);
        fails("-", TermErrorKind::UnexpectedEnd, 1);
        fails("-a", TermErrorKind::UnexpectedChar('a'), 1);
        fails(
            "[a|b]",
            TermErrorKind::Unsupported("improper list [H|T]"),
            2,
        );
        fails("{a|b}", TermErrorKind::UnexpectedChar('|'), 2);
    }

    #[test]
    fn trailing_input() {
        fails(
            "{remote_chan,{127,0,0,1},40123}}",
            TermErrorKind::TrailingInput,
            31,
        );
        fails("a b", TermErrorKind::TrailingInput, 2);
        fails("1 2", TermErrorKind::TrailingInput, 2);
        fails("a..", TermErrorKind::TrailingInput, 2);
        fails("a. b", TermErrorKind::TrailingInput, 3);
        fails("{a}{b}", TermErrorKind::TrailingInput, 3);
        fails("ok\0", TermErrorKind::TrailingInput, 2);
    }

    #[test]
    fn unsupported_erlang_terms() {
        for (text, what, offset) in [
            ("<<1,2>>", "binary <<...>>", 0),
            ("{<<\"a\">>}", "binary <<...>>", 1),
            ("<0.42.0>", "pid <...>", 0),
            ("#{a=>1}", "map #{...}", 0),
            ("[#Ref<0.1.2.3>]", "reference, port, fun or record #...", 1),
            (
                "#Fun<erl_eval.6.1>",
                "reference, port, fun or record #...",
                0,
            ),
            ("#Port<0.7>", "reference, port, fun or record #...", 0),
        ] {
            let e = err(text);
            assert_eq!(e.kind, TermErrorKind::Unsupported(what), "{text}");
            assert_eq!(e.offset, offset, "{text}");
            assert_eq!(e.reason_atom(), "unsupported");
        }
    }

    #[test]
    fn bytes_must_be_utf8() {
        assert_eq!(
            parse_bytes(b"{a,\"\xc3\xa9\"}\n"),
            Ok(Term::tuple(vec![atom("a"), Term::str("é")]))
        );
        let e = parse_bytes(b"[1,\xff]").expect_err("invalid UTF-8");
        assert_eq!(e, TermError::new(TermErrorKind::InvalidUtf8, 3));
        assert_eq!(e.reason_atom(), "invalid_utf8");
        assert_eq!(e.to_string(), "invalid UTF-8 at byte 3");
    }

    #[test]
    fn errors_display_and_reason_atoms() {
        let e = err("{remote_chan,{127,0,0,1}}}");
        assert_eq!(e.to_string(), "trailing input after the term at byte 25");
        let e = err("{a,b,}");
        assert_eq!(e.to_string(), "unexpected '}' at byte 5");
        assert_eq!(e.reason_atom(), "bad_term");
        assert_eq!(err("[a").to_string(), "unexpected end of input at byte 2");
        assert_eq!(err("99999999999999999999").reason_atom(), "bad_term");
        let deep = err(&"[".repeat(100));
        assert_eq!(deep.to_string(), "nesting deeper than 64 at byte 64");
        assert_eq!(deep.reason_atom(), "too_deep");
        let limits = Limits {
            max_len: 4,
            ..Limits::default()
        };
        let long = parse_with("12345", &limits).expect_err("too long");
        assert_eq!(long.to_string(), "input longer than 4 bytes");
        assert_eq!(long.reason_atom(), "too_long");
        let boxed: Box<dyn std::error::Error> = Box::new(long);
        assert!(boxed.source().is_none());
    }

    #[test]
    fn length_limit() {
        let limits = Limits {
            max_len: 8,
            ..Limits::default()
        };
        assert_eq!(parse_with("[1,2,34]", &limits), Ok(ok("[1,2,34]")));
        let too_long = TermError::new(TermErrorKind::TooLong { limit: 8 }, 8);
        assert_eq!(parse_with("[1,2,345]", &limits), Err(too_long));
        // Refused on length alone: the bytes are not even valid UTF-8.
        assert_eq!(parse_bytes_with(&[0xff; 9], &limits), Err(too_long));
        assert_eq!(Limits::default().max_len, 1024 * 1024);
        let huge = " ".repeat(Limits::default().max_len + 1);
        assert_eq!(err(&huge).kind, TermErrorKind::TooLong { limit: 1 << 20 });
    }

    #[test]
    fn depth_limit() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(Limits::default().max_depth, 64);
        assert!(parse(&nested(64)).is_ok());
        fails(&nested(65), TermErrorKind::TooDeep { limit: 64 }, 64);
        let mixed = format!("{}x{}", "{[".repeat(32), "]}".repeat(32));
        assert!(parse(&mixed).is_ok());
        let shallow = Limits {
            max_depth: 1,
            ..Limits::default()
        };
        assert_eq!(parse_with("5", &shallow), Ok(int(5)));
        assert!(parse_with("[1,{}]", &shallow).is_err());
        assert_eq!(
            parse_with(
                "{{}}",
                &Limits {
                    max_depth: 0,
                    ..shallow
                }
            ),
            Err(TermError::new(TermErrorKind::TooDeep { limit: 0 }, 0))
        );
    }

    #[test]
    fn million_deep_input_fails_fast_on_a_small_stack() {
        on_small_stack(|| {
            for open in ["[", "{"] {
                let text = open.repeat(1_000_000);
                let started = std::time::Instant::now();
                assert_eq!(
                    parse(&text),
                    Err(TermError::new(TermErrorKind::TooDeep { limit: 64 }, 64))
                );
                assert_eq!(
                    parse_bytes(text.as_bytes()).map_err(|e| e.kind),
                    Err(TermErrorKind::TooDeep { limit: 64 })
                );
                assert!(started.elapsed() < std::time::Duration::from_millis(100));
            }
            // Without a depth limit the parser's own stack is the heap: a million open
            // brackets end in UnexpectedEnd, not in a stack overflow.
            let unlimited = Limits {
                max_depth: usize::MAX,
                ..Limits::default()
            };
            let text = "[{".repeat(500_000);
            assert_eq!(
                parse_with(&text, &unlimited),
                Err(TermError::new(TermErrorKind::UnexpectedEnd, 1_000_000))
            );
        });
    }

    #[test]
    fn deep_terms_print_on_a_small_stack() {
        on_small_stack(|| {
            let depth = 100_000;
            let mut term = atom("x");
            for level in 0..depth {
                term = if level % 2 == 0 {
                    Term::list(vec![term])
                } else {
                    Term::tuple(vec![int(1), term])
                };
            }
            let text = term.to_string();
            let mut bytes = Vec::new();
            term.write_to(&mut bytes);
            // Before any assertion: unwinding would drop the term recursively.
            dismantle(term);
            assert_eq!(bytes, text.as_bytes());
            assert_eq!(text.len(), depth * 2 + depth / 2 * 2 + 1);
            assert!(text.starts_with("{1,[{1,[") && text.ends_with("]}]}"));
            let x = depth * 2;
            assert_eq!(&text[x - 12..x + 7], "{1,[{1,[{1,[x]}]}]}");

            let parsed = ok(&format!("{}7{}", "[".repeat(64), "]".repeat(64)));
            assert_eq!(printed(&parsed).len(), 129);
        });
    }

    /// xorshift64*: deterministic, so a failure reproduces from the printed seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }

        fn char(&mut self) -> char {
            const AWKWARD: &[char] = &[
                'a',
                'z',
                'A',
                'Z',
                '0',
                '9',
                '_',
                '@',
                ' ',
                '"',
                '\'',
                '\\',
                '\n',
                '\r',
                '\t',
                '\0',
                '\x01',
                '\x1b',
                '\x1f',
                '\x7f',
                '\u{80}',
                '\u{9f}',
                'é',
                'ß',
                'ÿ',
                '€',
                '😀',
                '\u{2028}',
                '\u{fffe}',
                '\u{10ffff}',
                '{',
                '}',
                '[',
                ']',
                ',',
                '.',
                '|',
                '$',
                '#',
                '%',
                '<',
                '>',
                '^',
                'x',
            ];
            match self.below(4) {
                0 => char::from_u32(self.below(0x11_0000) as u32).unwrap_or('?'),
                _ => self.pick(AWKWARD),
            }
        }

        fn text(&mut self, max_chars: usize) -> String {
            let len = self.below(max_chars + 1);
            (0..len).map(|_| self.char()).collect()
        }

        fn atom(&mut self) -> String {
            match self.below(4) {
                0 => {
                    const FIRST: &[u8] = b"abcxyz";
                    const REST: &[u8] = b"azAZ09_@";
                    let mut name = String::from(char::from(self.pick(FIRST)));
                    for _ in 0..self.below(12) {
                        name.push(char::from(self.pick(REST)));
                    }
                    name
                }
                1 => self
                    .pick(&[
                        "end", "case", "maybe", "else", "fun", "div", "ok", "true", "inf",
                    ])
                    .to_owned(),
                _ => self.text(20),
            }
        }

        fn int(&mut self) -> i64 {
            match self.below(4) {
                0 => self.pick(&[i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX]),
                1 => self.below(1000) as i64 - 500,
                _ => self.next() as i64,
            }
        }

        fn float(&mut self) -> f64 {
            let special = [
                0.0,
                -0.0,
                1.0,
                -1.5,
                0.1,
                1e16,
                1e-5,
                1e16 - 2.0,
                0.999_999 * 1e-5,
                f64::MAX,
                f64::MIN,
                f64::MIN_POSITIVE,
                f64::EPSILON,
                5e-324,
                -5e-324,
            ];
            match self.below(3) {
                0 => self.pick(&special),
                1 => (self.next() as i64 as f64) / 1024.0,
                _ => loop {
                    let value = f64::from_bits(self.next());
                    if value.is_finite() {
                        break value;
                    }
                },
            }
        }

        fn term(&mut self, depth: usize) -> Term {
            let kinds = if depth >= 6 { 4 } else { 6 };
            match self.below(kinds) {
                0 => Term::Atom(self.atom()),
                1 => Term::Int(self.int()),
                2 => Term::Float(self.float()),
                3 => Term::Str(self.text(12)),
                kind => {
                    let items = (0..self.below(5)).map(|_| self.term(depth + 1)).collect();
                    if kind == 4 {
                        Term::Tuple(items)
                    } else {
                        Term::List(items)
                    }
                }
            }
        }
    }

    #[test]
    fn printed_terms_parse_back_identical() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut bytes = Vec::new();
        for case in 0..4000 {
            let term = rng.term(0);
            let text = printed(&term);
            let back = match parse(&text) {
                Ok(back) => back,
                Err(e) => panic!("case {case}: {text:?} failed: {e}"),
            };
            assert!(
                same(&term, &back),
                "case {case}: {term:?} -> {text:?} -> {back:?}"
            );

            bytes.clear();
            term.write_to(&mut bytes);
            bytes.extend_from_slice(b".\r\n");
            let back = parse_bytes(&bytes).expect("written bytes parse");
            assert!(same(&term, &back), "case {case}: via write_to");
        }
    }
}
