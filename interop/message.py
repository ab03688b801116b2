"""Message framing shared by every interop script.

This is the ONE place where framing lives; the other scripts in ``interop/``
import it and must not re-implement any of it.

Four framings are supported, named by the words the CLIs accept:

``line``
    The payload followed by ``\\n``.  A received frame ends at the first
    ``\\n``; a ``\\r`` immediately before it is dropped (so ``\\r\\n`` clients
    work).  A payload containing ``\\n`` cannot be sent (``ValueError``).
    Note: a payload that *ends* in ``\\r`` is sent as is, but the receiver
    drops that ``\\r``.
``ascii10``
    A 10-byte ASCII decimal length written as Python's ``b'%10d' % len(msg)``
    writes it (right-aligned, space padded), then the payload (the course's
    ``message.py``, seed 004).  On receipt the header must be leading spaces
    followed by at least one decimal digit (leading zeros are fine); anything
    else (``+5``, ``-5``, tabs, trailing spaces, ...) is a ``FramingError``.
``u16`` / ``u32``
    A 2- or 4-byte big-endian unsigned length (``struct`` ``>H`` / ``>I``),
    then the payload, like Erlang's ``{packet,2}`` / ``{packet,4}``.  A payload
    too large for the header is refused (``ValueError``), never truncated.

Receiving functions share one contract: they return the payload (``bytes``);
``None`` when the peer closed cleanly at a frame boundary; and they raise
``IncompleteMessage`` (a subclass of both ``EOFError`` and ``IOError``) when
the peer closed in the middle of a frame.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from typing import Callable, Final, Iterator, NoReturn, Protocol

FRAMINGS: Final = ("line", "ascii10", "u16", "u32")
"""The framing names, as accepted by every CLI's ``--framing``."""

CHUNK_SIZE: Final = 64 * 1024
"""How much ``FrameReader`` asks ``recv`` for at a time."""

ASCII10_WIDTH: Final = 10
_ASCII10_MAX: Final = 10**ASCII10_WIDTH - 1
_ASCII10_HEADER = re.compile(rb" *[0-9]+")

_STRUCTS: Final = {"u16": struct.Struct(">H"), "u32": struct.Struct(">I")}

MAX_PAYLOAD: Final[dict[str, int | None]] = {
    "line": None,
    "ascii10": _ASCII10_MAX,
    "u16": 0xFFFF,
    "u32": 0xFFFF_FFFF,
}
"""Largest payload each framing can carry (``None``: no limit)."""


class FramingError(ValueError):
    """The bytes on the wire do not form a valid frame header."""


