"""Checks of the scripts' command lines: every option and subcommand explains itself in
``--help``, ``--addr HOST:PORT`` stands for ``--host``/``--port``, and Ctrl-C ends a
script with one line instead of a traceback (stdlib unittest; no server needed).

    python3 -m unittest discover -s interop -p 'test_*.py'
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import unittest

from message import add_addr_argument, parse_addr

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, name), *args]


def undocumented(help_text: str) -> list[str]:
    """Options and arguments listed in argparse ``--help`` output without a description."""
    missing = []
    lines = help_text.splitlines()
    in_list = False
    for i, line in enumerate(lines):
        if re.match(r"^(options|optional arguments|positional arguments):", line):
            in_list = True
            continue
        if not line.strip() or not line.startswith(" "):
            in_list = line.startswith(" ") and in_list
            continue
        if not in_list or not re.match(r"^  \S", line):
            continue
        # `  --opt X   text` carries its help on the line; a long invocation puts it on the
        # next line, indented further.
        if re.search(r"\S\s{2,}\S", line.strip()):
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.match(r"^\s{6,}\S", nxt) and not re.match(r"^  \S", nxt):
            continue
        missing.append(line.strip())
    return missing


class HelpTexts(unittest.TestCase):
    CASES = [
        ("chat_client.py",),
        ("bench_store.py",),
        ("profile_store.py",),
        ("messenger_client.py",),
        ("messenger_client.py", "register"),
        ("messenger_client.py", "send"),
        ("messenger_client.py", "inbox"),
        ("messenger_client.py", "search"),
        ("chan.py",),
        ("chan.py", "ping"),
        ("chan.py", "pong"),
        ("echo_client.py",),
        ("store_client.py",),
        ("store_client.py", "store"),
        ("store_client.py", "raw"),
        ("raft_failover.py",),
    ]

    def test_every_option_and_subcommand_has_help(self) -> None:
        for case in self.CASES:
            out = subprocess.run(script(*case, "--help"), capture_output=True, text=True, timeout=TIMEOUT)
            self.assertEqual(out.returncode, 0, f"{case}: {out.stderr}")
            self.assertEqual(undocumented(out.stdout), [], f"{' '.join(case)} --help:\n{out.stdout}")

    def test_the_checker_sees_a_missing_help(self) -> None:
        parser = argparse.ArgumentParser(prog="x")
        parser.add_argument("--reps", type=int)
        parser.add_argument("--fine", help="has help")
        self.assertEqual(undocumented(parser.format_help()), ["--reps REPS"])


class Addr(unittest.TestCase):
    def test_addr_sets_host_and_port(self) -> None:
        parser = argparse.ArgumentParser()
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=1)
        add_addr_argument(parser)
        args = parser.parse_args(["--addr", "example.org:65002"])
        self.assertEqual((args.host, args.port), ("example.org", 65002))
        args = parser.parse_args(["--addr", "[::1]:7", "--port", "8"])
        self.assertEqual((args.host, args.port), ("::1", 8))
        self.assertEqual(parse_addr("h:0"), ("h", 0))
        for bad in ["nohost", ":1", "h:x", "h:70000"]:
            with self.assertRaises(argparse.ArgumentTypeError, msg=bad):
                parse_addr(bad)


class CtrlC(unittest.TestCase):
    """Each script is started against a listener that accepts and never answers, so it
    blocks in the middle of its work; once it has connected, SIGINT."""

    CASES = [
        ("echo_client.py", "--addr", "{addr}"),
        ("store_client.py", "--addr", "{addr}", "lookup", "k"),
        ("chat_client.py", "--addr", "{addr}", "--name", "ann"),
        ("messenger_client.py", "--servers", "{addr}", "register", "ann"),
    ]

    def test_ctrl_c_exits_with_one_line(self) -> None:
        for case in self.CASES:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.settimeout(TIMEOUT)
                addr = "127.0.0.1:%d" % listener.getsockname()[1]
                argv = script(*[a.format(addr=addr) for a in case])
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                try:
                    conn, _ = listener.accept()
                    with conn:
                        proc.send_signal(signal.SIGINT)
                        _, err = proc.communicate(timeout=TIMEOUT)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                self.assertEqual(proc.returncode, 130, f"{case[0]}: {err}")
                self.assertEqual(err.strip(), f"{case[0]}: interrupted", case[0])


if __name__ == "__main__":
    unittest.main()
