"""Reference Python server for the classic store protocol.

The counterpart of the Rust server for the Rust-client -> Python-server
direction.  See ``store_client.py`` for the protocol.  Implementation: one
daemon thread per connection, buffered reads through ``message.FrameReader``,
one lock around a dict.  Replies to requests that arrived together
(pipelining) are sent together, in request order.

Decisions beyond the course material:

* every request except a valid ``store`` gets exactly one reply; an empty
  request gets ``{error,unknown_verb}``;
* ``store`` without a comma or with an empty key -> ``{error,missing_key}``;
  ``store,KEY`` without a second comma -> ``{error,missing_value}``;
  ``store,KEY,`` stores the empty value;
* for ``lookup`` / ``delete`` the key is everything after the first comma
  (a key containing a comma can never have been stored, so -> ``nothing``);
  no comma or an empty key -> ``{error,missing_key}``;
* ``stats`` ignores anything after a comma;
* a frame longer than ``--max-frame`` is discarded and answered
  ``{error,too_long}``; the connection stays usable;
* a last line (or frame) cut off by the peer's close is not applied; the
  replies to the complete requests before it are still sent;
* a malformed length header (ascii10) closes the connection;
* read-your-writes across connections: the course's Erlang clients store
  on one connection (connect, send, close) and look up on the next one.
  With a thread per connection the lookup's thread can run before the
  store's thread has read its bytes, so the lookup answers ``nothing``
  (seen about once in 15 tries).  To rule that out, the accept loop, before
  it starts serving a new connection, waits (at most ``SETTLE_LIMIT``) until
  every existing connection has processed all bytes that have already
  arrived on it ("settling"); see ``Registry``.

CLI::

    python3 interop/store_server.py [--host 127.0.0.1] [--port 65002]
        [--framing line] [--timeout 10] [--idle-timeout 0]
        [--max-frame 1048576] [--verbose]

Once listening it prints exactly one line ``listening on HOST:PORT`` to
stderr.  SIGTERM or Ctrl-C stops it with exit status 0.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import threading
import time

from message import (
    FrameReader,
    FrameTooLong,
    FramingError,
    add_server_arguments,
    encode,
    positive_timeout,
    run_main,
    serve_forever,
    start_thread,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65002
DEFAULT_MAX_FRAME = 1024 * 1024

UNKNOWN_VERB = b"{error,unknown_verb}"
MISSING_KEY = b"{error,missing_key}"
MISSING_VALUE = b"{error,missing_value}"
TOO_LONG = b"{error,too_long}"

SETTLE_LIMIT = 0.25
"""Longest time (s) a new connection waits for older ones to settle."""


def _readable_now(sock: socket.socket) -> bool:
    """True if data (or EOF) is waiting on ``sock``; does not block."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed under our feet: nothing to wait for
        return False


class TrackedSocket:
    """Socket wrapper that tells the ``Registry`` when its thread waits in recv.

    Implements ``message.Receiver``, all that ``FrameReader`` needs.
    """

    def __init__(self, sock: socket.socket, registry: Registry) -> None:
        self.sock = sock
        self.registry = registry
        self.in_recv = False  # blocked in recv: not processing anything
        self.done = False
        self.generation = 0  # bumped every time a recv returns

    def recv(self, size: int) -> bytes:
        cond = self.registry.cond
        with cond:
            self.in_recv = True
            cond.notify_all()
        try:
            return self.sock.recv(size)
        finally:
            with cond:
                self.in_recv = False
                self.generation += 1
                cond.notify_all()

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)


