"""Client for the chat protocol (``chat-server``); importable module and CLI.

Protocol (line framing, one Erlang term per line; see PROTOCOLS.md, "Chat")::

    {client_join_req,Name}   -> {join,Name} to everyone, this client included
    {send,Name,Text}         -> {message,Name,Text} to everyone, this client included
    {client_leave_req,Name}  -> {leave,Name} to everyone else; exit to this client, then close
    servers                  -> {servers,["host:port",...]}
    who                      -> {clients,["Name",...]}
    anything refused         -> {error,Reason}

Interactive (the seed's client)::

    python3 interop/chat_client.py --name NAME [--host 127.0.0.1] [--port 65003]

Every line typed is sent; ``exit`` (or end of input) leaves.  Events print as
``[JOIN] Name joined the chat``, ``[LEAVE] Name left``, ``[Name] text``.

Scripted (for tests), when any of --send-count, --expect or --wait-join is given:

1. join as NAME, and see the server announce it;
2. wait for ``{join,N}`` of every ``--wait-join N``;
3. send ``--send-count K`` messages, ``NAME 1`` .. ``NAME K``;
4. read until every ``--expect SENDER=COUNT`` is met: COUNT messages
   ``SENDER 1`` .. ``SENDER COUNT``, each once, in that order;
5. leave, and see ``exit`` and the close.

It prints one line per check and ``N passed, M failed``, and exits 1 on any
failure, ``{error,...}`` reply or timeout.  ``--codes`` sends names and texts
as character-code lists (``[104,105]``), as an Erlang client writing ``~w`` does.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
from typing import Iterable, Optional

import term
from message import FrameReader, add_addr_argument, port_number, positive_timeout, run_main, send_message
from term import Atom

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65003
MAX_LINE = 64 * 1024


class ChatError(Exception):
    """The server sent something this client did not expect."""


def text_term(text: str, codes: bool = False) -> term.Term:
    """``text`` as a string, or as a character-code list."""
    return [ord(c) for c in text] if codes else text


def event_of(line: bytes) -> tuple:
    """A server line as a tuple: ("join", name), ("leave", name),
    ("message", name, text), ("exit",), ("error", reason), ("servers", [addr])
    or ("clients", [name])."""
    value = term.parse(line)
    if value == Atom("exit") and isinstance(value, Atom):
        return ("exit",)
    tagged = term.tagged(value)
    if tagged is None:
        raise ChatError(f"unexpected line {line!r}")
    tag, rest = tagged
    texts = [term.as_text(v) for v in rest]
    if tag in ("join", "leave") and len(rest) == 1 and texts[0] is not None:
        return (tag, texts[0])
    if tag == "message" and len(rest) == 2 and None not in texts:
        return (tag, texts[0], texts[1])
    if tag == "error" and len(rest) == 1:
        return (tag, texts[0] if texts[0] is not None else term.format(rest[0]))
    if tag in ("servers", "clients") and len(rest) == 1 and isinstance(rest[0], list):
        return (tag, [term.as_text(a) for a in rest[0]])
    raise ChatError(f"unexpected line {line!r}")


def display(event: tuple) -> str:
    """How the seed's client prints an event."""
    kind = event[0]
    if kind == "join":
        return f"[JOIN] {event[1]} joined the chat"
    if kind == "leave":
        return f"[LEAVE] {event[1]} left"
    if kind == "message":
        text = event[2][:-1] if event[2].endswith("\n") else event[2]
        return f"[{event[1]}] {text}"
    if kind == "exit":
        return "[EXIT] left the chat"
    if kind == "error":
        return f"[ERROR] {event[1]}"
    return f"[{kind.upper()}] " + ", ".join(event[1])


class ChatClient:
    """One connection to a chat server."""

    def __init__(self, host: str, port: int, timeout: Optional[float], codes: bool = False) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = FrameReader(self.sock, "line", max_frame=MAX_LINE)
        self.codes = codes

    def close(self) -> None:
        self.sock.close()

    def request(self, value: term.Term) -> None:
        send_message(self.sock, term.format(value).encode("utf-8"), "line")

    def join(self, name: str) -> None:
        self.request((Atom("client_join_req"), text_term(name, self.codes)))

    def send(self, name: str, text: str) -> None:
        self.request((Atom("send"), text_term(name, self.codes), text_term(text, self.codes)))

    def leave(self, name: str) -> None:
        self.request((Atom("client_leave_req"), text_term(name, self.codes)))

    def next_event(self) -> Optional[tuple]:
        """The next line as an event tuple; None once the server has closed."""
        line = self.reader.read_frame()
        return None if line is None else event_of(line)


