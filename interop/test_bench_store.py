"""Checks of ``bench_store.py --pool``: it reads back the round lines a run writes to stderr
and pools every round's CPU/op ratio to the floor of the same round, over several logs
(stdlib unittest; no server needed).

    python3 -m unittest discover -s interop -p 'test_*.py'
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import unittest

import bench_store


def round_of(cpu: float) -> dict[str, float]:
    return {"ops_per_sec": 100000.0, "server_cpu_us_per_op": cpu}


class PoolTest(unittest.TestCase):
    def pooled(self, *sets: list[str]) -> tuple[int, str]:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, lines in enumerate(sets):
                path = os.path.join(tmp, f"set{i}.err")
                with open(path, "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                paths.append(path)
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                rc = bench_store.pool(paths)
            return rc, out.getvalue()

    def test_rounds_are_paired_with_the_floor_of_the_same_round_across_sets(self) -> None:
        line = bench_store.round_line
        # Set 1: the store 10% and 30% over its rounds' floors; set 2: 20% over, in a
        # round whose floor was slow (against the other set's floor it would be 0.8×).
        set1 = [line("c", "store-server", 1, round_of(2.2)), line("c", "floor", 1, round_of(2.0)),
                line("c", "floor (control)", 1, round_of(2.0)),
                line("c", "floor", 2, round_of(1.0)), line("c", "store-server", 2, round_of(1.3)),
                line("c", "floor (control)", 2, round_of(1.1)),
                "c 64 conns: some other stderr line"]
        set2 = [line("c", "floor", 1, round_of(3.0)), line("c", "store-server", 1, round_of(3.6)),
                line("c", "floor (control)", 1, round_of(3.0))]
        rc, out = self.pooled(set1, set2)
        self.assertEqual(rc, 0, out)
        rows = {cells[1]: cells[2:5] for cells in
                (r.strip("| ").split(" | ") for r in out.splitlines() if r.startswith("| c:"))}
        self.assertEqual(rows["store-server"], ["3", "1.20×", "1.10–1.30"], out)
        self.assertEqual(rows["floor (control)"], ["3", "1.00×", "1.00–1.10"], out)
        self.assertNotIn("floor", rows, "the floor is the reference, not a row")

    def test_logs_without_a_floor_are_an_error(self) -> None:
        rc, _ = self.pooled([bench_store.round_line("b", "store-server", 1, round_of(2.0))])
        self.assertEqual(rc, 1)


class InterleaveTest(unittest.TestCase):
    def test_compare_rounds_are_read_by_target_and_pool_like_any_round(self) -> None:
        stdout = "\n".join([
            "ROUND round=1 target=0 ops=1000 secs=0.500 cpu_us_per_op=2.200 user_us_per_op=0.200",
            "ROUND round=1 target=1 ops=2000 secs=0.500 cpu_us_per_op=2.000 user_us_per_op=0.100",
            "ROUND round=2 target=0 ops=0 secs=0.500 cpu_us_per_op=- user_us_per_op=-",
            "ROUND round=2 target=1 ops=1000 secs=0.501 cpu_us_per_op=1.000",
            "COMPARE target=0 addr=127.0.0.1:1 ops_per_sec=1000 server_cpu_us_per_op=2.2 vs_first=1.0",
        ])
        rounds = bench_store.parse_rounds(stdout, ["store-server", "floor"])
        self.assertEqual(sorted(rounds), [1, 2])
        ops, secs, cpu, user = rounds[1]["store-server"]
        self.assertEqual((ops, secs), (1000, 0.5))
        self.assertAlmostEqual(cpu, 0.0022)
        self.assertAlmostEqual(user, 0.0002)
        self.assertEqual(rounds[2]["store-server"], (0, 0.5, 0.0, 0.0))
        self.assertEqual(rounds[2]["floor"][3], 0.0, "a line without user time (older store-bench)")
        self.assertAlmostEqual(rounds[2]["floor"][2], 0.001)
        # Logged as round lines, the first round pools to the store at 1.10× its floor.
        line = bench_store.round_line
        log = [line("c", name, rnd, {"ops_per_sec": ops / secs, "server_cpu_us_per_op": cpu * 1e6 / ops})
               for rnd, by_name in rounds.items() for name, (ops, secs, cpu, _) in by_name.items() if ops]
        rc, out = PoolTest.pooled(self, log)
        self.assertEqual(rc, 0, out)
        self.assertIn("| c: 64 conns | store-server | 1 | 1.10× |", out)


class FloorWorkTest(unittest.TestCase):
    """`--calibrate WORK` becomes the calibrated floor's `store-bench` options."""

    def test_each_kind_of_work_and_several_at_once(self) -> None:
        self.assertEqual(bench_store.floor_work("hash"), ["--floor-hash"])
        self.assertEqual(bench_store.floor_work("share"), ["--floor-share"])
        self.assertEqual(bench_store.floor_work("spin=53"), ["--floor-spin", "53"])
        self.assertEqual(bench_store.floor_work("code=64"), ["--floor-code", "64"])
        self.assertEqual(bench_store.floor_work("hash,share,spin=24"),
                         ["--floor-hash", "--floor-share", "--floor-spin", "24"])

    def test_what_is_not_work_is_refused(self) -> None:
        for bad in ["", "spin", "spin=x", "spin=-1", "hash=1", "code=65", "cache", "hash,,share"]:
            with self.assertRaises(ValueError, msg=bad):
                bench_store.floor_work(bad)


if __name__ == "__main__":
    unittest.main()

