#!/usr/bin/env python3
"""Runs the store benchmark table: store-server vs memcached vs interop/store_server.py.

Every figure comes from the project's own load generator (`store-bench`); this script only
starts the servers, alternates them run by run (so slow drift on a noisy machine hits all of
them alike), repeats each scenario, and prints medians as a Markdown table.

    cargo build --release
    python3 interop/bench_store.py --reps 3 --duration 3
    python3 interop/bench_store.py --no-python --floor --baseline OLD/store-server --scenarios bdf

`--floor` adds the design's floor (`store-bench --floor`: a bare thread-per-connection loop
with the store's replies and no map, no lock), and the table gains two columns of CPU per
operation against it: the ratio of the medians, and the median of the per-round ratios
(each server against the floor of the same round) with their range. `--control` adds a
second, identical floor: its distance from the first is what the machine's noise alone
makes of two equal servers. `--baseline BIN` adds another build of store-server, to compare
before and after a change in the same alternated runs; it may be given more than once, as
`--baseline NAME=BIN` to name each build in the table.

One set of rounds says little on a noisy machine, so every run is logged to stderr, a line
per round, and `--pool` reads such logs back and pools their rounds: for each scenario and
server, the median of every round's ratio to the floor of the same round, over all sets:

    python3 interop/bench_store.py --no-python --floor --control --reps 15 --scenarios bc 2> set1.err
    python3 interop/bench_store.py --pool set1.err set2.err

`--interleave SLICE` measures the store-protocol servers (store, baselines, floor, control)
another way: one `store-bench --compare` per scenario drives them in turn, SLICE seconds
each, `--reps` rounds (each server has connections of its own, idle while the others run),
and reads each server's CPU to the nanosecond. Turns of half a second put a change in the
machine's load on every server alike, where runs of seconds one after another do not; the
rounds are logged as above, so `--pool` pools them too:

    python3 interop/bench_store.py --no-python --memcached none --floor --control \
        --interleave 0.5 --reps 100 --scenarios cf 2> set1.err

`--calibrate WORK` adds a floor that does WORK besides, per request: `spin=N` (N dependent
multiply-adds through a stack slot, user-space work that touches no other memory), `hash`
(hash 12 bytes of the request, the length of a key, with the store's keyed hash), `share`
(take one of four shared lock words and write or read the key's own 32-byte cell, shared
by all connections, as a map shared by every thread must), `code=N` (call N distinct
functions of a few instructions, each on a line of code of its own, at most 64), or
several, comma-separated; repeatable. Set beside the floor and the store, it tells what a
given kind of work costs in CPU per operation on this machine, and so how close to the
floor any server doing that work could be:

    python3 interop/bench_store.py --no-python --memcached none --floor --calibrate hash \
        --calibrate spin=53 --calibrate share --interleave 0.5 --reps 60 --scenarios e

Scenarios (32-byte values, 1,000 keys, GET-only unless said):
  a: 1 connection   b: 16   c: 64   d: 16 pipelined 32 deep   e: 16 SET-only   f: 256
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Optional

from message import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCENARIOS = {
    "a": ("1 conn", ["--conns", "1"]),
    "b": ("16 conns", ["--conns", "16"]),
    "c": ("64 conns", ["--conns", "64"]),
    "d": ("16 conns, pipeline 32", ["--conns", "16", "--pipeline", "32"]),
    "e": ("16 conns, SET only", ["--conns", "16", "--ratio", "0:1"]),
    "f": ("256 conns", ["--conns", "256"]),
}


def round_line(sc: str, name: str, rep: int, r: dict[str, float]) -> str:
    """A round's line on stderr (what `--pool` reads back): scenario, server, round, figures."""
    return (f"# {sc} {SCENARIOS[sc][0]:24} {name:16} rep {rep}: {r['ops_per_sec']:.0f} ops/s "
            f"cpu {r.get('server_cpu_us_per_op', float('nan')):.3f}us/op")


ROUND_LINE = re.compile(r"^# (\w) .{24} (.+?)\s+rep (\d+): (\d+) ops/s cpu ([0-9.]+|nan)us/op$")