class Checks:
    """Counts passed and failed checks and prints each."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        return ok


def parse_expect(text: str) -> tuple[str, int]:
    """argparse type for ``--expect SENDER=COUNT``."""
    sender, sep, count = text.rpartition("=")
    if not sep or not sender or not count.isdigit():
        raise argparse.ArgumentTypeError("expected SENDER=COUNT")
    return sender, int(count)


def run_script(
    client: ChatClient,
    name: str,
    send_count: int,
    expect: Iterable[tuple[str, int]],
    wait_join: Iterable[str],
) -> Checks:
    checks = Checks()
    expected = dict(expect)
    waiting = set(wait_join)
    received: dict[str, int] = {}
    errors: list[str] = []

    def absorb(event: tuple) -> None:
        """Records one event; checks message order as it goes."""
        if event[0] == "join":
            waiting.discard(event[1])
        elif event[0] == "error":
            errors.append(event[1])
        elif event[0] == "message":
            sender, text = event[1], event[2]
            count = received.get(sender, 0) + 1
            received[sender] = count
            if sender in expected and text != f"{sender} {count}":
                checks.check(False, f"message {count} from {sender} is {text!r}, not {sender} {count!r}")

    try:
        client.join(name)
        first = client.next_event()
        if not checks.check(first == ("join", name), f"joined as {name} (got {first})"):
            return checks
        while waiting:
            event = client.next_event()
            if event is None:
                checks.check(False, "server closed while waiting for joins")
                return checks
            absorb(event)
        checks.check(True, f"saw the joins of {', '.join(sorted(set(wait_join))) or 'nobody'}")
        for i in range(1, send_count + 1):
            client.send(name, f"{name} {i}")
        checks.check(True, f"sent {send_count} messages")
        while any(received.get(s, 0) < n for s, n in expected.items()):
            event = client.next_event()
            if event is None:
                break
            absorb(event)
        client.leave(name)
        while True:
            event = client.next_event()
            if event is None or event == ("exit",):
                break
            absorb(event)
        checks.check(event == ("exit",), "exit after the leave request")
        checks.check(client.next_event() is None, "connection closed after exit")
    except (OSError, term.TermError, ChatError) as e:
        checks.check(False, f"{type(e).__name__}: {e}")
    for sender, count in sorted(expected.items()):
        got = received.get(sender, 0)
        checks.check(got == count, f"{count} messages from {sender}, each once, in order (got {got})")
    checks.check(not errors, f"no error replies ({errors})")
    return checks


def run_interactive(client: ChatClient, name: str) -> int:
    client.join(name)
    # Until the server announces this join, nothing else is due; a refusal ({error,name_taken})
    # ends the session here, as chat-client does, instead of a prompt whose every line would
    # be answered {error,not_joined}.
    while True:
        event = client.next_event()
        if event is None:
            print(f"chat_client.py: the server closed the connection before admitting {name}", file=sys.stderr)
            return 1
        if event[0] == "error":
            print(f"chat_client.py: the server refused to admit {name}: {event[1]}", file=sys.stderr)
            return 1
        print(display(event), flush=True)
        if event == ("join", name):
            break

    def printer() -> None:
        try:
            while True:
                event = client.next_event()
                print(display(event) if event else "[CLOSED] the server closed the connection", flush=True)
                if event is None or event == ("exit",):
                    return
        except (OSError, term.TermError, ChatError) as e:
            print(f"[CLOSED] {e}", flush=True)

    thread = threading.Thread(target=printer, daemon=True)
    thread.start()
    # Input is read on a thread of its own, so a server that closes the connection ends
    # the client at once (exit status 1, as chat-client), not at the next line typed.
    lines: queue.Queue[Optional[str]] = queue.Queue()

    def typist() -> None:
        for typed in sys.stdin:
            lines.put(typed.rstrip("\r\n"))
        lines.put(None)

    threading.Thread(target=typist, daemon=True).start()
    try:
        while thread.is_alive():
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None or line == "exit":
                client.leave(name)
                thread.join()
                return 0
            client.send(name, line)
    except OSError:
        thread.join()
    print("chat_client.py: the server closed the connection", file=sys.stderr)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    add_addr_argument(parser)
    parser.add_argument("--name", required=True, help="the name to join as")
    parser.add_argument("--timeout", type=positive_timeout, default=10.0,
                        help="seconds to wait for each line from the server, scripted mode only (default: 10)")
    parser.add_argument("--codes", action="store_true",
                        help="send names and texts as character-code lists ([104,105]), as an Erlang ~w client does")
    parser.add_argument("--send-count", type=int, default=None, metavar="K",
                        help="scripted: send K messages, 'NAME 1' .. 'NAME K'")
    parser.add_argument("--expect", type=parse_expect, action="append", default=[], metavar="SENDER=COUNT",
                        help="scripted: read until COUNT messages from SENDER arrived, each once, in order (repeatable)")
    parser.add_argument("--wait-join", action="append", default=[], metavar="NAME",
                        help="scripted: wait for NAME to join before sending (repeatable)")
    args = parser.parse_args(argv)
    scripted = args.send_count is not None or args.expect or args.wait_join
    client = ChatClient(args.host, args.port, args.timeout if scripted else None, args.codes)
    try:
        if not scripted:
            return run_interactive(client, args.name)
        checks = run_script(client, args.name, args.send_count or 0, args.expect, args.wait_join)
    finally:
        client.close()
    print(f"{checks.passed} passed, {checks.failed} failed", flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    run_main(main)
