"""Client for the replicated messenger (switchboard's ``messenger-server``); module and CLI.

Protocol (see ``interop/PROTOCOLS.md``, "Messenger"): every message is one ``u32``
frame whose payload starts with a 1-byte operation (client to server) or status
(server to client), followed by ``|``-separated ASCII fields::

    01 NAME[|NONCE]  register      02 NAME[|SESSION]  login    03 PATTERN  search
    04 FROM|TO|ID|TEXT  send       05 NAME  logout       06 NAME     delete
    07  quit                       08 EPOCH.SEQ  confirm (never answered)

    20 ok     21 COUNT:u16 logged in (COUNT message frames follow)
    22 COUNT:u16 NAME|NAME...     30 EPOCH.SEQ|FROM|TEXT  a message
    40 ID  redirect to server ID  41  no primary now     50..5a  a rule broken

Failover: when the connection breaks, times out, or answers 40/41, the client
tries the servers again (a redirect's target first, or after a timeout the
next server, then in id order), logs in again if it was logged in, and resends
the request. Sends carry a random id and registrations a random nonce, so a
resend is never applied twice. Logins carry the client's random session
token, so a login again through another server takes over the session a lost
connection may still hold. A message's number EPOCH.SEQ is unique forever
and increases per recipient within one history; the client drops a number at
or below the highest it has seen of the same epoch (never across epochs: after
a network split a lower epoch is a message of the primary that lost, new to
this client), so each is received once. It confirms the last number received
on its current connection, never one it was not handed there.

CLI, one command per invocation::

    python3 interop/messenger_client.py --servers HOST:PORT,HOST:PORT,... [--timeout 15]
        register NAME          create an account
        send FROM TO TEXT      log in as FROM and send; exit 0 once acknowledged
        inbox NAME             log in, print each pending message as FROM: TEXT in
                               order, confirm them, log out
        search PATTERN         print the matching usernames, one per line

Exit status 0 on success; 1 when the cluster refuses (the rule and its code are
printed on stderr) or no server answers in time.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import struct
import sys
import time
from typing import NamedTuple

from message import FrameReader, FramingError, positive_timeout, run_main, send_message

FRAMING = "u32"
REPLY_TIMEOUT = 3.0
CONNECT_TIMEOUT = 0.3
RETRY_PAUSE = 0.025

REGISTER, LOGIN, SEARCH, SEND, LOGOUT, DELETE, QUIT, CONFIRM = range(1, 9)
OK, LOGGED_IN, FOUND = 0x20, 0x21, 0x22
DELIVER, REDIRECT, UNAVAILABLE = 0x30, 0x40, 0x41

VIOLATIONS = {
    0x50: "malformed request",
    0x51: "a username is 1 to 50 letters and digits",
    0x52: "a message is 1 to 262 printable ASCII characters",
    0x53: "a pattern is 1 to 50 letters, digits and *",
    0x54: "that username is taken",
    0x55: "no such user",
    0x56: "log in first",
    0x57: "log out first",
    0x58: "that account is logged in elsewhere",
    0x59: "that is not the logged-in user",
    0x5A: "no room: the recipient has too many messages waiting, or there are too many accounts",
}


class Refused(Exception):
    """The cluster answered that the request breaks a rule."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"refused: {VIOLATIONS.get(code, 'unknown rule')} ({code:02x})")


class Unavailable(Exception):
    """No primary answered in time."""


class Delivery(NamedTuple):
    """A received message."""

    id: tuple[int, int]  # (epoch, seq)
    sender: str
    text: str


def parse_number(field: str) -> tuple[int, int]:
    """``EPOCH.SEQ`` to (epoch, seq)."""
    epoch, _, seq = field.partition(".")
    if not (epoch.isdigit() and seq.isdigit()):
        raise ValueError(f"{field!r} is not a message number EPOCH.SEQ")
    return int(epoch), int(seq)


