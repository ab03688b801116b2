"""Erlang term text, parsed and printed (standard library only).

The same text as ``src/term.rs`` reads and writes, so a Python program can
exchange one-term-per-line messages with the Rust servers and with Erlang
programs (which read with ``erl_scan``/``erl_parse`` and write with ``~w``/``~p``).

Python values for Erlang terms::

    atom        Atom("ok")          (a str subclass; bare or 'quoted' on the wire)
    integer     int
    float       float
    "string"    str
    {A,B}       tuple
    [A,B]       list                ([104,105] is the string "hi" to Erlang: see as_text)

``parse(text)`` reads exactly one term, optionally followed by ``.``, with
whitespace around.  ``format(value)`` writes the canonical text: no spaces,
atoms quoted only when they must be, strings with backslash escapes, floats
always with a ``.``.  Nesting is handled with an explicit stack, not
recursion, and ``parse`` refuses input deeper than ``max_depth``.
"""

from __future__ import annotations

import math
import re
from typing import Union

MAX_ATOM_CHARS = 255
DEFAULT_MAX_DEPTH = 64

_RESERVED = frozenset(
    "after and andalso band begin bnot bor bsl bsr bxor case catch cond div else end fun "
    "if let maybe not of or orelse receive rem try when xor".split()
)
_BARE_ATOM = re.compile(r"[a-z][A-Za-z0-9_@]*\Z")
_BARE_ATOM_PREFIX = re.compile(r"[a-z][A-Za-z0-9_@]*")
# digits, then a based part (16#ff) or a fraction with an optional exponent (1.5e-3).
_NUMBER = re.compile(
    r"(\d(?:_?\d)*)(#[0-9A-Za-z](?:_?[0-9A-Za-z])*)?(\.\d(?:_?\d)*(?:[eE][+-]?\d(?:_?\d)*)?)?"
)
_SIMPLE_ESCAPES = {
    "b": "\b",
    "d": "\x7f",
    "e": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "s": " ",
    "t": "\t",
    "v": "\v",
}
_WS = " \t\r\n"


class Atom(str):
    """An Erlang atom (compares equal to the str of its name)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str(self)!r})"


Term = Union[Atom, int, float, str, tuple, list]


class TermError(ValueError):
    """The text is not one Erlang term; ``offset`` is where it went wrong."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset {offset}")
        self.offset = offset


class _Parser:
    def __init__(self, text: str, max_depth: int) -> None:
        self.text = text
        self.pos = 0
        self.max_depth = max_depth

    def error(self, message: str) -> TermError:
        return TermError(message, self.pos)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def parse(self) -> Term:
        # (closing bracket, items) of every tuple or list still open.
        stack: list[tuple[str, list]] = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c in ("{", "["):
                if len(stack) >= self.max_depth:
                    raise self.error(f"nesting deeper than {self.max_depth}")
                close = "}" if c == "{" else "]"
                self.pos += 1
                self.skip_ws()
                if self.peek() != close:
                    stack.append((close, []))
                    continue
                self.pos += 1
                term: Term = () if close == "}" else []
            else:
                term = self.scalar()
            while True:
                if not stack:
                    return self.finish(term)
                close, items = stack[-1]
                items.append(term)
                self.skip_ws()
                c = self.peek()
                if c == ",":
                    self.pos += 1
                    break
                if c == close:
                    self.pos += 1
                    stack.pop()
                    term = tuple(items) if close == "}" else items
                    continue
                if c == "|" and close == "]":
                    raise self.error("improper lists are not supported")
                raise self.error(f"unexpected {c!r}" if c else "unexpected end of input")

    def finish(self, term: Term) -> Term:
        self.skip_ws()
        if self.peek() == ".":
            self.pos += 1
            self.skip_ws()
        if self.pos < len(self.text):
            raise self.error("trailing input after the term")
        return term

    def scalar(self) -> Term:
        c = self.peek()
        if not c:
            raise self.error("unexpected end of input")
        if "a" <= c <= "z":
            m = _BARE_ATOM_PREFIX.match(self.text, self.pos)
            assert m is not None
            self.pos = m.end()
            return Atom(m.group())
        if c == "'":
            start = self.pos
            name = self.quoted("'")
            if len(name) > MAX_ATOM_CHARS:
                raise TermError("atom too long", start)
            return Atom(name)
        if c == '"':
            parts = [self.quoted('"')]
            while True:
                save = self.pos
                self.skip_ws()
                if self.peek() != '"':
                    self.pos = save
                    return "".join(parts)
                parts.append(self.quoted('"'))
        if c in "+-" or c.isdigit() or c == "$":
            return self.number()
        raise self.error(f"unexpected {c!r}")

    def quoted(self, quote: str) -> str:
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise self.error("unterminated quoted text")
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            out.append(self.escape() if c == "\\" else c)

    def escape(self) -> str:
        if self.pos >= len(self.text):
            raise self.error("unterminated escape")
        c = self.text[self.pos]
        self.pos += 1
        if c in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[c]
        if c in "01234567":
            digits = c
            while len(digits) < 3 and self.peek() and self.peek() in "01234567":
                digits += self.peek()
                self.pos += 1
            return self.char(int(digits, 8))
        if c == "x":
            if self.peek() == "{":
                end = self.text.find("}", self.pos)
                digits = self.text[self.pos + 1 : end] if end > 0 else ""
                if not digits or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error("bad \\x{...} escape")
                self.pos = end + 1
                return self.char(int(digits, 16))
            digits = self.text[self.pos : self.pos + 2]
            if len(digits) != 2 or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error("bad \\xHH escape")
            self.pos += 2
            return chr(int(digits, 16))
        if c == "^":
            d = self.peek()
            self.pos += 1
            if d == "?":
                return "\x7f"
            if d and ("a" <= d.lower() <= "z" or "@" <= d <= "_"):
                return chr(ord(d) & 0x1F)
            raise self.error("bad \\^ escape")
        return c

    def char(self, code: int) -> str:
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise self.error("not a Unicode scalar value")
        return chr(code)

    def number(self) -> Union[int, float]:
        negative = False
        if self.peek() in "+-":
            negative = self.peek() == "-"
            self.pos += 1
            self.skip_ws()
        if self.peek() == "$":
            self.pos += 1
            if self.pos >= len(self.text):
                raise self.error("unexpected end of input")
            c = self.text[self.pos]
            self.pos += 1
            value = ord(self.escape() if c == "\\" else c)
            return -value if negative else value
        m = _NUMBER.match(self.text, self.pos)
        if not m:
            raise self.error("unexpected " + (repr(self.peek()) if self.peek() else "end of input"))
        self.pos = m.end()
        digits, based, fraction = m.group(1), m.group(2), m.group(3)
        if based:
            base = int(digits.replace("_", ""))
            if not 2 <= base <= 36:
                raise self.error("integer base outside 2..36")
            try:
                value = int(based[1:].replace("_", ""), base)
            except ValueError:
                raise self.error("digit too large for its base") from None
        elif fraction:
            number = float(digits.replace("_", "") + fraction.replace("_", ""))
            if math.isinf(number):
                raise self.error("float out of range")
            return -number if negative else number
        else:
            value = int(digits.replace("_", ""))
        return -value if negative else value


