"""Conformance checker for any server of the classic store protocol.

Run by the Rust integration tests against the Rust server (and usable
against ``store_server.py`` or the course's servers)::

    python3 interop/store_check.py [--host 127.0.0.1] [--port 65002]
        [--framing line] [--timeout 10] [--only NAME ...] [--list]

Prints one line per check (``PASS name (N ms)``, ``FAIL name: why`` or
``skip name: why``) and a final line exactly ``N passed, M failed``; exit
status 1 if any check failed.  Keys carry a random prefix, so the checker can
run against a server that already holds data, and several checkers can run
at once.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from message import (
    FRAMINGS,
    MAX_PAYLOAD,
    add_addr_argument,
    add_framing_argument,
    encode,
    port_number,
    positive_timeout,
    run_main,
)
from store_client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    StoreClient,
    build_delete,
    build_lookup,
    build_store,
    connect,
    oneshot_lookup,
    oneshot_request,
    oneshot_store,
)

SIZE_PREFIXED = tuple(f for f in FRAMINGS if f != "line")


class CheckFailed(Exception):
    """A check saw something other than what the protocol requires."""


class Skip(Exception):
    """The check does not apply (e.g. to this framing)."""


@dataclass
class Ctx:
    """What every check needs: where the server is and a key namespace."""

    host: str
    port: int
    framing: str
    timeout: float
    prefix: str = field(default_factory=lambda: f"chk{secrets.token_hex(4)}")
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def key(self, name: str) -> bytes:
        """A fresh key, unique to this run: ``chkXXXXXXXX-name-N``."""
        with self._lock:
            self._counter += 1
            return f"{self.prefix}-{name}-{self._counter}".encode()

    def client(self, bytewise: bool = False) -> StoreClient:
        return StoreClient(self.host, self.port, self.framing, self.timeout, bytewise=bytewise)


def short(data: object, limit: int = 60) -> str:
    """repr() shortened for one-line messages."""
    text = repr(data)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(data) if isinstance(data, (bytes, list)) else '?'} long)"
    return text


def expect(actual: object, expected: object, what: str) -> None:
    """Raise CheckFailed unless actual == expected."""
    if actual != expected:
        raise CheckFailed(f"{what}: expected {short(expected)}, got {short(actual)}")


def just(value: bytes) -> bytes:
    return b"{just," + value + b"}"


def large_value(framing: str, key: bytes) -> bytes:
    """100 KiB, or for u16 the largest value whose store request still fits."""
    size = 100 * 1024
    limit = MAX_PAYLOAD[framing]
    if limit is not None:
        size = min(size, limit - len(build_store(key, b"")))
    return (b"0123456789,{abc} \t" * (size // 18 + 1))[:size]


CHECKS: list[tuple[str, Callable[[Ctx], None]]] = []


def check(name: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Register a check under ``name`` (run in registration order)."""

    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CHECKS.append((name, fn))
        return fn

    return register


@check("oneshot-store-then-lookup")
def _oneshot(ctx: Ctx) -> None:
    """Erlang-style: store connects, sends, closes; the next lookup sees the value.

    Repeated, because a server that serves each connection independently
    races here: the lookup's connection may be served before the store's
    bytes (already delivered) were read.  On a miss the value is polled for a
    second to tell "late" from "lost".
    """
    for i in range(10):
        key, value = ctx.key("oneshot"), f"v{i},{{x}}".encode()
        oneshot_store(ctx.host, ctx.port, key, value, ctx.framing, ctx.timeout)
        got = oneshot_lookup(ctx.host, ctx.port, key, ctx.framing, ctx.timeout)
        if got == value:
            continue
        start = time.monotonic()
        while time.monotonic() - start < 1.0 and got != value:
            time.sleep(0.01)
            got = oneshot_lookup(ctx.host, ctx.port, key, ctx.framing, ctx.timeout)
        if got == value:
            raise CheckFailed(
                f"lookup right after one-shot store #{i} missed the value; it appeared "
                f"{(time.monotonic() - start) * 1000:.0f} ms later (store of a closed connection applied late)"
            )
        expect(got, value, f"lookup after one-shot store #{i}")


@check("lookup-missing")
def _missing(ctx: Ctx) -> None:
    reply = oneshot_request(ctx.host, ctx.port, build_lookup(ctx.key("missing")), ctx.framing, ctx.timeout)
    expect(reply, b"nothing", "one-shot lookup of a missing key")
    with ctx.client() as c:
        expect(c.raw(build_lookup(ctx.key("missing"))), b"nothing", "lookup of a missing key")