def parse_servers(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT,HOST:PORT,...`` to a list of (host, port), in id order."""
    servers = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not HOST:PORT")
        servers.append((host, int(port)))
    return servers


def random_id() -> int:
    """A random nonzero u64 (send ids, register nonces)."""
    return secrets.randbits(64) or 1


class MessengerClient:
    """A failover client of a messenger cluster, one request at a time."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = 15.0, confirm: bool = False) -> None:
        self.servers = servers
        self.timeout = timeout
        self.confirm = confirm  # confirm received messages (they are then no longer kept)
        self.user: str | None = None
        self.received: list[Delivery] = []
        self.seen: dict[int, int] = {}  # epoch -> highest seq received
        self.last_here: tuple[int, int] | None = None  # last number received on this connection
        self.confirmed: tuple[int, int] | None = None
        self.sock: socket.socket | None = None
        self.reader: FrameReader | None = None
        self.server = 0  # the server of the current connection
        self.session = random_id()  # sent with every login: a login again takes the session over

    # --- one connection ---------------------------------------------------------

    def _open(self, server: int) -> bool:
        try:
            sock = socket.create_connection(self.servers[server], timeout=CONNECT_TIMEOUT)
        except OSError:
            return False
        sock.settimeout(REPLY_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.reader = sock, FrameReader(sock, FRAMING)
        self.server = server
        self.last_here = self.confirmed = None
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.reader = None

    def _frame(self) -> bytes:
        assert self.reader is not None
        frame = self.reader.read_frame()
        if not frame:
            raise ConnectionError("connection closed")
        return frame

    def _deliver(self, frame: bytes) -> None:
        field, sender, text = frame[1:].decode("ascii").split("|", 2)
        number = parse_number(field)
        self.last_here = number
        epoch, seq = number
        if seq > self.seen.get(epoch, 0):
            self.seen[epoch] = seq
            self.received.append(Delivery(number, sender, text))

    def _exchange(self, payload: bytes) -> bytes:
        """Send one request and return its reply, taking messages that come first."""
        assert self.sock is not None
        # Not before a login: a confirm from a connection not logged in is ignored.
        if self.confirm and payload[0] != LOGIN and self.user and self.last_here != self.confirmed:
            assert self.last_here is not None
            epoch, seq = self.last_here
            send_message(self.sock, bytes([CONFIRM]) + f"{epoch}.{seq}".encode(), FRAMING)
            self.confirmed = self.last_here
        send_message(self.sock, payload, FRAMING)
        while True:
            frame = self._frame()
            if frame[0] == DELIVER:
                self._deliver(frame)
            elif frame[0] == LOGGED_IN:
                (count,) = struct.unpack(">H", frame[1:3])
                for _ in range(count):
                    self._deliver(self._frame())
                return frame
            else:
                return frame

    # --- failover -----------------------------------------------------------------

    def _connect(self, hint: int | None, deadline: float) -> None:
        while True:
            order = ([hint] if hint is not None else []) + list(range(len(self.servers)))
            hint = None
            for server in order:
                if time.monotonic() >= deadline:
                    raise Unavailable("no server answered in time")
                if not self._open(server):
                    continue
                if self.user is None:
                    return
                try:
                    reply = self._exchange(bytes([LOGIN]) + f"{self.user}|{self.session}".encode())
                except (OSError, FramingError):
                    self.close()
                    continue
                if reply[0] == LOGGED_IN:
                    return
                self.close()
                if reply[0] == REDIRECT:
                    hint = int(reply[1:])
                    break
                if reply[0] == 0x55:
                    self.user = None
                    raise Refused(0x55)
            if hint is None:
                time.sleep(RETRY_PAUSE)

    def request(self, payload: bytes) -> bytes:
        """Send a request to the primary, failing over as needed; return the reply."""
        deadline = time.monotonic() + self.timeout
        hint = None
        while True:
            if time.monotonic() >= deadline:
                raise Unavailable("no server answered in time")
            if self.sock is None:
                self._connect(hint, deadline)
                hint = None
            try:
                reply = self._exchange(payload)
            except socket.timeout:
                # Possibly hung: its kernel still accepts connections, so starting again
                # from server 0 could find it first every time. Try the next one first.
                hint = (self.server + 1) % len(self.servers)
                self.close()
                continue
            except (OSError, FramingError):
                self.close()
                continue
            if reply[0] == REDIRECT:
                self.close()
                hint = int(reply[1:])
            elif reply[0] == UNAVAILABLE:
                self.close()
                time.sleep(RETRY_PAUSE)
            else:
                return reply

    # --- operations ---------------------------------------------------------------

    @staticmethod
    def _ok(reply: bytes) -> None:
        if reply[0] != OK:
            raise Refused(reply[0])

    def register(self, name: str) -> None:
        self._ok(self.request(bytes([REGISTER]) + f"{name}|{random_id()}".encode()))

    def login(self, name: str) -> int:
        """Log in; pending messages are appended to ``received``. Returns their count."""
        if self.user != name:
            self.seen = {}
        reply = self.request(bytes([LOGIN]) + f"{name}|{self.session}".encode())
        if reply[0] != LOGGED_IN:
            raise Refused(reply[0])
        self.user = name
        (count,) = struct.unpack(">H", reply[1:3])
        return count

    def send(self, to: str, text: str) -> None:
        assert self.user is not None, "log in first"
        self._ok(self.request(bytes([SEND]) + f"{self.user}|{to}|{random_id()}|{text}".encode()))

    def search(self, pattern: str) -> list[str]:
        reply = self.request(bytes([SEARCH]) + pattern.encode())
        if reply[0] != FOUND:
            raise Refused(reply[0])
        (count,) = struct.unpack(">H", reply[1:3])
        return reply[3:].decode("ascii").split("|") if count else []

    def logout(self) -> None:
        """Log out (confirming, first, every message received, if ``confirm``)."""
        assert self.user is not None, "log in first"
        self._ok(self.request(bytes([LOGOUT]) + self.user.encode()))
        self.user = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Client for the replicated messenger.")
    parser.add_argument("--servers", type=parse_servers, required=True, help="HOST:PORT of every server, by id")
    parser.add_argument("--timeout", type=positive_timeout, default=15.0,
                        help="seconds a command may take, failovers included, before giving up (default: 15)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    register = commands.add_parser("register", help="create an account", description="Create the account NAME.")
    register.add_argument("name", help="the account name")
    send = commands.add_parser("send", help="log in as SENDER and send TEXT to TO",
                               description="Log in as SENDER, send TEXT to TO (kept for TO while away), log out.")
    send.add_argument("sender", help="the account to send from")
    send.add_argument("to", help="the account to send to")
    send.add_argument("text", help="the message")
    inbox = commands.add_parser("inbox", help="log in as NAME and print the waiting messages",
                                description="Log in as NAME, print each waiting message as 'SENDER: TEXT', log out.")
    inbox.add_argument("name", help="the account")
    search = commands.add_parser("search", help="print the account names matching PATTERN",
                                 description="Print the account names matching PATTERN, one a line.")
    search.add_argument("pattern", help="a name pattern; * matches any run of characters")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = MessengerClient(args.servers, args.timeout, confirm=args.command == "inbox")
    try:
        if args.command == "register":
            client.register(args.name)
        elif args.command == "send":
            client.login(args.sender)
            client.send(args.to, args.text)
        elif args.command == "inbox":
            client.login(args.name)
            # The logout's reply comes after the confirm is committed: nothing printed
            # below is handed over again, and a failover before it only repeats the
            # hand-over, whose duplicates the client drops.
            client.logout()
            for d in client.received:
                print(f"{d.sender}: {d.text}")
        elif args.command == "search":
            for name in client.search(args.pattern):
                print(name)
    except (Refused, Unavailable) as e:
        print(f"messenger_client: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    run_main(main)
