"""Unit tests for term.py: the Erlang term text the chat server (src/term.rs) writes."""

import random
import unittest

import term
from term import Atom


class ParseTest(unittest.TestCase):
    def test_what_the_chat_server_writes(self):
        self.assertEqual(term.parse('{join,"bob"}'), (Atom("join"), "bob"))
        self.assertEqual(
            term.parse('{message,"bob","hi \\"you\\"\\n\\x1B"}'),
            (Atom("message"), "bob", 'hi "you"\n\x1b'),
        )
        self.assertEqual(term.parse("exit"), Atom("exit"))
        self.assertEqual(term.parse("{error,name_taken}"), (Atom("error"), Atom("name_taken")))
        self.assertEqual(term.parse('{servers,["127.0.0.1:1"]}'), (Atom("servers"), ["127.0.0.1:1"]))

    def test_what_erlang_writes(self):
        self.assertEqual(term.parse("{send,[98,111,98],[104,105]}."), (Atom("send"), [98, 111, 98], [104, 105]))
        self.assertEqual(term.as_text([104, 105]), "hi")
        self.assertEqual(term.as_text([]), "")
        self.assertEqual(term.as_text(Atom("bob")), "bob")
        self.assertIsNone(term.as_text([104, Atom("x")]))
        self.assertIsNone(term.as_text([-1]))
        self.assertEqual(term.parse("'hello world'"), Atom("hello world"))
        self.assertEqual(term.parse(" { a , -5 , 2.5e3 , 16#ff , $a , \"x\" \"y\" } . \n"), (Atom("a"), -5, 2500.0, 255, 97, "xy"))
        self.assertEqual(term.parse('"\\x{1F600}\\101\\^a\\s"'), "\U0001F600A\x01 ")
        self.assertEqual(term.parse("{}"), ())
        self.assertEqual(term.parse("[]"), [])

    def test_errors_have_offsets(self):
        for text, offset in [("{a,}", 3), ("{a b}", 3), ("[1,2", 4), ("a b", 2), ("", 0), ("Var", 0), ("[a|b]", 2)]:
            with self.assertRaises(term.TermError) as caught:
                term.parse(text)
            self.assertEqual(caught.exception.offset, offset, text)
        with self.assertRaises(term.TermError):
            term.parse(b"[1,\xff]")

    def test_depth_is_limited_without_recursion(self):
        with self.assertRaises(term.TermError) as caught:
            term.parse("[" * 1_000_000)
        self.assertIn("nesting deeper than 64", str(caught.exception))
        deep = "[" * 64 + "]" * 64
        self.assertEqual(term.format(term.parse(deep)), deep)
        nested: list = []
        for _ in range(100_000):
            nested = [nested]
        self.assertEqual(len(term.format(nested)), 200_002)


class FormatTest(unittest.TestCase):
    def test_canonical_text(self):
        self.assertEqual(term.format((Atom("message"), "bob", "hi\n")), '{message,"bob","hi\\n"}')
        self.assertEqual(term.format([Atom("ok"), Atom("Ok"), Atom("end"), Atom("a b"), Atom("it's")]), "[ok,'Ok','end','a b','it\\'s']")
        self.assertEqual(term.format([1.0, 0.1, 1e16, 1.5e-7, -0.0]), "[1.0,0.1,1.0e16,1.5e-7,-0.0]")
        self.assertEqual(term.format(("\x00\x7f\\",)), '{"\\x00\\x7F\\\\"}')
        with self.assertRaises(TypeError):
            term.format({"a": 1})

    def test_printed_terms_parse_back(self):
        rng = random.Random(7)
        chars = "az AZ09_@\"'\\\n\r\t\x00\x1b\x7fé€😀{}[],.|$#%"

        def text():
            return "".join(rng.choice(chars) for _ in range(rng.randrange(8)))

        def value(depth):
            kind = rng.randrange(4 if depth > 4 else 6)
            if kind == 0:
                return Atom(text())
            if kind == 1:
                return rng.randrange(-(2**63), 2**63)
            if kind == 2:
                return rng.choice([0.0, -1.5, 1e300, 5e-324, rng.random() * 1e6])
            if kind == 3:
                return text()
            items = [value(depth + 1) for _ in range(rng.randrange(4))]
            return tuple(items) if kind == 4 else items

        for _ in range(2000):
            v = value(0)
            self.assertEqual(term.parse(term.format(v)), v)


if __name__ == "__main__":
    unittest.main()
