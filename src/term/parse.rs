//! The parser: Erlang term text to [`Term`], with an explicit stack.

use super::*;

/// Parses one line of term text within `limits` (its length is already checked).
pub(super) fn parse_line(text: &str, limits: &Limits) -> Result<Term, TermError> {
    Parser {
        src: text,
        bytes: text.as_bytes(),
        pos: 0,
        max_depth: limits.max_depth,
        nodes_left: limits.max_nodes,
        max_nodes: limits.max_nodes,
    }
    .parse_line()
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

    fn build(self, mut items: Vec<Term>) -> Term {
        // Growth by doubling can leave half a vector spare; a parsed term keeps only what
        // it holds, so its size is a fixed multiple of its text (see `Limits::max_nodes`).
        items.shrink_to_fit();
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
    /// Terms (scalars and containers) this parse may still build; see [`Limits::max_nodes`].
    nodes_left: usize,
    max_nodes: usize,
}

impl Parser<'_> {
    fn parse_line(mut self) -> Result<Term, TermError> {
        // The open tuples and lists live here, on the heap, so nesting depth never turns
        // into call depth.
        let mut stack: Vec<Open> = Vec::new();
        'value: loop {
            self.skip_ws();
            // Counted before the term is built, so a refused parse never holds more than
            // the budget's worth of terms.
            if self.nodes_left == 0 {
                let limit = self.max_nodes;
                return Err(self.error(TermErrorKind::TooBig { limit }));
            }
            self.nodes_left -= 1;
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
pub(super) fn is_bare_atom(name: &str) -> bool {
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
