"""The echo client of seed 004, plus a non-interactive checking mode.

Interactive (the seed's behaviour; an empty line or end of input ends it)::

    python3 interop/echo_client.py [--host 127.0.0.1] [--port 12345] [--framing ascii10]
    Say >hello
    Received > hello

Sending: each MSG argument is sent and its reply printed as ``Received > REPLY``,
whatever the server does to it (an upper-casing server included)::

    python3 interop/echo_client.py [--addr HOST:PORT] [--framing F] hello world

Checking mode, used by tests, with ``--check`` (or ``--expect-upper``, which
implies it): each message is sent and its echo compared with the message (or
with its Unicode upper case with ``--expect-upper``; payloads that are not
valid UTF-8 are expected back unchanged)::

    python3 interop/echo_client.py [--host H] [--port P] [--framing F] [--timeout 10]
        (--check | --expect-upper) [--count N] [--stdin] [--binary] [MSG ...]

``--count N`` sends the whole set of messages N times; ``--stdin`` adds one
message per line of standard input; ``--binary`` (size-prefixed framings
only, implies ``--check``) adds awkward payloads: embedded newline, NUL, 0xff,
the empty payload and a 70 KiB one (for u16, the 65535-byte maximum instead).
Prints a mismatch line on stderr for each bad echo and finally ``N passed, M
failed``; exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from echo_server import DEFAULT_HOST, DEFAULT_PORT, transform_none, transform_upper
from message import (
    add_addr_argument,
    run_main,
    MAX_PAYLOAD,
    FrameReader,
    add_framing_argument,
    port_number,
    positive_timeout,
    send_message,
)


def binary_payloads(framing: str) -> list[bytes]:
    """Awkward payloads for the size-prefixed framings."""
    big = 70 * 1024
    limit = MAX_PAYLOAD[framing]
    if limit is not None:
        big = min(big, limit)
    text = "héllo ✓ straße ".encode("utf-8")
    utf8_big = text * (big // len(text)) + b"x" * (big % len(text))  # valid UTF-8, exactly big bytes
    return [
        b"line one\nline two",
        b"\n",
        b"\r\n",
        b"\x00",
        b"nul\x00in the middle",
        b"\xff",
        b"\xff\xfe not utf-8",
        b"",
        bytes(range(256)),
        (bytes(range(256)) * (big // 256 + 1))[:big],  # not UTF-8: echoed as is
        utf8_big,
    ]


def describe(payload: bytes, limit: int = 50) -> str:
    text = repr(payload)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(payload)} bytes)"


def interactive(sock: socket.socket, framing: str) -> int:
    """The seed's loop: prompt, send, print the echo; an empty line ends it."""
    reader = FrameReader(sock, framing)
    while True:
        try:
            msg = input("Say >")
        except EOFError:
            break
        if not msg:
            break
        send_message(sock, msg.encode("utf-8"), framing)
        response = reader.read_frame()
        if response is None:
            print(f"{os.path.basename(sys.argv[0])}: error: server closed the connection", file=sys.stderr)
            return 1
        print("Received >", response.decode("utf-8", "backslashreplace"))
    return 0


def send_all(sock: socket.socket, framing: str, messages: list[bytes]) -> None:
    """Send each message and print its reply as the seed does, checking nothing."""
    reader = FrameReader(sock, framing)
    for msg in messages:
        send_message(sock, msg, framing)
        reply = reader.read_frame()
        if reply is None:
            raise ConnectionError("server closed the connection instead of replying")
        print("Received >", reply.decode("utf-8", "backslashreplace"), flush=True)


def check_echoes(sock: socket.socket, framing: str, messages: list[bytes], expect_upper: bool) -> tuple[int, int]:
    """Send each message, compare its echo; return (passed, failed)."""
    expected_of = transform_upper if expect_upper else transform_none
    reader = FrameReader(sock, framing)
    passed = failed = 0
    for msg in messages:
        send_message(sock, msg, framing)
        reply = reader.read_frame()
        if reply is None:
            raise ConnectionError("server closed the connection instead of echoing")
        expected = expected_of(msg)
        if reply == expected:
            passed += 1
        else:
            failed += 1
            print(f"mismatch: sent {describe(msg)}, expected {describe(expected)}, got {describe(reply)}", file=sys.stderr)
    return passed, failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Echo client of seed 004, interactive or checking.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    add_addr_argument(parser, "server address")
    add_framing_argument(parser, "ascii10")
    parser.add_argument("--timeout", type=positive_timeout, default=10.0, help="socket timeout in seconds (default: 10)")
    parser.add_argument("--check", action="store_true",
                        help="compare each reply with its message and count; exit 1 on any mismatch")
    parser.add_argument("--expect-upper", action="store_true",
                        help="with --check: expect the Unicode upper case of each message back (implies --check)")
    parser.add_argument("--count", type=int, default=1, metavar="N", help="send the set of messages N times (default: 1)")
    parser.add_argument("--stdin", action="store_true", help="also send each line of standard input as a message")
    parser.add_argument("--binary", action="store_true",
                        help="also send awkward binary payloads (size-prefixed framings only; implies --check)")
    parser.add_argument("messages", nargs="*", metavar="MSG",
                        help="messages to send, each reply printed (none, and no --stdin or --binary: interactive mode)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.binary and args.framing == "line":
        parser.error("--binary needs a size-prefixed framing (ascii10, u16 or u32)")

    messages = [os.fsencode(m) for m in args.messages]
    if args.stdin:
        messages += [line.rstrip(b"\r\n") for line in sys.stdin.buffer]
    if args.binary:
        messages += binary_payloads(args.framing)
    check_mode = args.check or args.expect_upper or args.binary
    send_mode = bool(messages)
    if args.framing == "line":
        bad = [m for m in messages if b"\n" in m]
        if bad:
            parser.error(f"line framing cannot carry a message containing a newline: {describe(bad[0])}")

    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
            if not check_mode and not send_mode:
                return interactive(sock, args.framing)
            if not check_mode:
                send_all(sock, args.framing, messages * args.count)
                return 0
            passed, failed = check_echoes(sock, args.framing, messages * args.count, args.expect_upper)
    except (OSError, ValueError) as exc:
        print(f"{prog}: error: {args.host}:{args.port}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