@check("persistent-100-mixed")
def _persistent(ctx: Ctx) -> None:
    rng = random.Random(1)
    keys = [ctx.key("mixed") for _ in range(10)]
    model: dict[bytes, bytes] = {}
    with ctx.client() as c:
        for i in range(100):
            key = rng.choice(keys)
            op = rng.random()
            if op < 0.4:
                value = f"value-{i},{{{rng.random()}}}".encode()
                c.store(key, value)
                model[key] = value
            elif op < 0.85:
                expect(c.raw(build_lookup(key)), just(model[key]) if key in model else b"nothing", f"request {i} (lookup)")
            else:
                expect(c.raw(build_delete(key)), b"ok" if model.pop(key, None) is not None else b"nothing", f"request {i} (delete)")


@check("pipeline-500")
def _pipeline(ctx: Ctx) -> None:
    rng = random.Random(2)
    keys = [ctx.key("pipe") for _ in range(50)]
    model: dict[bytes, bytes] = {}
    requests: list[bytes] = []
    expected: list[bytes] = []
    for i in range(500):
        key = rng.choice(keys)
        if i % 2 == 0:
            value = f"p{i},{{{'x' * rng.randrange(40)}}}".encode()
            requests.append(build_store(key, value))
            model[key] = value
        else:
            requests.append(build_lookup(key))
            expected.append(just(model[key]) if key in model else b"nothing")
    with ctx.client() as c:
        replies = c.pipeline(requests)
        expect(len(replies), len(expected), "number of replies")
        for i, (got, want) in enumerate(zip(replies, expected)):
            expect(got, want, f"pipelined reply {i}")
        expect(c.lookup(keys[0]), model.get(keys[0]), "lookup after the pipeline")


AWKWARD_VALUES: list[bytes] = [
    b"a,b,c",
    b",",
    b",,",
    b"{}",
    b"{",
    b"}",
    b"{just,x}",
    b"nothing",
    b"{error,unknown_verb}",
    b"with space",
    b"  leading and trailing  ",
    b"tab\there",
    "héllo ✓".encode(),
    b"\xff\xfe",
    b"bad utf8 \xc3\x28 \x80",
    b"",
    b"{remote_chan,{127,0,0,1},40123}",
    b"[104,105]",
    b'"quoted \\"string\\""',
    b"mid\rcarriage",
]
SIZE_PREFIXED_VALUES: list[bytes] = [
    b"line1\nline2",
    b"\n",
    b"\r\n",
    b"ends with cr\r",
    b"\x00",
    b"nul\x00inside",
    bytes(range(256)),
]


@check("awkward-values")
def _awkward(ctx: Ctx) -> None:
    values = list(AWKWARD_VALUES)
    if ctx.framing in SIZE_PREFIXED:
        values += SIZE_PREFIXED_VALUES
    with ctx.client() as c:
        pairs = [(ctx.key("awk"), v) for v in values]
        big_key = ctx.key("big")
        pairs.append((big_key, large_value(ctx.framing, big_key)))
        for key, value in pairs:
            c.store(key, value)
            expect(c.raw(build_lookup(key)), just(value), f"value {short(value, 30)}")
        # Also read back from a fresh connection: nothing tied to the writer.
    with ctx.client() as c:
        for key, value in pairs:
            expect(c.lookup(key), value, f"value {short(value, 30)} from a new connection")


@check("awkward-keys")
def _awkward_keys(ctx: Ctx) -> None:
    suffixes = [b"with space", b"{brace}", "clé✓".encode(), b"\xff\xfe", b"tab\tkey", b"store", b"lookup"]
    with ctx.client() as c:
        for i, suffix in enumerate(suffixes):
            key = ctx.key("k") + b"-" + suffix
            c.store(key, b"v%d" % i)
            expect(c.lookup(key), b"v%d" % i, f"lookup of key {short(key, 40)}")


@check("overwrite")
def _overwrite(ctx: Ctx) -> None:
    key = ctx.key("over")
    with ctx.client() as c:
        for value in (b"first", b"second, longer value", b"", b"last"):
            c.store(key, value)
            expect(c.lookup(key), value, f"lookup after storing {short(value)}")
    expect(oneshot_lookup(ctx.host, ctx.port, key, ctx.framing, ctx.timeout), b"last", "one-shot lookup after overwrites")


@check("delete")
def _delete(ctx: Ctx) -> None:
    key = ctx.key("del")
    with ctx.client() as c:
        c.store(key, b"doomed")
        expect(c.raw(build_delete(key)), b"ok", "delete of a present key")
        expect(c.raw(build_lookup(key)), b"nothing", "lookup after delete")
        expect(c.raw(build_delete(key)), b"nothing", "second delete")
        c.store(key, b"reborn")
        expect(c.lookup(key), b"reborn", "store after delete")


@check("unknown-verb")
def _unknown_verb(ctx: Ctx) -> None:
    key = ctx.key("uv")
    with ctx.client() as c:
        c.store(key, b"still here")
        expect(c.raw(b"frobnicate," + key), b"{error,unknown_verb}", "reply to an unknown verb")
        expect(c.lookup(key), b"still here", "lookup on the same connection afterwards")


