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
    /// Bytes one term takes where it is stored (in its parent's vector, or on its own).
    pub const NODE_BYTES: usize = std::mem::size_of::<Term>();

    /// What this term holds in memory, in bytes: every term's own [`Term::NODE_BYTES`] plus
    /// the capacity of its strings and vectors beyond that. For byte budgets (a channel's
    /// queue); computed without recursion, so any depth is safe.
    ///
    /// ```
    /// use switchboard::term::{parse, Term};
    /// let t = parse("[0,0,0,0]").unwrap();
    /// assert!(t.heap_bytes() >= 5 * Term::NODE_BYTES);
    /// ```
    pub fn heap_bytes(&self) -> usize {
        let mut total = 0;
        let mut todo = vec![self];
        while let Some(t) = todo.pop() {
            total += Self::NODE_BYTES;
            match t {
                Term::Atom(s) | Term::Str(s) => total += s.capacity(),
                Term::Int(_) | Term::Float(_) => {}
                Term::Tuple(items) | Term::List(items) => {
                    // The items' own slots are counted as they are visited; the vector's
                    // spare capacity is not, so it is added here.
                    total += (items.capacity() - items.len()) * Self::NODE_BYTES;
                    todo.extend(items);
                }
            }
        }
        total
    }

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
    /// Most terms (scalars, tuples and lists, each counting one) a parse builds. Each costs
    /// [`Term::NODE_BYTES`] (32) however short its text: `[0,0,…]` spends two bytes of text
    /// on each 32-byte term, so a parsed term holds up to about 16.5 times its text
    /// (measured: `[0,0,…]` 16.0×, `[a,a,…]` 16.5×; see [`Term::heap_bytes`]). This bound
    /// caps that absolutely: with the default (`max_len / 8`) a parsed term holds at most
    /// `4 × max_len` bytes of terms plus the text of its atoms and strings (while it is
    /// being parsed, growing vectors may briefly hold up to twice that).
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_depth: 64,
            max_len: 1 << 20,
            max_nodes: (1 << 20) / 8,
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
    /// More terms in the input than [`Limits::max_nodes`].
    TooBig {
        /// The `max_nodes` in force.
        limit: usize,
    },
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
            TermErrorKind::TooBig { .. } => "too_big",
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
            TermErrorKind::TooBig { limit } => write!(f, "more than {limit} terms")?,
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
    parse::parse_line(text, limits)
}

fn check_len(len: usize, limits: &Limits) -> Result<(), TermError> {
    if len > limits.max_len {
        let limit = limits.max_len;
        return Err(TermError::new(TermErrorKind::TooLong { limit }, limit));
    }
    Ok(())
}

mod parse;
mod print;

use print::{write_term, ByteSink};
#[cfg(test)]
mod tests;