class FrameTooLong(FramingError):
    """A frame exceeded the reader's ``max_frame``.

    ``FrameReader`` raises this only after it has consumed (and discarded) the
    whole oversized frame, so the stream is back at a frame boundary and the
    caller may go on reading.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class IncompleteMessage(EOFError, OSError):
    """The peer closed the connection in the middle of a frame."""


def check_framing(framing: str) -> str:
    """Return ``framing`` if it is a known framing name, else raise ValueError."""
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r} (expected one of {', '.join(FRAMINGS)})")
    return framing


def header_size(framing: str) -> int:
    """Size in bytes of the length header (0 for ``line``)."""
    return {"line": 0, "ascii10": ASCII10_WIDTH, "u16": 2, "u32": 4}[check_framing(framing)]


def fits(framing: str, size: int) -> bool:
    """True if a payload of ``size`` bytes can be sent with ``framing``."""
    limit = MAX_PAYLOAD[check_framing(framing)]
    return limit is None or size <= limit


def _header(framing: str, payload: bytes) -> tuple[bytes, bytes]:
    """Split the encoding of ``payload`` into (before, after) parts."""
    check_framing(framing)
    size = len(payload)
    if framing == "line":
        if b"\n" in payload:
            raise ValueError("a payload sent with line framing must not contain a newline")
        return b"", b"\n"
    limit = MAX_PAYLOAD[framing]
    assert limit is not None
    if size > limit:
        raise ValueError(f"payload of {size} bytes is too large for {framing} framing (max {limit})")
    if framing == "ascii10":
        return b"%10d" % size, b""
    return _STRUCTS[framing].pack(size), b""


def encode(framing: str, payload: bytes) -> bytes:
    """Return the bytes that carry ``payload`` as one frame of ``framing``."""
    payload = bytes(payload)
    before, after = _header(framing, payload)
    return before + payload + after


def parse_ascii10_header(header: bytes) -> int:
    """Parse a 10-byte ascii10 header; raise FramingError if it is malformed."""
    if len(header) != ASCII10_WIDTH or _ASCII10_HEADER.fullmatch(header) is None:
        raise FramingError(f"malformed ascii10 length header {bytes(header)!r}")
    return int(header)


def _parse_header(framing: str, header: bytes) -> int:
    if framing == "ascii10":
        return parse_ascii10_header(header)
    size: int = _STRUCTS[framing].unpack(header)[0]
    return size


def send_message(sock: socket.socket, msg: bytes, framing: str = "ascii10") -> None:
    """Send ``msg`` as one frame.

    Header and payload go out in ONE ``sendall`` call.  The seed's version
    (``send_message_two_calls``) calls ``sendall`` twice; the second small
    write then waits for the ACK of the first (Nagle's algorithm) while the
    peer delays that ACK (delayed ACK), costing about 40 ms per message.
    """
    sock.sendall(encode(framing, msg))


def send_message_two_calls(sock: socket.socket, msg: bytes, framing: str = "ascii10") -> None:
    """The seed's ``send_message``: header and payload in two ``sendall`` calls.

    Kept ONLY to demonstrate the Nagle + delayed-ACK trap in benchmarks; use
    ``send_message`` everywhere else.  (For ``line`` framing the two writes
    are the payload and the newline.)
    """
    msg = bytes(msg)
    before, after = _header(framing, msg)
    if before:
        sock.sendall(before)
        sock.sendall(msg)
    else:
        sock.sendall(msg)
        sock.sendall(after)


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    """Receive exactly ``nbytes`` bytes (the seed's function).

    Raises IncompleteMessage if the peer closes before they all arrived.
    """
    chunks = []
    while nbytes > 0:
        chunk = sock.recv(nbytes)
        if chunk == b"":
            raise IncompleteMessage("Incomplete message")
        chunks.append(chunk)
        nbytes -= len(chunk)
    return b"".join(chunks)


def _recv_exactly_or_none(sock: socket.socket, nbytes: int) -> bytes | None:
    """Like recv_exactly, but None if the peer closed before the first byte."""
    first = sock.recv(nbytes)
    if first == b"":
        return None
    if len(first) == nbytes:
        return first
    return first + recv_exactly(sock, nbytes - len(first))


def recv_line_bytewise(sock: socket.socket) -> bytes | None:
    """Read one ``\\n``-terminated line with ``recv(1)`` calls, as the seed does.

    This is the course's framing rule, kept deliberately for interop tests,
    not as a performance model (``FrameReader`` gives the same frames far
    cheaper).  Like ``line`` framing, a ``\\r`` right before the ``\\n`` is
    dropped.  Unlike the seed, a last line cut off by the peer's close is
    not returned: it raises IncompleteMessage.
    """
    chunks = bytearray()
    while True:
        chunk = sock.recv(1)
        if chunk == b"":
            if chunks:
                raise IncompleteMessage("connection closed in the middle of a line")
            return None
        if chunk == b"\n":
            break
        chunks += chunk
    if chunks.endswith(b"\r"):
        del chunks[-1]
    return bytes(chunks)


def recv_message(sock: socket.socket, framing: str = "ascii10") -> bytes | None:
    """Receive one frame without reading past its end.

    Unbuffered, so it never swallows bytes of the next frame; for ``line``
    framing that means one ``recv(1)`` per byte (``recv_line_bytewise``).
    Prefer ``FrameReader`` for anything that reads more than a few frames.
    """
    check_framing(framing)
    if framing == "line":
        return recv_line_bytewise(sock)
    header = _recv_exactly_or_none(sock, header_size(framing))
    if header is None:
        return None
    size = _parse_header(framing, header)
    return recv_exactly(sock, size) if size else b""


class _UseSocketTimeout:
    """Sentinel type: keep the socket's own timeout while idle."""

    def __repr__(self) -> str:
        return "USE_SOCKET_TIMEOUT"


USE_SOCKET_TIMEOUT: Final = _UseSocketTimeout()


class Receiver(Protocol):
    """What ``FrameReader`` needs from a socket (lets servers wrap theirs)."""

    def recv(self, size: int, /) -> bytes: ...

    def gettimeout(self) -> float | None: ...

    def settimeout(self, timeout: float | None, /) -> None: ...


class FrameReader:
    """Buffered frame reader: reads ``CHUNK_SIZE`` bytes at a time, keeps leftovers.

    Several frames arriving in one ``recv`` all come out, one per
    ``read_frame`` call.  ``read_frame`` has the same contract as
    ``recv_message``.

    ``max_frame``: payloads larger than this raise ``FrameTooLong`` after the
    frame has been consumed and discarded (the stream stays usable).

    ``idle_timeout``: the timeout used while waiting for the first byte of a
    frame (``None`` waits forever); the socket's own timeout still applies in
    the middle of a frame.  Servers use ``idle_timeout=None`` so an idle
    client is not dropped while a half-sent frame still times out.
    """

    def __init__(
        self,
        sock: Receiver,
        framing: str = "ascii10",
        *,
        max_frame: int | None = None,
        idle_timeout: float | None | _UseSocketTimeout = USE_SOCKET_TIMEOUT,
    ) -> None:
        self.sock = sock
        self.framing = check_framing(framing)
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self._buf = bytearray()
        self._scanned = 0  # line framing: bytes of _buf known to hold no b"\n"
        self._eof = False

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet returned as frames."""
        return len(self._buf)

    def _recv(self, size: int, at_boundary: bool = False) -> bytes:
        """One recv; ``at_boundary``: no part of a frame received yet (idle)."""
        if self._eof:
            return b""
        if not at_boundary or isinstance(self.idle_timeout, _UseSocketTimeout):
            data = self.sock.recv(size)
        else:
            saved = self.sock.gettimeout()
            self.sock.settimeout(self.idle_timeout)
            try:
                data = self.sock.recv(size)
            finally:
                self.sock.settimeout(saved)
        if not data:
            self._eof = True
        return data

    def _fill(self, want: int = CHUNK_SIZE) -> bool:
        """Append received bytes to the buffer; False at end of stream."""
        data = self._recv(max(CHUNK_SIZE, min(want, 16 * CHUNK_SIZE)), at_boundary=not self._buf)
        self._buf += data
        return bool(data)

    def _eof_result(self) -> bytes | None:
        """What read_frame returns at end of stream: None, or raise if mid-frame."""
        if self._buf:
            raise IncompleteMessage(f"connection closed in the middle of a frame ({len(self._buf)} bytes buffered)")
        return None

    def has_frame(self) -> bool:
        """True if a complete frame is already buffered (read_frame won't block)."""
        if self.framing == "line":
            return self._buf.find(b"\n", self._scanned) >= 0
        hsize = header_size(self.framing)
        if len(self._buf) < hsize:
            return False
        try:
            size = _parse_header(self.framing, bytes(self._buf[:hsize]))
        except FramingError:
            return True  # read_frame will raise without blocking
        return len(self._buf) >= hsize + size

    def read_frame(self) -> bytes | None:
        """Return the next payload, None on clean close at a frame boundary."""
        if self.framing == "line":
            return self._read_line()
        return self._read_sized()

    def __iter__(self) -> Iterator[bytes]:
        """Yield frames until the peer closes cleanly."""
        while (frame := self.read_frame()) is not None:
            yield frame

    def _read_line(self) -> bytes | None:
        limit = self.max_frame
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                if line.endswith(b"\r"):
                    line = line[:-1]
                if limit is not None and len(line) > limit:
                    raise FrameTooLong(len(line), limit)
                return line
            self._scanned = len(self._buf)
            # +1: the line may still end in "\r\n", whose "\r" is not payload.
            if limit is not None and len(self._buf) > limit + 1:
                self._discard_line(limit)
            if not self._fill():
                return self._eof_result()

    def _discard_line(self, limit: int) -> None:
        """Drop the rest of an oversized line, then raise FrameTooLong."""
        size = len(self._buf)
        self._buf.clear()
        self._scanned = 0
        while True:
            data = self._recv(CHUNK_SIZE)
            if not data:
                raise IncompleteMessage("connection closed in the middle of an oversized line")
            end = data.find(b"\n")
            if end >= 0:
                self._buf += data[end + 1 :]
                size += end - (1 if data[:end].endswith(b"\r") else 0)
                raise FrameTooLong(size, limit)
            size += len(data)

    def _read_sized(self) -> bytes | None:
        hsize = header_size(self.framing)
        while len(self._buf) < hsize:
            if not self._fill():
                return self._eof_result()
        size = _parse_header(self.framing, bytes(self._buf[:hsize]))
        if self.max_frame is not None and size > self.max_frame:
            self._discard_sized(hsize, size)
        total = hsize + size
        while len(self._buf) < total:
            if not self._fill(total - len(self._buf)):
                return self._eof_result()
        payload = bytes(self._buf[hsize:total])
        del self._buf[:total]
        return payload

    def _discard_sized(self, hsize: int, size: int) -> None:
        """Drop an oversized frame of ``size`` payload bytes, then raise FrameTooLong."""
        assert self.max_frame is not None
        remaining = hsize + size
        while True:
            take = min(remaining, len(self._buf))
            del self._buf[:take]
            remaining -= take
            if remaining == 0:
                raise FrameTooLong(size, self.max_frame)
            data = self._recv(min(remaining, 16 * CHUNK_SIZE))
            if not data:
                raise IncompleteMessage("connection closed in the middle of an oversized frame")
            self._buf += data


def add_framing_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """Add the common ``--framing {line,ascii10,u16,u32}`` option to a CLI."""
    parser.add_argument(
        "--framing",
        choices=FRAMINGS,
        default=default,
        help=f"message framing (default: {default})",
    )


def positive_timeout(text: str) -> float:
    """argparse type for ``--timeout``: a number of seconds > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("timeout must be > 0 seconds")
    return value


def port_number(text: str) -> int:
    """argparse type for ``--port``: 0..65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("port must be in 0..65535")
    return value


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        return host.strip("[]"), port_number(port)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 0..65535, got {text!r}") from None


class _AddrAction(argparse.Action):
    """``--addr HOST:PORT`` sets ``host`` and ``port`` as ``--host`` and ``--port`` would."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        try:
            namespace.host, namespace.port = parse_addr(str(values))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")


def add_addr_argument(parser: argparse.ArgumentParser, what: str = "server address") -> None:
    """Add ``--addr HOST:PORT``, the Rust binaries' spelling, next to ``--host``/``--port``
    (whichever comes last on the command line wins)."""
    parser.add_argument(
        "--addr",
        action=_AddrAction,
        metavar="HOST:PORT",
        help=f"{what} in one word, instead of --host and --port",
    )


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s status; Ctrl-C exits 130 with one line, not a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


# --- small socket helpers shared by the interop servers (not framing) -------


def open_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0 picks a free port)."""
    family, socktype, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listening_line(sock: socket.socket) -> str:
    """The ``listening on HOST:PORT`` line the Rust tests wait for."""
    host, port = sock.getsockname()[:2]
    return f"listening on {host}:{port}"


def add_server_arguments(
    parser: argparse.ArgumentParser, default_host: str, default_port: int, framing: str
) -> None:
    """The listening options every interop server takes: ``--host``, ``--port``,
    ``--addr`` and ``--framing`` (with this server's defaults)."""
    parser.add_argument("--host", default=default_host, help=f"address to bind (default: {default_host})")
    parser.add_argument(
        "--port", type=port_number, default=default_port, help=f"port, 0 for any free one (default: {default_port})"
    )
    add_addr_argument(parser, "address to listen on")
    add_framing_argument(parser, framing)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_forever(
    prog: str,
    host: str,
    port: int,
    timeout: float,
    on_connection: Callable[[socket.socket, str], None],
) -> int:
    """The interop servers' accept loop: listen on ``host:port``, print
    ``listening on HOST:PORT`` to stderr, and hand each accepted connection
    (with ``timeout`` and ``TCP_NODELAY`` set, and its ``HOST:PORT`` text) to
    ``on_connection``, which must not block for long (it starts a thread).
    A failed accept (out of file descriptors, say) is logged and retried;
    SIGTERM or Ctrl-C returns 0; a listen that fails returns 1 with one line."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        listener = open_listener(host, port)
    except OSError as exc:
        print(f"{prog}: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(listening_line(listener), file=sys.stderr, flush=True)
    try:
        while True:
            try:
                conn, addr = listener.accept()
            except OSError as exc:
                print(f"{prog}: accept failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.1)
                continue
            conn.settimeout(timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            on_connection(conn, f"{addr[0]}:{addr[1]}")
    except SystemExit:
        return 0
    finally:
        listener.close()


def start_thread(name: str, target: Callable[..., None], *args: object) -> None:
    """Start a daemon thread (the interop servers never join theirs: exit ends them)."""
    threading.Thread(target=target, args=args, name=name, daemon=True).start()
