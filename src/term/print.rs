//! The printer: [`Term`] to text every Erlang reader accepts.

use super::parse::is_bare_atom;
use super::*;

/// Lets `write_to` share the `fmt::Write` printer without a `String` in between.
pub(super) struct ByteSink<'a>(pub(super) &'a mut Vec<u8>);

impl fmt::Write for ByteSink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

pub(super) fn write_term<W: fmt::Write>(term: &Term, out: &mut W) -> fmt::Result {
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
