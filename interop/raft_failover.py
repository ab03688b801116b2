#!/usr/bin/env python3
"""Failover time of the replicated store: ``kill -9`` of the leader to the next
acknowledged write, over ``--rounds`` rounds (median, min, max).

Starts three ``store-server --raft`` servers (``--server`` is the binary) on free
loopback ports with data directories in a temporary directory, writes once a
round to find the cluster serving, kills the leader, and times from the kill to
the acknowledgement of a ``store`` sent to a survivor (the reply to a ``stats``
sent after it on the same connection); the killed server is restarted before the
next round. Standard library only; it stops every server it started.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ask(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Sends line requests on one connection; returns everything up to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def role(port: int) -> str | None:
    try:
        m = re.search(rb"\{role,(\w+)\}", ask(port, b"stats\n", 1.0))
    except OSError:
        return None
    return m.group(1).decode() if m else None


def acked(port: int, key: str) -> bool:
    try:
        return ask(port, f"store,{key},v\nstats\n".encode(), 5.0).startswith(b"{stats,")
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="store-server", help="the store-server binary")
    parser.add_argument("--rounds", type=int, default=10, help="kills to time (default 10)")
    args = parser.parse_args()
    ports = free_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs: dict[int, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory() as root:

        def start(i: int) -> None:
            cmd = [args.server, "--raft", str(i), "--peers", peers, "--data-dir", os.path.join(root, f"d{i}")]
            procs[i] = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)

        try:
            for i in range(3):
                start(i)
            times = []
            for r in range(args.rounds):
                deadline = time.monotonic() + 20
                while not acked(ports[0], f"warm{r}") or [role(p) for p in ports].count("leader") != 1:
                    if time.monotonic() > deadline:
                        print("no serving cluster within 20 s", file=sys.stderr)
                        return 1
                    time.sleep(0.05)
                leader = [role(p) for p in ports].index("leader")
                survivor = ports[(leader + 1) % 3]
                killed = time.monotonic()
                procs[leader].send_signal(signal.SIGKILL)
                procs[leader].wait()
                while not acked(survivor, f"after{r}"):
                    time.sleep(0.001)
                times.append(time.monotonic() - killed)
                print(f"round {r}: {times[-1] * 1000:.0f} ms", flush=True)
                start(leader)
            ms = [t * 1000 for t in times]
            print(f"RESULT failover_ms median={statistics.median(ms):.0f} min={min(ms):.0f} max={max(ms):.0f} rounds={len(ms)}")
            return 0
        finally:
            for p in procs.values():
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
