"""The pipeline echo server of seed 004 (Part 4), in Python, stdlib only.

Data flow, as in the seed::

    reader thread per connection --(sock, msg)--> case_q
    case_converter thread        --(sock, msg)--> sender_q
    one sender thread            --> send_message(sock, msg)

``--transform upper`` converts ``payload.decode('utf-8').upper().encode()``
(payloads that are not valid UTF-8 are echoed unchanged); ``--transform
none`` passes payloads through the same stage untouched.

Departures from the seed, all about robustness:

* when a reader sees its connection end it does not close the socket
  itself; it sends a close marker ``(sock, None)`` down the same queues, so
  the sender closes the socket after every earlier reply was sent (a
  half-closed client still gets all its echoes, and the sender never
  writes to a closed or reused socket);
* a send that fails (peer gone, or not reading for ``--timeout`` seconds)
  shuts the connection down and later replies for it are dropped; the
  sender thread itself never dies;
* the seed's ``out_q.put(sock, msg.upper())`` typo is fixed.

CLI::

    python3 interop/echo_server.py [--host 127.0.0.1] [--port 12345]
        [--framing ascii10] [--transform none] [--timeout 10]
        [--max-frame 16777216] [--verbose]

Once listening it prints exactly one line ``listening on HOST:PORT`` to
stderr.  SIGTERM or Ctrl-C stops it with exit status 0.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
from typing import Callable

from message import (
    FrameReader,
    FramingError,
    add_server_arguments,
    positive_timeout,
    run_main,
    send_message,
    serve_forever,
    start_thread,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

Item = tuple[socket.socket, bytes | None]
"""A queued reply; ``None`` instead of bytes means "close this socket"."""


def transform_upper(payload: bytes) -> bytes:
    """Unicode upper case of a UTF-8 payload; other payloads unchanged."""
    try:
        return payload.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError:
        return payload


def transform_none(payload: bytes) -> bytes:
    """Identity."""
    return payload


TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {"upper": transform_upper, "none": transform_none}


def log(verbose: bool, text: str) -> None:
    if verbose:
        print(text, file=sys.stderr, flush=True)


def read_requests(q: queue.Queue[Item], sock: socket.socket, framing: str, max_frame: int, verbose: bool) -> None:
    """Reader thread: queue every received message, then a close marker."""
    reader = FrameReader(sock, framing, max_frame=max_frame, idle_timeout=None)
    reason = "closed by peer"
    try:
        for msg in reader:
            q.put((sock, msg))
    except (OSError, FramingError) as exc:  # IncompleteMessage, timeouts, bad headers, too long
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        q.put((sock, None))
        log(verbose, f"reader ended ({reason})")


def case_converter(in_q: queue.Queue[Item], out_q: queue.Queue[Item], transform: Callable[[bytes], bytes]) -> None:
    """Converter thread: apply ``transform`` to every message, pass markers on."""
    while True:
        sock, msg = in_q.get()
        out_q.put((sock, msg if msg is None else transform(msg)))


def send_responses(q: queue.Queue[Item], framing: str, verbose: bool) -> None:
    """The single sender thread; survives any failure of a single connection."""
    dead: set[socket.socket] = set()
    while True:
        sock, msg = q.get()
        if msg is None:
            dead.discard(sock)
            sock.close()
            continue
        if sock in dead:
            continue  # reply for a connection that already failed: drop it
        try:
            send_message(sock, msg, framing)
        except (OSError, ValueError) as exc:
            log(verbose, f"dropping replies for a connection: {type(exc).__name__}: {exc}")
            dead.add(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes its reader, which sends the close marker
            except OSError:
                pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Queue-pipeline echo server of seed 004.")
    add_server_arguments(parser, DEFAULT_HOST, DEFAULT_PORT, "ascii10")
    parser.add_argument("--transform", choices=sorted(TRANSFORMS), default="none", help="case-converter stage (default: none)")
    parser.add_argument("--timeout", type=positive_timeout, default=10.0,
                        help="seconds allowed for a send or for the rest of a started message (default: 10)")
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                        help=f"largest message accepted; a larger one closes the connection (default: {DEFAULT_MAX_FRAME})")
    parser.add_argument("--verbose", "-v", action="store_true", help="log connections to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sender_q: queue.Queue[Item] = queue.Queue()
    case_q: queue.Queue[Item] = queue.Queue()
    start_thread("sender", send_responses, sender_q, args.framing, args.verbose)
    start_thread("case_converter", case_converter, case_q, sender_q, TRANSFORMS[args.transform])

    def on_connection(client: socket.socket, peer: str) -> None:
        log(args.verbose, f"Connection from: {peer}")
        start_thread(f"reader-{peer}", read_requests, case_q, client, args.framing, args.max_frame, args.verbose)

    return serve_forever(parser.prog, args.host, args.port, args.timeout, on_connection)


if __name__ == "__main__":
    run_main(main)
