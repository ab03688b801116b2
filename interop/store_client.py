"""Client for the classic store (key-value) protocol; importable module and CLI.

Protocol (``line`` framing; with the other framings each request and each
reply is one frame carrying the same payload, without the newline)::

    store,KEY,VALUE   -> no reply at all
    lookup,KEY        -> {just,VALUE} | nothing
    delete,KEY        -> ok | nothing                 (extension)
    stats             -> {stats,[{uptime_secs,N},...]} (extension)
    anything invalid  -> {error,Reason}   e.g. unknown_verb, missing_key,
                                               missing_value, too_long

KEY is the bytes up to the first comma after the verb; VALUE is everything
after the second comma (commas, braces, spaces, tabs, non-UTF-8 bytes ...).

CLI::

    python3 interop/store_client.py [--host 127.0.0.1] [--port 65002]
        [--framing line] [--timeout 10] [--oneshot] [--bytewise]
        store KEY VALUE | lookup KEY | delete KEY | stats | raw PAYLOAD

Prints the reply (nothing for ``store``).  Exit status 0 on success
(``nothing`` included), 1 on an ``{error,...}`` reply or any failure.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from types import TracebackType
from typing import Iterable

from message import (
    parse_addr,
    run_main,
    FrameReader,
    add_framing_argument,
    check_framing,
    encode,
    port_number,
    positive_timeout,
    recv_line_bytewise,
    send_message,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65002
DEFAULT_TIMEOUT = 10.0

Data = bytes | str


class StoreProtocolError(Exception):
    """The server sent a reply that does not fit the protocol."""


class StoreError(StoreProtocolError):
    """The server answered ``{error,Reason}``."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.reason = reply[len(b"{error,") : -1]
        super().__init__(f"server replied {reply!r}")


def to_bytes(data: Data) -> bytes:
    """Bytes as is; str encoded as UTF-8."""
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def build_store(key: Data, value: Data) -> bytes:
    """``store,KEY,VALUE`` (a key containing a comma cannot be expressed)."""
    key = to_bytes(key)
    if b"," in key:
        raise ValueError("a key must not contain a comma")
    return b"store," + key + b"," + to_bytes(value)


def build_lookup(key: Data) -> bytes:
    """``lookup,KEY``."""
    return b"lookup," + to_bytes(key)


def build_delete(key: Data) -> bytes:
    """``delete,KEY``."""
    return b"delete," + to_bytes(key)


STATS = b"stats"


def expects_reply(request: bytes) -> bool:
    """Every request is answered except ``store,`` requests.

    (A malformed ``store,`` request such as ``store,k`` IS answered with an
    error; ``pipeline`` assumes well-formed stores.)
    """
    return not request.startswith(b"store,")


def is_error(reply: bytes) -> bool:
    """True for an ``{error,Reason}`` reply."""
    return reply.startswith(b"{error,") and reply.endswith(b"}")


def parse_lookup_reply(reply: bytes) -> bytes | None:
    """``{just,V}`` -> V, ``nothing`` -> None; raise on anything else."""
    if reply == b"nothing":
        return None
    if reply.startswith(b"{just,") and reply.endswith(b"}"):
        return reply[len(b"{just,") : -1]
    if is_error(reply):
        raise StoreError(reply)
    raise StoreProtocolError(f"unexpected lookup reply {reply!r}")


def parse_delete_reply(reply: bytes) -> bool:
    """``ok`` -> True, ``nothing`` -> False; raise on anything else."""
    if reply == b"ok":
        return True
    if reply == b"nothing":
        return False
    if is_error(reply):
        raise StoreError(reply)
    raise StoreProtocolError(f"unexpected delete reply {reply!r}")


def connect(host: str, port: int, timeout: float = DEFAULT_TIMEOUT, nodelay: bool = True) -> socket.socket:
    """Open a TCP connection with a timeout (and TCP_NODELAY unless disabled).

    TCP_NODELAY matters for this protocol: ``store`` has no reply, so a
    request written right after a store would otherwise wait for the ACK of
    the store (Nagle) that the server delays (delayed ACK).
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class StoreClient:
    """One persistent connection to a store server, as the course's Python clients used.

    ``bytewise=True`` (``line`` framing only) reads replies one byte per
    ``recv`` exactly like the seed; otherwise replies go through a buffered
    ``FrameReader``.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        framing: str = "line",
        timeout: float = DEFAULT_TIMEOUT,
        bytewise: bool = False,
        nodelay: bool = True,
    ) -> None:
        self.framing = check_framing(framing)
        if bytewise and framing != "line":
            raise ValueError("bytewise reading needs line framing")
        self.bytewise = bytewise
        self.sock = connect(host, port, timeout, nodelay)
        self._reader = FrameReader(self.sock, framing)

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> StoreClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    # -- low level ---------------------------------------------------------
    def send(self, request: bytes) -> None:
        """Send one request frame without reading anything."""
        send_message(self.sock, request, self.framing)

    def recv_reply(self) -> bytes:
        """Read one reply frame; ConnectionError if the server closed instead."""
        if self.bytewise:
            reply = recv_line_bytewise(self.sock)
        else:
            reply = self._reader.read_frame()
        if reply is None:
            raise ConnectionError("server closed the connection instead of replying")
        return reply

    def raw(self, payload: Data) -> bytes:
        """Send one request and read one reply (do not use for a valid store: it has no reply)."""
        self.send(to_bytes(payload))
        return self.recv_reply()

    # -- protocol ----------------------------------------------------------
    def store(self, key: Data, value: Data) -> None:
        """``store,KEY,VALUE``; the server sends no reply."""
        self.send(build_store(key, value))

    def lookup(self, key: Data) -> bytes | None:
        """The stored value, or None for ``nothing``."""
        return parse_lookup_reply(self.raw(build_lookup(key)))

    def delete(self, key: Data) -> bool:
        """True if the key existed (``ok``), False for ``nothing``."""
        return parse_delete_reply(self.raw(build_delete(key)))

    def stats(self) -> bytes:
        """The raw ``{stats,[...]}`` reply."""
        reply = self.raw(STATS)
        if is_error(reply):
            raise StoreError(reply)
        return reply

    def pipeline(self, requests: Iterable[Data]) -> list[bytes]:
        """Write all requests in ONE ``sendall``, then read the replies in order.

        One reply is expected per request except ``store,`` requests.  The
        write runs in a helper thread while this thread reads, so a large
        pipeline cannot deadlock on full socket buffers.
        """
        reqs = [to_bytes(r) for r in requests]
        data = b"".join(encode(self.framing, r) for r in reqs)
        expected = sum(1 for r in reqs if expects_reply(r))
        failure: list[BaseException] = []

        def write() -> None:
            try:
                self.sock.sendall(data)
            except BaseException as exc:  # reported by the reading thread
                failure.append(exc)

        writer = threading.Thread(target=write, name="pipeline-writer", daemon=True)
        writer.start()
        replies: list[bytes] = []
        try:
            for _ in range(expected):
                replies.append(self.recv_reply())
        finally:
            writer.join()
        if failure:
            raise failure[0]
        return replies


