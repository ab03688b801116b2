"""Remote channels (the course's RemoteChan) in Python; importable module and CLI.

The same wire protocol as ``src/chan`` (see PROTOCOLS.md, "Remote channels"),
one Erlang term per line on a channel's port::

    {remote_msg,Msg}    -> no reply; Msg goes into the channel
    remote_read         -> {remote_msg,Msg} once a message is there
    {remote_read,Ms}    -> {remote_msg,Msg}, or timeout after Ms milliseconds
    anything else       -> {error,Reason}; the connection goes on

A channel crosses the network as ``{remote_chan,{127,0,0,1},Port}``.  A
``Node`` makes local channels (``node.chan()``), opens a port for one only when
it leaves the process (``node.export``), and turns ``{remote_chan,...}`` back
into its own local channel when the port is one of its own (``node.import_``).
Names live in the store server: ``store,Name,{remote_chan,...}`` / ``lookup,Name``.

Writing to a remote channel: connect, send the line, half-close, and wait for
the listener to close in turn (so the message is in the queue when ``write``
returns; a listener that answers is refusing, and that raises ``ChanError``).

CLI::

    python3 interop/chan.py --registry HOST:PORT pong NAME
        register a channel as NAME, print "listening on HOST:PORT" to stderr once
        registered, answer every {ping,N,ReplyChan} with {pong,N} until killed;
        as chan-pingpong, refuse (exit 1) a NAME whose registered channel still
        answers, and unregister NAME on Ctrl-C or SIGTERM
    python3 interop/chan.py --registry HOST:PORT ping NAME COUNT
        look NAME up, send COUNT pings each with its own reply channel, check
        every pong; print "N passed, M failed" and exit 1 on any failure
"""

from __future__ import annotations

import argparse
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

import term
from message import FrameReader, FrameTooLong, IncompleteMessage, encode, open_listener, run_main
from store_client import StoreClient, StoreProtocolError
from term import Atom

DEFAULT_REGISTRY = "127.0.0.1:65002"
DEFAULT_TIMEOUT = 10.0
MAX_LINE = 1 << 20
POLL = 0.2
# How long a pong waits for the port of a channel already registered under its name.
PROBE_TIMEOUT = 1.0


class ChanError(Exception):
    """A channel operation failed (unreachable, refused, timed out, not registered)."""