class Registry:
    """The live connections, so a new one can wait for older ones to settle."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._conns: set[TrackedSocket] = set()

    def add(self, conn: socket.socket) -> TrackedSocket:
        tracked = TrackedSocket(conn, self)
        with self.cond:
            self._conns.add(tracked)
        return tracked

    def remove(self, tracked: TrackedSocket) -> None:
        with self.cond:
            tracked.done = True
            self._conns.discard(tracked)
            self.cond.notify_all()

    def settle(self, limit: float = SETTLE_LIMIT) -> bool:
        """Wait until every connection is blocked in recv with nothing to read.

        Then every request that had fully arrived before this call has been
        applied.  Gives up after ``limit`` seconds (a connection stuck in a
        slow send must not stall accepts); returns False in that case.
        """
        deadline = time.monotonic() + limit
        with self.cond:
            conns = list(self._conns)
        for tracked in conns:
            while True:
                with self.cond:
                    while not tracked.done and not tracked.in_recv:
                        if not self.cond.wait(deadline - time.monotonic()):
                            return False
                    if tracked.done:
                        break
                    generation = tracked.generation
                if not _readable_now(tracked.sock):
                    break
                with self.cond:  # its recv is about to return: wait for that
                    while not tracked.done and tracked.generation == generation:
                        if not self.cond.wait(deadline - time.monotonic()):
                            return False
        return True


class Store:
    """The key-value dict, its lock and the counters reported by ``stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[bytes, bytes] = {}
        self._started = time.monotonic()
        self.connections = 0
        self.requests = 0

    def connection_opened(self) -> None:
        with self._lock:
            self.connections += 1

    def handle(self, request: bytes) -> bytes | None:
        """Apply one request; return the reply payload, or None (valid store)."""
        verb, comma, rest = request.partition(b",")
        with self._lock:
            self.requests += 1
            if verb == b"store":
                key, comma2, value = rest.partition(b",")
                if not comma or not key:
                    return MISSING_KEY
                if not comma2:
                    return MISSING_VALUE
                self._data[key] = value
                return None
            if verb == b"lookup":
                if not rest:
                    return MISSING_KEY
                found = self._data.get(rest)
                return b"nothing" if found is None else b"{just," + found + b"}"
            if verb == b"delete":
                if not rest:
                    return MISSING_KEY
                return b"ok" if self._data.pop(rest, None) is not None else b"nothing"
            if verb == b"stats":
                uptime = int(time.monotonic() - self._started)
                return (
                    b"{stats,[{uptime_secs,%d},{keys,%d},{connections,%d},{requests,%d}]}"
                    % (uptime, len(self._data), self.connections, self.requests)
                )
            return UNKNOWN_VERB


def serve_connection(
    conn: socket.socket,
    tracked: TrackedSocket,
    registry: Registry,
    peer: str,
    store: Store,
    framing: str,
    max_frame: int,
    idle_timeout: float | None,
    verbose: bool,
) -> None:
    """Serve one client until it closes, errs or times out."""
    store.connection_opened()
    reader = FrameReader(tracked, framing, max_frame=max_frame, idle_timeout=idle_timeout)
    pending: list[bytes] = []
    reason = "closed"
    try:
        while True:
            # Reply as soon as no further complete request is already buffered,
            # so pipelined requests get their replies in one send.
            if pending and not reader.has_frame():
                conn.sendall(b"".join(pending))
                pending.clear()
            try:
                request = reader.read_frame()
            except FrameTooLong:
                pending.append(encode(framing, TOO_LONG))
                continue
            if request is None:
                break
            reply = store.handle(request)
            if reply is not None:
                pending.append(encode(framing, reply))
    except (OSError, FramingError) as exc:  # IncompleteMessage is an OSError
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            if pending:
                conn.sendall(b"".join(pending))
        except OSError:
            pass
        registry.remove(tracked)
        conn.close()
        if verbose:
            print(f"connection from {peer} ended ({reason})", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reference server for the classic store protocol.")
    add_server_arguments(parser, DEFAULT_HOST, DEFAULT_PORT, "line")
    parser.add_argument("--timeout", type=positive_timeout, default=10.0,
                        help="seconds allowed for a send or for the rest of a started frame (default: 10)")
    parser.add_argument("--idle-timeout", type=float, default=0.0,
                        help="close a connection idle this many seconds between requests; 0 = never (default: 0)")
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                        help=f"largest request accepted, in bytes (default: {DEFAULT_MAX_FRAME})")
    parser.add_argument("--verbose", "-v", action="store_true", help="log connections to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_frame < 1:
        parser.error("--max-frame must be at least 1")
    idle_timeout = args.idle_timeout if args.idle_timeout > 0 else None
    store = Store()
    registry = Registry()

    def on_connection(conn: socket.socket, peer: str) -> None:
        if args.verbose:
            print(f"connection from {peer}", file=sys.stderr, flush=True)
        # Requests that arrived on older connections first are applied first.
        registry.settle()
        tracked = registry.add(conn)
        start_thread(
            f"conn-{peer}", serve_connection,
            conn, tracked, registry, peer, store, args.framing, args.max_frame, idle_timeout, args.verbose,
        )

    return serve_forever(parser.prog, args.host, args.port, args.timeout, on_connection)


if __name__ == "__main__":
    run_main(main)