def oneshot_store(
    host: str,
    port: int,
    key: Data,
    value: Data,
    framing: str = "line",
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Connect, send one ``store``, close at once without reading (the Erlang client)."""
    with connect(host, port, timeout) as sock:
        send_message(sock, build_store(key, value), framing)


def oneshot_request(
    host: str,
    port: int,
    payload: Data,
    framing: str = "line",
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """Connect, send one request, read one reply, close; return the raw reply."""
    with connect(host, port, timeout) as sock:
        send_message(sock, to_bytes(payload), framing)
        reply = FrameReader(sock, framing).read_frame()
    if reply is None:
        raise ConnectionError("server closed the connection instead of replying")
    return reply


def oneshot_lookup(
    host: str,
    port: int,
    key: Data,
    framing: str = "line",
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes | None:
    """Connect, send one ``lookup``, read one reply, close (the Erlang client)."""
    return parse_lookup_reply(oneshot_request(host, port, build_lookup(key), framing, timeout))


def _arg_bytes(text: str) -> bytes:
    """Command-line argument as the bytes the user typed (non-UTF-8 kept)."""
    return os.fsencode(text)


def build_request(args: argparse.Namespace) -> bytes:
    """The request payload for the parsed command line (ValueError if impossible)."""
    if args.command == "store":
        return build_store(_arg_bytes(args.key), _arg_bytes(args.value))
    if args.command == "lookup":
        return build_lookup(_arg_bytes(args.key))
    if args.command == "delete":
        return build_delete(_arg_bytes(args.key))
    if args.command == "stats":
        return STATS
    return _arg_bytes(args.payload)


class _AddrListAction(argparse.Action):
    """``--addr A[,B,...]``: the addresses to try in turn; the first sets ``host``/``port``."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        try:
            addrs = [parse_addr(part.strip()) for part in str(values).split(",") if part.strip()]
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")
        if not addrs:
            parser.error(f"argument {option_string}: no address given")
        namespace.addrs = addrs
        namespace.host, namespace.port = addrs[0]


def first_reachable(addrs: list[tuple[str, int]], timeout: float) -> tuple[str, int]:
    """The first of ``addrs`` that accepts a connection, tried in turn (the probe is
    closed at once: a server takes a connection without a request as a client that left)."""
    last: OSError | None = None
    for host, port in addrs:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return host, port
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Client for the classic store protocol.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--addr",
        action=_AddrListAction,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="server address in one word, instead of --host and --port; several (a replicated "
        "store's servers) are tried in turn until one accepts the connection",
    )
    add_framing_argument(parser, "line")
    parser.add_argument("--timeout", type=positive_timeout, default=DEFAULT_TIMEOUT, help="socket timeout in seconds (default: 10)")
    parser.add_argument("--oneshot", action="store_true", help="one connection per request, like the course's Erlang clients")
    parser.add_argument("--bytewise", action="store_true", help="read replies one byte per recv like the seed (line framing only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to send (COMMAND --help for its arguments)")
    key_help = "the key (no comma: the protocol ends a key at its first comma)"
    p = sub.add_parser("store", help="store KEY VALUE (no reply)")
    p.add_argument("key", help=key_help)
    p.add_argument("value", help="the value (commas and braces allowed)")
    p = sub.add_parser("lookup", help="lookup KEY, prints {just,VALUE} or nothing")
    p.add_argument("key", help=key_help)
    p = sub.add_parser("delete", help="delete KEY, prints ok or nothing")
    p.add_argument("key", help=key_help)
    sub.add_parser("stats", help="print the server's stats line")
    p = sub.add_parser("raw", help="send PAYLOAD as one request and print one reply")
    p.add_argument("payload", help="the request as it goes on the wire, without framing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.bytewise and args.framing != "line":
        parser.error("--bytewise needs --framing line")
    if args.bytewise and args.oneshot:
        parser.error("--bytewise and --oneshot cannot be combined")

    try:
        request = build_request(args)
        encode(args.framing, request)  # refuse unsendable requests before connecting
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1

    addrs = getattr(args, "addrs", None)
    if addrs and len(addrs) > 1:
        try:
            args.host, args.port = first_reachable(addrs, args.timeout)
        except OSError as exc:
            print(f"{prog}: error: no server of {len(addrs)} reachable: {exc}", file=sys.stderr)
            return 1
    try:
        if args.command == "store":
            if args.oneshot:
                oneshot_store(args.host, args.port, _arg_bytes(args.key), _arg_bytes(args.value), args.framing, args.timeout)
            else:
                with StoreClient(args.host, args.port, args.framing, args.timeout, args.bytewise) as client:
                    client.send(request)
            return 0
        if args.oneshot:
            reply = oneshot_request(args.host, args.port, request, args.framing, args.timeout)
        else:
            with StoreClient(args.host, args.port, args.framing, args.timeout, args.bytewise) as client:
                reply = client.raw(request)
    except (OSError, StoreProtocolError) as exc:
        print(f"{prog}: error: {args.host}:{args.port}: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1

    sys.stdout.buffer.write(reply + b"\n")
    sys.stdout.flush()
    if is_error(reply):
        print(f"{prog}: error: server replied {reply.decode('utf-8', 'backslashreplace')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
