#!/usr/bin/env python3
"""check_bars.py's judging on crafted figures (ctest bench_check_bars).

The benchmark runners are replaced by functions returning fixed figures,
so main() judges them without running any benchmark.
"""
import contextlib
import io
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_bars  # noqa: E402


def micro_runs(memcpy):
    def run(field, value):
        return [{field: value}]
    return {
        "BM_lookup_chain/1000": run("items_per_second", 30e6),
        "BM_memcpy_256k": run("bytes_per_second", memcpy),
        "BM_put_256k": run("bytes_per_second", 8e9),
        "BM_memcpy_256k_out": run("bytes_per_second", memcpy),
        "BM_get_256k": run("bytes_per_second", 8e9),
        "BM_codec_roundtrip/int8": run("bytes_per_second", 3e9),
        "BM_disk_fetch_256k/depth:16/into:1/verify:0/real_time":
            run("bytes_per_second", 2e9),
        "BM_disk_seq_read/real_time": run("bytes_per_second", 3e9),
    }


def engine_results(lru, adaptive, belady):
    def policy(hits):
        return {"token_hit_ratio": hits, "disk_token_hit_ratio": 0.0}
    return {"lru": policy(lru), "adaptive": policy(adaptive),
            "belady": policy(belady)}


def routing_results(least_loaded, kv_aware):
    return {"least_loaded": {"token_hit_ratio": least_loaded, "p95_queue": 4},
            "kv_aware": {"token_hit_ratio": kv_aware, "p95_queue": 4}}


class CheckBarsTest(unittest.TestCase):
    def judge(self, lru_hits, least_loaded_hits, memcpy=10e9, prefetches=10):
        """Runs main() on crafted figures: its exit status and output."""
        saved = {name: getattr(check_bars, name) for name in (
            "microbench", "engine_bench", "routing_bench", "actors_bench",
            "prefetch_bench")}
        check_bars.microbench = lambda build, repetitions, pattern: micro_runs(
            memcpy)
        check_bars.engine_bench = lambda build, workload, policies="", extra=(): (
            engine_results(lru_hits, 0.30, 0.40))
        check_bars.routing_bench = lambda build, workload: routing_results(
            least_loaded_hits, 0.60)
        check_bars.actors_bench = lambda build, repetitions: {
            k: 200e3 for k in ("direct", "balancer", "timed", "evicting",
                               "node")}
        check_bars.prefetch_bench = lambda build: {
            "useful": 6, "prefetches": prefetches,
            "used_fraction": 6 / prefetches if prefetches else 0.0,
            "wasted": 2, "unused": 2, "redundant": 5}
        argv = sys.argv
        sys.argv = ["check_bars.py"]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                status = check_bars.main()
        finally:
            sys.argv = argv
            for name, f in saved.items():
                setattr(check_bars, name, f)
        return status, out.getvalue()

    def line(self, output, start):
        lines = [l for l in output.splitlines() if l.startswith(start)]
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def test_a_tool_that_fails_or_is_missing_ends_the_check_with_status_2(self):
        # Before, a failing benchmark run (a disk-tier run exits 1 on
        # refused spills) ended the script with a Python traceback.
        for cmd, says in ((["sh", "-c", "echo why >&2; exit 1"], "exited 1:\nwhy"),
                          (["/nonexistent/kvfleet-bench"], "cannot run")):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), \
                    self.assertRaises(SystemExit) as done:
                check_bars.run_tool(cmd)
            self.assertEqual(done.exception.code, 2)
            self.assertIn(says, err.getvalue())
        self.assertEqual(check_bars.run_tool(["echo", "fine"]), "fine\n")

    def test_a_figure_missing_from_a_benchmark_ends_the_check_with_status_2(self):
        # Before, a microbenchmark missing or stopped with an error was a
        # KeyError traceback, and an actors bench line missing exit 1, the
        # status of a missed bar.
        def exits_2(call, says):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), \
                    self.assertRaises(SystemExit) as done:
                call()
            self.assertEqual(done.exception.code, 2)
            self.assertIn(says, err.getvalue())
        runs = micro_runs(10e9)
        exits_2(lambda: check_bars.median(runs, "BM_absent", "x"),
                "reported no BM_absent run")
        runs["BM_put_256k"] = [{"error_message": "no arena"}]
        exits_2(lambda: check_bars.median(runs, "BM_put_256k",
                                          "bytes_per_second"),
                "has no bytes_per_second: no arena")
        # An errored run with its counters: before, its figure counted in
        # the median like a good run's.
        runs["BM_put_256k"] = [dict(r) for r in micro_runs(10e9)["BM_put_256k"]]
        runs["BM_put_256k"][0].update(error_occurred=True,
                                      error_message="write failed")
        exits_2(lambda: check_bars.median(runs, "BM_put_256k",
                                          "bytes_per_second"),
                "stopped with an error: write failed")
        saved = check_bars.run_tool
        check_bars.run_tool = lambda cmd: "nothing it knows\n"
        try:
            exits_2(lambda: check_bars.actors_bench("build", 1),
                    "printed no balancer")
        finally:
            check_bars.run_tool = saved

    def test_figures_above_every_bar_pass(self):
        status, out = self.judge(lru_hits=0.25, least_loaded_hits=0.30)
        self.assertEqual(status, 0, out)
        self.assertIn(" 0 failed", out)

    def test_a_zero_baseline_hit_ratio_misses_its_bar_with_a_reason(self):
        # lru and least_loaded hit nothing: no ratio to compare, so those
        # bars are missed (not a ZeroDivisionError traceback).
        status, out = self.judge(lru_hits=0.0, least_loaded_hits=0.0)
        self.assertEqual(status, 1, out)
        for start in ("MISS  chat @25%, lru: with disk tier / without",
                      "MISS  chat @25%: adaptive / lru",
                      "MISS  shared-prefix @25%: adaptive / lru",
                      "MISS  routing chat, 4 engines: kv_aware / least_loaded hits",
                      "MISS  routing shared-prefix, 4 engines: kv_aware / "
                      "least_loaded hits"):
            self.assertIn("no ratio: baseline", self.line(out, start))

    def test_no_prefetch_that_fetched_anything_misses_its_bar(self):
        # Every prefetch found its blocks in memory: none to judge.
        status, out = self.judge(lru_hits=0.25, least_loaded_hits=0.30,
                                 prefetches=0)
        self.assertEqual(status, 1, out)
        self.line(out, "MISS  prefetch on chat")

    def test_a_zero_memcpy_baseline_misses_its_bar_with_a_reason(self):
        status, out = self.judge(lru_hits=0.25, least_loaded_hits=0.30,
                                 memcpy=0.0)
        self.assertEqual(status, 1, out)
        self.assertIn("no ratio: baseline",
                      self.line(out, "MISS  put 256 KiB / memcpy into arena"))
        self.assertIn("no ratio: baseline",
                      self.line(out, "MISS  get 256 KiB / memcpy out of arena"))


if __name__ == "__main__":
    unittest.main()
