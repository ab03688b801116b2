#!/usr/bin/env python3
"""Counts the instructions a store server spends per request, under callgrind.

Timing on a shared machine moves with everyone else's load; instruction counts do not. This
starts the server (store-server, or the design's floor: `store-bench --floor`) under
`valgrind --tool=callgrind`, drives it with `store-bench` (16 connections, GET only unless
`--ratio` says otherwise, the given pipeline depth), stops it, and prints the server's
user-space instructions divided by the replies it wrote. With SETs in the load (`--ratio`)
it divides by the operations the generator counted instead (a store's value is copied with
`memcpy` too); a `store` has no reply, so the generator closes a batch that ends in one with
a lookup, which the floor answers while it ignores the store.

Requests are counted in the server, not by the generator (whose measured window misses the
batches in flight at its ends): both servers copy each reply (or its value) into the output
buffer with one call to `memcpy`, so the number of those calls is the number of replies.

    cargo build --release
    python3 interop/profile_store.py                       # the store, pipeline 32
    python3 interop/profile_store.py --floor               # the floor
    python3 interop/profile_store.py --floor --calibrate hash,spin=20   # the floor plus work
    python3 interop/profile_store.py --server OLD/store-server --pipeline 1
    python3 interop/profile_store.py --pipeline 1 --ratio 0:1          # SET only, depth 1
    python3 interop/profile_store.py --keep /tmp/cg.out && callgrind_annotate /tmp/cg.out
    python3 interop/profile_store.py --pipeline 1 --ratio 0:1 --cache-sim   # cache model too

`--cache-sim` runs callgrind's cache model with small caches (4 KiB L1i and L1d, 64 KiB last
level: what the kernel's path between two requests leaves warm, roughly) and also prints,
per operation, the L1i and L1d misses and the server's hot lines of code: distinct 64-byte
lines holding an instruction run at least 0.3 times per operation. The misses move with
where the linker put the code (a 4-way cache has few places for each line); the hot lines
do not.

Needs valgrind. Exits non-zero when a run fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from bench_store import floor_work, free_port, wait_listening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CACHE_SIM = ["--cache-sim=yes", "--I1=4096,4,64", "--D1=4096,4,64", "--LL=65536,4,64",
             "--dump-instr=yes"]


def position(token: str, current: int) -> int:
    """An address or line of a callgrind cost line: absolute, `+N`/`-N` relative, or `*`."""
    if token == "*":
        return current
    if token[0] in "+-":
        return current + int(token, 0)
    return int(token, 0)


def instruction_runs(path: str) -> tuple[dict[int, int], dict[int, str]]:
    """How many times each instruction ran, by address, from a callgrind output file with
    instruction addresses (`--dump-instr=yes`); and the function each address is in."""
    runs: dict[int, int] = {}
    where: dict[int, str] = {}
    names: dict[str, str] = {}
    function = ""
    addr, after_call = 0, False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^(c?)fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                if m.group(3) is not None:
                    names[m.group(2)] = m.group(3)
                if not m.group(1):
                    function = names.get(m.group(2), "")
                continue
            if line.startswith("calls="):
                after_call = True  # the next cost line is the call's, inclusive
                continue
            if not line or line[0] not in "0+-*":
                continue
            fields = line.split()
            addr = position(fields[0], addr)
            if after_call:
                after_call = False
                continue
            if len(fields) >= 3:
                runs[addr] = runs.get(addr, 0) + int(fields[2])
                where[addr] = function
    return runs, where


def hot_lines(runs: dict[int, int], per: int) -> int:
    """Distinct 64-byte lines of code holding an instruction run at least 0.3 times per
    operation (`per` operations in all)."""
    return len({a // 64 for a, n in runs.items() if n >= 0.3 * per})


def hot_lines_by_function(runs: dict[int, int], where: dict[int, str], per: int) -> list[tuple[int, str]]:
    """[`hot_lines`] by the function holding them (inlined code counts as its caller's),
    most first."""
    lines: dict[str, set[int]] = {}
    for a, n in runs.items():
        if n >= 0.3 * per:
            lines.setdefault(where.get(a, ""), set()).add(a // 64)
    return sorted(((len(v), k) for k, v in lines.items()), reverse=True)


def callgrind_counts(path: str) -> tuple[list[int], int]:
    """Totals of every event (instructions first), and calls to memcpy, from a callgrind
    output file."""
    names: dict[str, str] = {}
    total = None
    memcpy_calls = 0
    callee = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                if m.group(2) is not None:
                    names[m.group(1)] = m.group(2)
                if line.startswith("cfn="):
                    callee = names.get(m.group(1), "")
                continue
            if line.startswith("calls="):
                if "memcpy" in callee:
                    memcpy_calls += int(line[6:].split()[0])
                continue
            m = re.match(r"^(?:summary|totals): ([\d ]+)", line)
            if m:
                total = [int(x) for x in m.group(1).split()]
    if total is None:
        raise RuntimeError(f"no totals in {path}")
    return total, memcpy_calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=os.path.join(ROOT, "target/release/store-server"),
                    help="the store-server binary (default: target/release/store-server)")
    ap.add_argument("--bench", default=os.path.join(ROOT, "target/release/store-bench"),
                    help="the store-bench binary (default: target/release/store-bench)")
    ap.add_argument("--floor", action="store_true",
                    help="profile the floor (store-bench --floor) instead of the store")
    ap.add_argument("--calibrate", metavar="WORK",
                    help="with --floor: the floor does WORK per request, as bench_store.py's "
                         "--calibrate (spin=N, hash, share, code=N, or several, comma-separated)")
    ap.add_argument("--pipeline", type=int, default=32, help="requests per batch (default 32)")
    ap.add_argument("--conns", type=int, default=16, help="connections (default 16)")
    ap.add_argument("--ratio", default="1:0",
                    help="GET:SET weights (default 1:0). A batch that ends in a store is closed "
                         "by one lookup, so at depth 1 every operation has one reply")
    ap.add_argument("--duration", type=int, default=4, help="seconds of load (default 4)")
    ap.add_argument("--cache-sim", action="store_true",
                    help="also simulate small caches; print misses and hot lines of code per "
                         "operation, and those lines by function")
    ap.add_argument("--keep", metavar="FILE",
                    help="also copy callgrind's output here (for callgrind_annotate)")
    args = ap.parse_args()
    work: list[str] = []
    if args.calibrate:
        if not args.floor:
            ap.error("--calibrate needs --floor")
        try:
            work = floor_work(args.calibrate)
        except ValueError as e:
            ap.error(f"--calibrate {args.calibrate}: {e}")

    port = free_port()
    addr = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        server = ([args.bench, "--floor", addr, *work] if args.floor
                  else [args.server, "--listen", addr])
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", *(CACHE_SIM if args.cache_sim else []),
             f"--callgrind-out-file={out}", *server],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc, timeout=60.0)
            bench = subprocess.run(
                [args.bench, "--addr", addr, "--conns", str(args.conns),
                 "--pipeline", str(args.pipeline), "--duration", str(args.duration),
                 "--ratio", args.ratio, "--warmup", "0"],
                capture_output=True, text=True, timeout=args.duration + 120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        if bench.returncode != 0:
            print(bench.stdout + bench.stderr, file=sys.stderr)
            return 1
        events, replies = callgrind_counts(out)
        total = events[0]
        if args.keep:
            shutil.copyfile(out, args.keep)
        # The cache model's events, in callgrind's order: Ir Dr Dw I1mr D1mr D1mw ILmr ...
        cache = (events[3:6], instruction_runs(out)) if args.cache_sim and len(events) >= 6 else None
    # The generator counts only its measured window, so it sees a little less; far less
    # (or more) means the memcpy calls no longer count replies.
    rate = re.search(r"ops_per_sec=(\d+)", bench.stdout)
    counted = int(rate.group(1)) * args.duration if rate else 0
    name = (f"floor ({args.calibrate})" if args.calibrate else "floor") if args.floor else args.server
    if not args.ratio.endswith(":0"):
        # A store copies its value with memcpy too: count the generator's operations
        # instead (its window misses the few in flight at its ends, under 1% here).
        if counted == 0:
            print("the generator reported no operations", file=sys.stderr)
            return 1
        print(f"{name}: pipeline {args.pipeline}, {args.conns} conns, ratio {args.ratio}: "
              f"{total:,} instructions / {counted:,} operations (the generator's count) = "
              f"{total / counted:.1f} per operation")
        print_cache(cache, counted)
        return 0
    if not 0.8 * replies <= counted <= 1.05 * replies:
        print(f"the server's {replies:,} memcpy calls do not match the {counted:,} requests "
              "the generator counted: they no longer count replies", file=sys.stderr)
        return 1
    print(f"{name}: pipeline {args.pipeline}, {args.conns} conns, ratio {args.ratio}: {total:,} instructions / "
          f"{replies:,} replies = {total / replies:.1f} per request")
    print_cache(cache, replies)
    return 0


def print_cache(cache, per: int) -> None:
    """With `--cache-sim`: misses and hot lines of code per operation (`per` of them)."""
    if cache is None:
        return
    (i1, d1r, d1w), (runs, where) = cache
    print(f"  per operation: {i1 / per:.1f} L1i misses, {d1r / per:.1f} + {d1w / per:.1f} L1d "
          f"misses (read + write), {hot_lines(runs, per)} hot lines of code")
    for n, function in hot_lines_by_function(runs, where, per):
        # Symbols can be long (generic parameters): their last 100 characters name them.
        print(f"    {n:4} {function[-100:]}")


if __name__ == "__main__":
    sys.exit(main())