@check("missing-value")
def _missing_value(ctx: Ctx) -> None:
    key = ctx.key("mv")
    with ctx.client() as c:
        expect(c.raw(b"store," + key), b"{error,missing_value}", "reply to store without a value")
        expect(c.raw(build_lookup(key)), b"nothing", "lookup of that key")
        c.store(key, b"ok now")
        expect(c.lookup(key), b"ok now", "store/lookup on the same connection afterwards")


@check("stats")
def _stats(ctx: Ctx) -> None:
    with ctx.client() as c:
        reply = c.raw(b"stats")
        if not (reply.startswith(b"{stats,[") and reply.endswith(b"]}")):
            raise CheckFailed(f"stats reply is not {{stats,[...]}}: {short(reply)}")
        key = ctx.key("st")
        c.store(key, b"x")
        expect(c.lookup(key), b"x", "lookup after stats")


@check("crlf-line-endings")
def _crlf(ctx: Ctx) -> None:
    if ctx.framing != "line":
        raise Skip("line framing only")
    key = ctx.key("crlf")
    with ctx.client() as c:
        c.send(build_store(key, b"v") + b"\r")  # sent as ...\r\n
        expect(c.raw(build_lookup(key) + b"\r"), just(b"v"), "CRLF lookup of a CRLF store")
        expect(c.raw(build_lookup(key)), just(b"v"), "LF lookup of a CRLF store")


@check("seed-bytewise-client")
def _bytewise(ctx: Ctx) -> None:
    if ctx.framing != "line":
        raise Skip("line framing only")
    with ctx.client(bytewise=True) as c:
        for i in range(20):
            key = ctx.key("bw")
            c.store(key, f"bytewise {i}".encode())
            expect(c.lookup(key), f"bytewise {i}".encode(), f"lookup {i}")
        expect(c.lookup(ctx.key("bw-missing")), None, "lookup of a missing key")
        keys = [ctx.key("bwp") for _ in range(10)]
        replies = c.pipeline([r for k in keys for r in (build_store(k, k), build_lookup(k))])
        expect(replies, [just(k) for k in keys], "pipelined replies read byte by byte")


@check("torn-last-line-not-applied")
def _torn(ctx: Ctx) -> None:
    whole, torn = ctx.key("whole"), ctx.key("torn")
    data = encode(ctx.framing, build_store(whole, b"complete")) + encode(ctx.framing, build_store(torn, b"cut off"))
    with connect(ctx.host, ctx.port, ctx.timeout) as sock:
        sock.sendall(data[:-1])  # the last frame lacks its final byte
    time.sleep(0.2)  # let the server see the close before we look
    with ctx.client() as c:
        expect(c.lookup(whole), b"complete", "the complete request before the torn one")
        reply = c.raw(build_lookup(torn))
        if reply != b"nothing":
            raise CheckFailed(f"torn request was applied: lookup gave {short(reply)}")


@check("concurrent-20x50")
def _concurrent(ctx: Ctx) -> None:
    errors: list[str] = []

    def worker(t: int) -> None:
        try:
            with ctx.client() as c:
                base = ctx.key(f"t{t}")
                for i in range(50):
                    key = base + b"-%d" % i
                    value = b"thread %d, pair %d" % (t, i)
                    c.store(key, value)
                    got = c.lookup(key)
                    if got != value:
                        errors.append(f"thread {t} pair {i}: expected {value!r}, got {got!r}")
                        return
        except Exception as exc:  # reported below
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(ctx.timeout * 3)
    if any(th.is_alive() for th in threads):
        raise CheckFailed("some client threads did not finish")
    if errors:
        raise CheckFailed(f"{len(errors)} thread(s) failed, first: {errors[0]}")


def run_checks(ctx: Ctx, only: list[str] | None = None) -> tuple[int, int]:
    """Run the battery, print one line per check; return (passed, failed)."""
    passed = failed = 0
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        start = time.monotonic()
        try:
            fn(ctx)
        except Skip as exc:
            print(f"skip {name}: {exc}", flush=True)
            continue
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {name}: {exc}", flush=True)
            continue
        except Exception as exc:  # timeouts, refused connections, protocol errors
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        passed += 1
        print(f"PASS {name} ({(time.monotonic() - start) * 1000:.0f} ms)", flush=True)
    return passed, failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Conformance checks for a store protocol server.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    add_addr_argument(parser, "server address")
    add_framing_argument(parser, "line")
    parser.add_argument("--timeout", type=positive_timeout, default=10.0, help="socket timeout in seconds (default: 10)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this check (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the check names and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name for name, _ in CHECKS]
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        parser.error(f"unknown check(s): {', '.join(unknown)} (see --list)")
    ctx = Ctx(args.host, args.port, args.framing, args.timeout)
    passed, failed = run_checks(ctx, args.only)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
