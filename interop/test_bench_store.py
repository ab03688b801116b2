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


if __name__ == "__main__":
    unittest.main()