def pool(paths: list[str]) -> int:
    """Prints, for each scenario and server of the logs, the median of every round's CPU/op
    ratio to the floor of the same round (and the middle half of those ratios)."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for path in paths:
        rounds: dict[tuple[str, int], dict[str, float]] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = ROUND_LINE.match(line.rstrip("\n"))
                if m and m.group(5) != "nan":
                    sc, name, rep, _, cpu = m.groups()
                    rounds.setdefault((sc, int(rep)), {})[name] = float(cpu)
        for (sc, _), cpus in rounds.items():
            floor = cpus.get("floor")
            for name, cpu in cpus.items():
                if floor and name != "floor":
                    ratios.setdefault((sc, name), []).append(cpu / floor)
    if not ratios:
        print(f"no rounds with a floor in {' '.join(paths)}", file=sys.stderr)
        return 1
    print("| scenario | server | rounds | CPU/op vs floor, median of rounds | middle half |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (sc, name), rs in sorted(ratios.items()):
        rs.sort()
        low, high = rs[(len(rs) - 1) // 4], rs[len(rs) * 3 // 4]
        print(f"| {sc}: {SCENARIOS[sc][0]} | {name} | {len(rs)} | {statistics.median(rs):.2f}× | "
              f"{low:.2f}–{high:.2f} |")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


class Server:
    def __init__(self, name: str, argv: list[str], port: int, proto: str) -> None:
        self.name, self.port, self.proto = name, port, proto
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_bench(bench: str, server: Server, extra: list[str], duration: float) -> dict[str, float]:
    argv = [bench, "--addr", f"127.0.0.1:{server.port}", "--proto", server.proto,
            "--duration", str(duration), "--warmup", "1", "--keys", "1000",
            "--value-size", "32", "--server-pid", str(server.proc.pid)] + extra
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    return {k: float(v) for k, v in fields.items() if re.fullmatch(r"[\d.]+", v)}


ROUND = re.compile(r"^ROUND round=(\d+) target=(\d+) ops=(\d+) secs=([0-9.]+) cpu_us_per_op=([0-9.]+|-)"
                   r"(?: user_us_per_op=([0-9.]+|-))?$")


def parse_rounds(stdout: str, names: list[str]) -> dict[int, dict[str, tuple[int, float, float, float]]]:
    """The `ROUND` lines of a `store-bench --compare` run: for each round and server (named
    in target order), its operations, seconds, CPU seconds and user seconds."""
    rounds: dict[int, dict[str, tuple[int, float, float, float]]] = {}
    for line in stdout.splitlines():
        m = ROUND.match(line)
        if not m:
            continue
        rnd, t, ops, secs = int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))
        cpu = float(m.group(5)) * ops / 1e6 if m.group(5) != "-" else 0.0
        user = float(m.group(6)) * ops / 1e6 if m.group(6) not in (None, "-") else 0.0
        rounds.setdefault(rnd, {})[names[t]] = (ops, secs, cpu, user)
    return rounds


def interleaved(args: argparse.Namespace, servers: list[Server]) -> int:
    """`--interleave`: one `store-bench --compare` per scenario over every server; logs each
    round's figures to stderr (as `--pool` reads them) and prints a table of the totals."""
    print("| scenario | server | slices | ops/s | server CPU µs/op | of it user µs/op | "
          "vs floor CPU/op (totals) | per round vs floor: median (middle half) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sc in args.scenarios:
        argv = [args.bench, "--addr", ",".join(f"127.0.0.1:{s.port}" for s in servers),
                "--compare", ",".join(str(s.proc.pid) for s in servers),
                "--slice", str(args.interleave), "--rounds", str(args.reps),
                "--keys", "1000", "--value-size", "32"] + SCENARIOS[sc][1]
        budget = args.reps * len(servers) * args.interleave * 1.5 + 120
        out = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr}")
        rounds = parse_rounds(out.stdout, [s.name for s in servers])
        for rnd, by_name in sorted(rounds.items()):
            for name, (ops, secs, cpu, _) in by_name.items():
                figures = {"ops_per_sec": ops / secs if secs > 0 else 0.0}
                if ops > 0:
                    figures["server_cpu_us_per_op"] = cpu * 1e6 / ops
                print(round_line(sc, name, rnd, figures), file=sys.stderr)
        if not rounds:
            raise RuntimeError(f"{' '.join(argv)} printed no rounds:\n{out.stdout}")

        def total(name: str) -> tuple[int, float, float, float]:
            ops = sum(r[name][0] for r in rounds.values() if name in r)
            secs = sum(r[name][1] for r in rounds.values() if name in r)
            cpu = sum(r[name][2] for r in rounds.values() if name in r and r[name][0] > 0)
            user = sum(r[name][3] for r in rounds.values() if name in r and r[name][0] > 0)
            return ops, secs, cpu, user

        floor = total("floor") if args.floor else None
        for s in servers:
            ops, secs, cpu, user = total(s.name)
            per_op = cpu * 1e6 / ops if ops else float("nan")
            user_per_op = user * 1e6 / ops if ops else float("nan")
            vs, per_round = "–", "–"
            if floor and floor[0] and ops:
                vs = f"{per_op / (floor[2] * 1e6 / floor[0]):.3f}×"
                ratios = sorted((r[s.name][2] / r[s.name][0]) / (r["floor"][2] / r["floor"][0])
                                for r in rounds.values()
                                if r.get(s.name, (0,))[0] > 0 and r.get("floor", (0,))[0] > 0)
                if ratios:
                    low, high = ratios[(len(ratios) - 1) // 4], ratios[len(ratios) * 3 // 4]
                    per_round = f"{statistics.median(ratios):.3f}× ({low:.2f}–{high:.2f})"
            print(f"| {sc}: {SCENARIOS[sc][0]} | {s.name} | {len(rounds)} | {ops / secs if secs else 0:,.0f} | "
                  f"{per_op:.3f} | {user_per_op:.2f} | {vs} | {per_round} |", flush=True)
    return 0


def floor_work(work: str) -> list[str]:
    """`store-bench --floor` arguments for `--calibrate WORK`: `spin=N`, `hash`, `share`,
    `code=N`, or several, comma-separated."""
    out: list[str] = []
    for part in work.split(","):
        name, _, value = part.partition("=")
        if name == "hash" and not value:
            out.append("--floor-hash")
        elif name == "share" and not value:
            out.append("--floor-share")
        elif name == "code" and value.isdigit():
            if int(value) > 64:
                raise ValueError(f"{part!r}: the floor has 64 functions to call, at most")
            out += ["--floor-code", value]
        elif name == "spin" and value.isdigit():
            out += ["--floor-spin", value]
        else:
            raise ValueError(f"{part!r} is none of spin=N, hash, share, code=N")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=os.path.join(ROOT, "target/release/store-bench"),
                    help="the store-bench binary that measures (default: target/release/store-bench)")
    ap.add_argument("--server", default=os.path.join(ROOT, "target/release/store-server"),
                    help="the store-server binary to measure (default: target/release/store-server)")
    ap.add_argument("--memcached", default=shutil.which("memcached"),
                    help="the memcached binary to compare with (default: memcached on PATH; "
                         "`none`, or none on PATH: left out)")
    ap.add_argument("--no-python", action="store_true", help="leave out interop/store_server.py")
    ap.add_argument("--floor", action="store_true", help="also measure the floor (store-bench --floor)")
    ap.add_argument("--control", action="store_true",
                    help="with --floor: also measure a second, identical floor (the noise between equal servers)")
    ap.add_argument("--calibrate", action="append", default=[], metavar="WORK",
                    help="with --floor: also measure a floor that does WORK per request: spin=N "
                         "(N multiply-adds), hash (the store's keyed hash of 12 bytes, a key's "
                         "length), share (a shared lock word and the key's shared cell), code=N "
                         "(N distinct functions, a line of code each), or several, "
                         "comma-separated; repeatable")
    ap.add_argument("--baseline", action="append", default=[], metavar="[NAME=]BIN",
                    help="another store-server build to measure alongside (before a change); "
                         "repeatable, NAME= labels it (default label: baseline)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each scenario per server; the median is shown (default: 3)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds each run measures (default: 3)")
    ap.add_argument("--scenarios", default="abcdef", help="which scenarios to run, as letters (default: abcdef; see above)")
    ap.add_argument("--interleave", type=float, metavar="SLICE",
                    help="drive the store-protocol servers in turn, SLICE seconds each, --reps rounds, "
                         "in one store-bench --compare per scenario (memcached and store_server.py "
                         "are left out)")
    ap.add_argument("--pool", nargs="+", metavar="LOG",
                    help="measure nothing: pool the rounds logged (stderr) by earlier runs with --floor")
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool)
    if args.control and not args.floor:
        ap.error("--control needs --floor")
    if args.calibrate and not args.floor:
        ap.error("--calibrate needs --floor")
    calibrated = []
    for work in args.calibrate:
        try:
            calibrated.append(("floor+" + work.replace(",", "+").replace("=", ""), floor_work(work)))
        except ValueError as e:
            ap.error(f"--calibrate {work}: {e}")
    if args.interleave is not None:
        if not args.interleave > 0:
            ap.error("--interleave wants a positive number of seconds")
        if args.memcached not in (None, "none") or not args.no_python:
            print("--interleave compares store-protocol servers only: memcached and "
                  "store_server.py are left out", file=sys.stderr)
        args.memcached, args.no_python = "none", True

    servers: list[Server] = []
    try:
        port = free_port()
        servers.append(Server("store-server", [args.server, "--listen", f"127.0.0.1:{port}"], port, "store"))
        for baseline in args.baseline:
            name, _, binary = baseline.rpartition("=")
            port = free_port()
            servers.append(Server(name or "baseline", [binary, "--listen", f"127.0.0.1:{port}"], port, "store"))
        if args.floor:
            port = free_port()
            servers.append(Server("floor", [args.bench, "--floor", f"127.0.0.1:{port}", "--keys", "1000",
                                            "--value-size", "32"], port, "store"))
        for name, work in calibrated:
            port = free_port()
            servers.append(Server(name, [args.bench, "--floor", f"127.0.0.1:{port}", "--keys", "1000",
                                         "--value-size", "32", *work], port, "store"))
        if args.control:
            port = free_port()
            servers.append(Server("floor (control)", [args.bench, "--floor", f"127.0.0.1:{port}", "--keys",
                                                      "1000", "--value-size", "32"], port, "store"))
        if args.memcached == "none":
            pass
        elif args.memcached:
            port = free_port()
            servers.append(Server("memcached", [args.memcached, "-l", "127.0.0.1", "-p", str(port),
                                                "-t", "2", "-U", "0", "-c", "4096", "-u", "root"],
                                  port, "memcache"))
        else:
            print("memcached not found (apt-get install memcached); measuring without it", file=sys.stderr)
        if not args.no_python:
            port = free_port()
            servers.append(Server("store_server.py", [sys.executable, os.path.join(ROOT, "interop/store_server.py"),
                                                      "--port", str(port)], port, "store"))
        if args.interleave is not None:
            return interleaved(args, servers)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for sc in args.scenarios:
            extra = SCENARIOS[sc][1]
            for rep in range(args.reps):
                order = servers if rep % 2 == 0 else list(reversed(servers))
                for s in order:
                    r = run_bench(args.bench, s, extra, args.duration)
                    results.setdefault((sc, s.name), []).append(r)
                    print(round_line(sc, s.name, rep + 1, r), file=sys.stderr)
    finally:
        for s in servers:
            s.stop()

    def med(sc: str, name: str, key: str) -> Optional[float]:
        vals = [r[key] for r in results.get((sc, name), []) if key in r]
        return statistics.median(vals) if vals else None

    def paired(sc: str, name: str) -> str:
        """The median of the per-round CPU/op ratios against the floor, and their range."""
        key = "server_cpu_us_per_op"
        pairs = zip(results.get((sc, name), []), results.get((sc, "floor"), []))
        ratios = sorted(a[key] / b[key] for a, b in pairs if key in a and key in b and b[key] > 0)
        if not ratios:
            return "–"
        return f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})"

    print(f"| scenario | server | ops/s (median of {args.reps}) | p50 µs | p99 µs | server CPU µs/op | of it user µs/op | vs memcached ops/s | vs memcached CPU/op | vs floor CPU/op | per round vs floor (range) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sc in args.scenarios:
        base_ops, base_cpu = med(sc, "memcached", "ops_per_sec"), med(sc, "memcached", "server_cpu_us_per_op")
        floor_cpu = med(sc, "floor", "server_cpu_us_per_op")
        for s in servers:
            ops, cpu = med(sc, s.name, "ops_per_sec"), med(sc, s.name, "server_cpu_us_per_op")
            p50, p99 = med(sc, s.name, "p50_us"), med(sc, s.name, "p99_us")
            user = med(sc, s.name, "server_user_us_per_op")
            user_cell = f"{user:.2f}" if user is not None else "–"
            r_ops = f"{ops / base_ops:.2f}×" if ops and base_ops else "–"
            r_cpu = f"{cpu / base_cpu:.2f}×" if cpu and base_cpu else "–"
            r_floor = f"{cpu / floor_cpu:.2f}×" if cpu and floor_cpu else "–"
            print(f"| {sc}: {SCENARIOS[sc][0]} | {s.name} | {ops:,.0f} | {p50:.0f} | {p99:.0f} | "
                  f"{cpu:.2f} | {user_cell} | {r_ops} | {r_cpu} | {r_floor} | {paired(sc, s.name)} |")
    return 0


if __name__ == "__main__":
    run_main(main)