class RemoteChan:
    """A channel on another node: ``{remote_chan,Host,Port}``."""

    def __init__(self, host: Any, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host = host  # the term as it came: an address tuple or a name
        self.port = port
        self.timeout = timeout

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteChan) and (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"RemoteChan({host_name(self.host)}:{self.port})"

    def term(self) -> tuple:
        return (Atom("remote_chan"), self.host, self.port)

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((host_name(self.host), self.port), timeout=self.timeout)
        except OSError as exc:
            raise ChanError(f"{self!r} unreachable: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def write(self, node: "Node", msg: Any) -> None:
        """Send ``{remote_msg,Msg}`` (local channels in it get ports from ``node``)."""
        line = encode("line", b"{remote_msg," + term.format(node.export(msg)).encode() + b"}")
        with self._connect() as sock:
            try:
                sock.sendall(line)
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            except OSError as exc:
                raise ChanError(f"{self!r}: {exc}") from exc
        if answer:
            raise ChanError(f"{self!r} answered {answer.strip()!r}")

    def read(self, node: "Node", timeout: Optional[float] = None) -> Any:
        """The next message, by a remote read; ChanError on timeout or failure."""
        request = b"remote_read" if timeout is None else b"{remote_read,%d}" % int(timeout * 1000)
        with self._connect() as sock:
            sock.settimeout(None if timeout is None else timeout + self.timeout)
            try:
                sock.sendall(encode("line", request))
                reply = FrameReader(sock, "line", max_frame=MAX_LINE).read_frame()
            except OSError as exc:
                raise ChanError(f"{self!r}: {exc}") from exc
        if reply is None:
            raise ChanError(f"{self!r} closed without an answer")
        value = term.parse(reply)
        if value == Atom("timeout"):
            raise ChanError("timeout")
        tag = term.tagged(value)
        if tag is None or tag[0] != "remote_msg" or len(tag[1]) != 1:
            raise ChanError(f"{self!r} answered {reply!r}")
        return node.import_(tag[1][0])


class LocalChan:
    """A channel of this process: a queue, and a port listener once it is exported."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.queue: queue.Queue = queue.Queue()
        self.port: Optional[int] = None
        self._listener: Optional[socket.socket] = None
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"LocalChan(port={self.port})"

    def write(self, node: "Node", msg: Any) -> None:
        self.queue.put(msg)

    def read(self, node: "Node", timeout: Optional[float] = None) -> Any:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise ChanError("timeout") from None

    def close(self) -> None:
        """Stop the port listener (if any) and release the port."""
        self._closed.set()
        if self.port is not None:
            self.node.chans.pop(self.port, None)

    def _open(self) -> int:
        if self.port is None:
            self._listener = open_listener(self.node.advertise, 0)
            self._listener.settimeout(POLL)
            self.port = self._listener.getsockname()[1]
            self.node.chans[self.port] = self
            threading.Thread(target=self._accept, name=f"chan-{self.port}", daemon=True).start()
        return self.port

    def _accept(self) -> None:
        assert self._listener is not None
        with self._listener:
            while not self._closed.is_set():
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Serve the lines of one connection until the peer closes, then close."""
        with conn:
            conn.settimeout(None)
            reader = FrameReader(conn, "line", max_frame=MAX_LINE)
            while True:
                try:
                    line = reader.read_frame()
                except FrameTooLong:
                    conn.sendall(b"{error,too_long}\n")
                    continue
                except (IncompleteMessage, OSError):
                    return
                if line is None:
                    return
                reply = self._handle(line)
                if reply:
                    conn.sendall(reply)

    def _handle(self, line: bytes) -> bytes:
        try:
            request = term.parse(line)
        except term.TermError as exc:
            print(f"chan.py: port {self.port}: bad line {line[:80]!r}: {exc}", file=sys.stderr)
            return b"{error,bad_term}\n"
        tag = term.tagged(request)
        if tag and tag[0] == "remote_msg" and len(tag[1]) == 1:
            self.queue.put(self.node.import_(tag[1][0]))
            return b""
        if request == Atom("remote_read"):
            msg = self.queue.get()
        elif tag and tag[0] == "remote_read" and len(tag[1]) == 1 and isinstance(tag[1][0], int) and tag[1][0] >= 0:
            try:
                msg = self.queue.get(timeout=tag[1][0] / 1000)
            except queue.Empty:
                return b"timeout\n"
        else:
            print(f"chan.py: port {self.port}: not a request: {line[:80]!r}", file=sys.stderr)
            return b"{error,unknown_request}\n"
        return encode("line", b"{remote_msg," + term.format(self.node.export(msg)).encode() + b"}")


def host_name(host: Any) -> str:
    """A host term as ``socket`` wants it: ``(127,0,0,1)`` -> ``"127.0.0.1"``."""
    if isinstance(host, tuple):
        return ".".join(str(part) for part in host)
    text = term.as_text(host)
    if text is None:
        raise ChanError(f"not a host: {host!r}")
    return text


class Node:
    """This process's channels: ports for the ones that left, recognized when they return."""

    def __init__(self, advertise: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.advertise = advertise
        self.timeout = timeout
        self.chans: dict[int, LocalChan] = {}

    def chan(self) -> LocalChan:
        return LocalChan(self)

    def export(self, value: Any) -> Any:
        """The term for ``value``, every channel in it as ``{remote_chan,Host,Port}``."""
        if isinstance(value, LocalChan):
            port = value._open()
            host = tuple(int(part) for part in value.node.advertise.split("."))
            return (Atom("remote_chan"), host, port)
        if isinstance(value, RemoteChan):
            return value.term()
        if isinstance(value, tuple):
            return tuple(self.export(item) for item in value)
        if isinstance(value, list):
            return [self.export(item) for item in value]
        return value

    def import_(self, value: Any) -> Any:
        """The value for a term: ``{remote_chan,...}`` becomes a channel (ours if it is)."""
        tag = term.tagged(value)
        if tag and tag[0] == "remote_chan" and len(tag[1]) == 2 and isinstance(tag[1][1], int):
            host, port = tag[1]
            try:
                name = host_name(host)
            except ChanError:
                name = None
            if name is not None:
                ours = name == self.advertise or (name == "localhost" and self.advertise == "127.0.0.1")
                if ours and port in self.chans:
                    return self.chans[port]
                return RemoteChan(host, port, self.timeout)
        if isinstance(value, tuple):
            return tuple(self.import_(item) for item in value)
        if isinstance(value, list):
            return [self.import_(item) for item in value]
        return value


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def register(registry: str, name: str, chan: Any, node: Node) -> None:
    """``store,NAME,{remote_chan,...}``, then read back so the entry is visible."""
    host, port = split_addr(registry)
    value = term.format(node.export(chan))
    with StoreClient(host, port) as store:
        store.store(name, value)
        if store.lookup(name) is None:
            raise ChanError(f"registry {registry} did not keep {name}")


def lookup(registry: str, name: str, node: Node) -> Any:
    """The channel registered as NAME (ChanError on a miss or a non-channel)."""
    host, port = split_addr(registry)
    with StoreClient(host, port) as store:
        value = store.lookup(name)
    if value is None:
        raise ChanError(f"no channel registered as {name!r}")
    found = node.import_(term.parse(value))
    if not isinstance(found, (LocalChan, RemoteChan)):
        raise ChanError(f"{name!r} is registered as {value!r}, not a channel")
    return found


def answering(chan: Any) -> Optional[str]:
    """``HOST:PORT`` of a remote channel whose port accepts a connection now (closed at
    once, before a line, which a channel's port takes as nothing), else None."""
    if not isinstance(chan, RemoteChan):
        return None
    try:
        with socket.create_connection((host_name(chan.host), chan.port), timeout=PROBE_TIMEOUT) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except OSError:
        return None


def unregister(registry: str, name: str, value: str) -> bool:
    """Deletes NAME if it is still registered as ``value`` (a later registration by
    another process stays); whether it was deleted."""
    host, port = split_addr(registry)
    with StoreClient(host, port) as store:
        if store.lookup(name) != value.encode():
            return False
        return store.delete(name)


def pong(args: argparse.Namespace, node: Node) -> int:
    # As chan-pingpong: a name whose channel still answers belongs to a live process.
    try:
        taken = lookup(args.registry, args.name, node)
    except ChanError:
        taken = None  # not registered, or not a channel: free
    if taken is not None:
        addr = answering(taken)
        if addr is not None:
            raise ChanError(f"{args.name!r} is registered to a channel at {addr} that still answers; "
                            "stop that process or pick another name")
        print(f"chan.py: pong: {args.name} was registered to a channel that no longer answers; taking it",
              file=sys.stderr, flush=True)
    inbox = node.chan()
    register(args.registry, args.name, inbox, node)
    value = term.format(node.export(inbox))
    print(f"listening on {node.advertise}:{inbox.port}", file=sys.stderr, flush=True)
    try:
        serve_pings(inbox, node)
    finally:
        # Ctrl-C (or SIGTERM, see main): the name is free again, unless someone took it since.
        try:
            unregister(args.registry, args.name, value)
        except (OSError, StoreProtocolError) as exc:
            print(f"chan.py: pong: cannot unregister {args.name}: {exc}", file=sys.stderr)
    return 0


def serve_pings(inbox: LocalChan, node: Node) -> None:
    """Answers every {ping,N,ReplyChan} on ``inbox`` with {pong,N}, for ever."""
    while True:
        msg = inbox.read(node)
        tag = term.tagged(msg)
        if tag and tag[0] == "ping" and len(tag[1]) == 2 and isinstance(tag[1][1], (LocalChan, RemoteChan)):
            n, reply = tag[1]
            try:
                reply.write(node, (Atom("pong"), n))
            except ChanError as exc:
                print(f"chan.py: pong {n}: {exc}", file=sys.stderr)
        else:
            print(f"chan.py: ignoring {msg!r}", file=sys.stderr)


def percentile(ordered: list[float], p: int) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = -(-len(ordered) * p // 100)  # ceil
    return ordered[min(len(ordered), max(1, rank)) - 1]


def ping(args: argparse.Namespace, node: Node) -> int:
    target = lookup(args.registry, args.name, node)
    passed = failed = 0
    round_trips = []
    for n in range(args.count):
        reply = node.chan()
        started = time.perf_counter()
        try:
            target.write(node, (Atom("ping"), n, reply))
            answer = reply.read(node, timeout=args.timeout)
        except ChanError as exc:
            print(f"ping {n}: {exc}", file=sys.stderr)
            failed += 1
            continue
        finally:
            reply.close()
        if answer == (Atom("pong"), n):
            passed += 1
            round_trips.append(time.perf_counter() - started)
        else:
            print(f"ping {n}: unexpected answer {answer!r}", file=sys.stderr)
            failed += 1
    round_trips.sort()
    summary = f"ping {args.name}: {passed} passed, {failed} failed"
    if round_trips:
        summary += "; round trip " + ", ".join(f"p{p} {percentile(round_trips, p) * 1e6:.0f} us" for p in (50, 90, 99))
    print(summary, flush=True)
    return 0 if failed == 0 and passed == args.count else 1


def _interrupted(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Remote channels: ping-pong through the store registry.")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"store server HOST:PORT (default {DEFAULT_REGISTRY})")
    parser.add_argument("--advertise", default="127.0.0.1", help="this node's IPv4 address (default 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for a pong (default 10)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="the role to play")
    p = sub.add_parser("pong", help="register NAME and answer pings",
                       description="Register a channel as NAME and answer every {ping,N,ReplyChan} with {pong,N} until killed. "
                                   "Refuses a NAME whose registered channel still answers; unregisters it on "
                                   "Ctrl-C or SIGTERM.")
    p.add_argument("name", help="the name to register in the store server")
    p = sub.add_parser("ping", help="send COUNT pings to NAME",
                       description="Look NAME up, send COUNT {ping,N,ReplyChan} messages one at a time, check each "
                                   "{pong,N}; exit 1 on any failure.")
    p.add_argument("name", help="the name a pong registered")
    p.add_argument("count", type=int, help="how many pings to send")
    args = parser.parse_args(argv)
    node = Node(args.advertise, args.timeout)
    if args.command == "pong":
        # SIGTERM ends a pong as Ctrl-C does: it unregisters its name on the way out.
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        return pong(args, node) if args.command == "pong" else ping(args, node)
    except (ChanError, OSError, StoreProtocolError, term.TermError) as exc:
        print(f"chan.py: {args.command} {args.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    run_main(main)