def parse(text: Union[str, bytes], max_depth: int = DEFAULT_MAX_DEPTH) -> Term:
    """Parse exactly one term (bytes are decoded as UTF-8); raise TermError if not."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TermError("invalid UTF-8", e.start) from None
    return _Parser(text, max_depth).parse()


def _quote(text: str, quote: str) -> str:
    out = [quote]
    for c in text:
        if c == "\\" or c == quote:
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c < " " or c == "\x7f":
            out.append("\\x%02X" % ord(c))
        else:
            out.append(c)
    out.append(quote)
    return "".join(out)


def _format_atom(name: str) -> str:
    if _BARE_ATOM.match(name) and name not in _RESERVED:
        return name
    return _quote(name, "'")


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "neg_inf"
    text = repr(value)
    if "e" in text:
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{int(exponent)}"
    return text if "." in text else text + ".0"


def format(value: Term) -> str:  # noqa: A001 - the name the other modules use
    """The canonical text of ``value``; raise TypeError for what is not a term."""
    out: list[str] = []
    # Work items: a value to write, or a literal string (separators, closers).
    work: list = [value]
    while work:
        item = work.pop()
        if isinstance(item, _Lit):
            out.append(item.text)
        elif isinstance(item, Atom):
            out.append(_format_atom(str(item)))
        elif isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, int):
            out.append(str(item))
        elif isinstance(item, float):
            out.append(_format_float(item))
        elif isinstance(item, str):
            out.append(_quote(item, '"'))
        elif isinstance(item, (tuple, list)):
            opener, closer = ("{", "}") if isinstance(item, tuple) else ("[", "]")
            out.append(opener)
            work.append(_Lit(closer))
            for i in range(len(item) - 1, -1, -1):
                work.append(item[i])
                if i:
                    work.append(_Lit(","))
        else:
            raise TypeError(f"not an Erlang term: {item!r}")
    return "".join(out)


class _Lit:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _is_code(c: object) -> bool:
    return isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 0x10FFFF and not 0xD800 <= c <= 0xDFFF


def as_text(value: Term) -> Union[str, None]:
    """The text of an Erlang string: a str, an atom, or a list of character codes."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list) and all(_is_code(c) for c in value):
        return "".join(chr(c) for c in value)
    return None


def tagged(value: Term) -> Union[tuple, None]:
    """``(tag, rest)`` for a tuple whose first element is an atom, else None."""
    if isinstance(value, tuple) and value and isinstance(value[0], Atom):
        return str(value[0]), value[1:]
    return None
