"""Unit tests for message.py (stdlib unittest, socketpair, no server needed).

    python3 -m unittest discover -s interop -p 'test_*.py'
"""

from __future__ import annotations

import socket
import struct
import threading
import unittest

from message import (
    FRAMINGS,
    FrameReader,
    FrameTooLong,
    FramingError,
    IncompleteMessage,
    encode,
    parse_ascii10_header,
    recv_exactly,
    recv_line_bytewise,
    recv_message,
    send_message,
    send_message_two_calls,
)

PAYLOADS = [b"", b"x", b"hello, {world}", "héllo ✓".encode(), b"\xff\xfe", b"a" * 200_000]


class SocketTestCase(unittest.TestCase):
    def pair(self) -> tuple[socket.socket, socket.socket]:
        """A connected socket pair, closed when the test ends."""
        a, b = socket.socketpair()
        for s in (a, b):
            s.settimeout(5)
            self.addCleanup(s.close)
        return a, b


def feed(sock: socket.socket, data: bytes, close: bool = True) -> threading.Thread:
    """Write data from a helper thread (avoids socketpair buffer deadlocks)."""

    def run() -> None:
        sock.sendall(data)
        if close:
            sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class EncodeTests(unittest.TestCase):
    def test_headers(self) -> None:
        self.assertEqual(encode("line", b"abc"), b"abc\n")
        self.assertEqual(encode("ascii10", b"abc"), b"         3abc")
        self.assertEqual(encode("u16", b"abc"), b"\x00\x03abc")
        self.assertEqual(encode("u32", b"abc"), b"\x00\x00\x00\x03abc")

    def test_refusals(self) -> None:
        with self.assertRaises(ValueError):
            encode("line", b"a\nb")
        with self.assertRaises(ValueError):
            encode("u16", b"x" * 65536)
        self.assertEqual(len(encode("u16", b"x" * 65535)), 65537)
        with self.assertRaises(ValueError):
            encode("nope", b"x")

    def test_ascii10_header_parsing(self) -> None:
        self.assertEqual(parse_ascii10_header(b"         5"), 5)
        self.assertEqual(parse_ascii10_header(b"0000000005"), 5)
        self.assertEqual(parse_ascii10_header(b"   0000012"), 12)
        for bad in (b"        +5", b"        -5", b"5         ", b"\t        5", b"          ", b"      0x10", b"       1 2"):
            with self.assertRaises(FramingError, msg=bad):
                parse_ascii10_header(bad)


class ReceiveTests(SocketTestCase):
    def roundtrip(self, framing: str, use_reader: bool) -> None:
        payloads = [p for p in PAYLOADS if framing != "line" or b"\n" not in p]
        if framing == "u16":
            payloads = [p for p in payloads if len(p) <= 65535]
        if framing != "line":
            payloads += [b"a\nb", b"\x00", b"\r\n"]
        a, b = self.pair()
        t = feed(a, b"".join(encode(framing, p) for p in payloads))
        if use_reader:
            got = list(FrameReader(b, framing))
        else:
            got = []
            while (m := recv_message(b, framing)) is not None:
                got.append(m)
        t.join()
        self.assertEqual(got, payloads)
        b.close()

    def test_roundtrips(self) -> None:
        for framing in FRAMINGS:
            for use_reader in (False, True):
                with self.subTest(framing=framing, reader=use_reader):
                    self.roundtrip(framing, use_reader)

    def test_crlf_dropped(self) -> None:
        a, b = self.pair()
        feed(a, b"one\r\ntwo\nthree\r\r\nfour\rx\n")
        self.assertEqual(list(FrameReader(b, "line")), [b"one", b"two", b"three\r", b"four\rx"])
        a, b = self.pair()
        feed(a, b"one\r\n")
        self.assertEqual(recv_line_bytewise(b), b"one")
        self.assertIsNone(recv_line_bytewise(b))

    def test_incomplete(self) -> None:
        for framing in FRAMINGS:
            for cut in (1, 3):
                data = encode(framing, b"hello")[:-cut] if framing != "line" else b"hel"
                for use_reader in (False, True):
                    with self.subTest(framing=framing, cut=cut, reader=use_reader):
                        a, b = self.pair()
                        feed(a, encode(framing, b"ok") + data)
                        if use_reader:
                            r = FrameReader(b, framing)
                            self.assertEqual(r.read_frame(), b"ok")
                            with self.assertRaises(IncompleteMessage):
                                r.read_frame()
                        else:
                            self.assertEqual(recv_message(b, framing), b"ok")
                            with self.assertRaises(IOError):
                                recv_message(b, framing)

    def test_incomplete_is_ioerror_and_eoferror(self) -> None:
        self.assertTrue(issubclass(IncompleteMessage, IOError))
        self.assertTrue(issubclass(IncompleteMessage, EOFError))
        a, b = self.pair()
        feed(a, b"ab")
        with self.assertRaises(IncompleteMessage):
            recv_exactly(b, 3)

    def test_bad_ascii10_header(self) -> None:
        a, b = self.pair()
        feed(a, b"        +5hello")
        with self.assertRaises(FramingError):
            FrameReader(b, "ascii10").read_frame()

    def test_many_frames_in_one_recv(self) -> None:
        a, b = self.pair()
        a.sendall(b"".join(encode("u16", b"m%d" % i) for i in range(100)))
        r = FrameReader(b, "u16")
        self.assertEqual(r.read_frame(), b"m0")
        self.assertTrue(r.has_frame())
        self.assertEqual([r.read_frame() for _ in range(99)], [b"m%d" % i for i in range(1, 100)])
        self.assertFalse(r.has_frame())
        a.close()
        self.assertIsNone(r.read_frame())

    def test_too_long_resyncs(self) -> None:
        for framing in FRAMINGS:
            with self.subTest(framing=framing):
                a, b = self.pair()
                feed(a, encode(framing, b"short") + encode(framing, b"y" * 300_000) + encode(framing, b"after") if framing != "u16"
                     else encode(framing, b"short") + encode(framing, b"y" * 60_000) + encode(framing, b"after"))
                r = FrameReader(b, framing, max_frame=1000)
                self.assertEqual(r.read_frame(), b"short")
                with self.assertRaises(FrameTooLong):
                    r.read_frame()
                self.assertEqual(r.read_frame(), b"after")
                self.assertIsNone(r.read_frame())

    def test_two_call_sender_same_bytes(self) -> None:
        for framing in FRAMINGS:
            a, b = self.pair()
            send_message_two_calls(a, b"payload", framing)
            send_message(a, b"payload", framing)
            a.close()
            self.assertEqual(list(FrameReader(b, framing)), [b"payload", b"payload"])

    def test_u32_header_value(self) -> None:
        a, b = self.pair()
        feed(a, struct.pack(">I", 3) + b"abc")
        self.assertEqual(recv_message(b, "u32"), b"abc")


if __name__ == "__main__":
    unittest.main()
