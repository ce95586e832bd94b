#!/usr/bin/env python3
"""Measures the engine's benchmark bars and prints each against its target.

Runs kvfleet-microbench (Google Benchmark, JSON output, repeated; medians),
kvfleet-actors-bench (request/reply through the balancer and an engine
actor; medians) and kvfleet-bench engine, routing and prefetch modes
(deterministic simulations: one run each). Every ratio compares two figures measured in
the same run, because the machines are shared and noisy. Exit status 1 when
a bar is missed, so the result is not a matter of reading; 2 when a
benchmark fails or its output lacks a figure.

Usage: tools/bench/check_bars.py [--build-dir build] [--repetitions 5]
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile


def run_tool(cmd):
    """The standard output of `cmd`; a tool that fails ends the check with
    its command, exit status and the end of its standard error (exit 2),
    not a Python traceback."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        print(f"check_bars: cannot run {cmd[0]}: {e.strerror} (build it first, "
              "or pass --build-dir)", file=sys.stderr)
        sys.exit(2)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        print(f"check_bars: {' '.join(cmd)} exited {done.returncode}"
              + (f":\n{tail}" if tail else ""), file=sys.stderr)
        sys.exit(2)
    return done.stdout


def microbench(build, repetitions, pattern):
    out = run_tool(
        [f"{build}/tools/microbench/kvfleet-microbench",
         f"--benchmark_filter={pattern}",
         f"--benchmark_repetitions={repetitions}",
         "--benchmark_format=json"])
    runs = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        runs.setdefault(b["run_name"], []).append(b)
    return runs


def tool_failed(message):
    """Ends the check with exit status 2 (1 means a bar was missed)."""
    print(f"check_bars: {message}", file=sys.stderr)
    sys.exit(2)


def median(runs, name, field):
    """The median `field` of benchmark `name`'s runs; a benchmark missing
    from the output, or a run that stopped with an error or lacks the
    figure, ends the check (exit 2). A run that stopped with an error can
    still carry counters (its figures up to the error), so the error is
    checked first."""
    if name not in runs:
        tool_failed(f"kvfleet-microbench reported no {name} run")
    for r in runs[name]:
        if r.get("error_occurred"):
            why = r.get("error_message", "no error message")
            tool_failed(f"kvfleet-microbench's {name} stopped with an "
                        f"error: {why}")
        if field not in r:
            why = r.get("error_message", "no error message")
            tool_failed(f"kvfleet-microbench's {name} has no {field}: {why}")
    return statistics.median(r[field] for r in runs[name])


def engine_bench(build, workload, policies="lru,adaptive,belady", extra=()):
    out = run_tool(
        [f"{build}/tools/bench/kvfleet-bench", "engine", "--workload", workload,
         "--capacity-fraction", "0.25", "--policies", policies,
         "--json", "--no-progress", *extra])
    return {r["policy"]: r for r in json.loads(out)["results"]}


def routing_bench(build, workload):
    # Arrivals 4x the workload's own rate, so the engines queue (at x1 they
    # are mostly idle and every queue length is 0).
    out = run_tool(
        [f"{build}/tools/bench/kvfleet-bench", "routing", "--workload", workload,
         "--engines", "4", "--capacity-fraction", "0.25", "--rate-scale", "4",
         "--policies", "least_loaded,kv_aware", "--json", "--no-progress"])
    return {r["policy"]: r for r in json.loads(out)["results"]}


def actors_bench(build, repetitions):
    """Medians (requests/s) straight to an engine actor, through the
    balancer (callers without a timer of their own, and callers with one),
    to an engine actor whose full store evicts at every request, and through
    the blocking node API from one host thread: 2 scheduler threads,
    scheduler.policy=sharing, 1 s each."""
    out = run_tool(
        [f"{build}/actors/kvfleet-actors-bench", "2", "1", str(repetitions)])
    labels = {"engine actor direct": "direct",
              "balancer -> engine actor": "balancer",
              "balancer, caller's own timer": "timed",
              "engine actor, full store": "evicting",
              "node::process_request": "node"}
    rates = {}
    for line in out.splitlines():
        for prefix, label in labels.items():
            if line.startswith(prefix) and "median" in line:
                rates[label] = float(line.split("median")[1].split()[0])
    missing = set(labels.values()) - set(rates)
    if missing:
        tool_failed(f"kvfleet-actors-bench printed no "
                    f"{', '.join(sorted(missing))} line:\n{out}")
    return rates


def prefetch_bench(build):
    out = run_tool(
        [f"{build}/tools/bench/kvfleet-bench", "prefetch", "--workload", "chat",
         "--capacity-fraction", "0.25", "--json", "--no-progress"])
    return json.loads(out)


def ratio(num, den, spec, what):
    """num / den formatted with `spec`, or, when the baseline `den` is 0
    (a run that hit or moved nothing), a note saying so: there is no ratio
    to compare, and meets() calls the bar missed."""
    if den > 0:
        return format(num / den, spec)
    return f"no ratio: baseline {what} is 0"


def meets(num, den, bar):
    """num >= bar * den, judged only against a baseline above 0."""
    return den > 0 and num >= bar * den


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    b = args.build_dir
    rows = []

    runs = microbench(b, args.repetitions,
                      "BM_lookup_chain|BM_memcpy_256k|BM_put_256k|BM_get_256k|"
                      "BM_codec_roundtrip/int8$|"
                      "BM_disk_fetch_256k/depth:16/into:1|BM_disk_seq_read/")
    lookups = median(runs, "BM_lookup_chain/1000", "items_per_second")
    rows.append(("lookup over a 1,000-block chain", f"{lookups / 1e6:.0f} M keys/s",
                 ">= 20 M keys/s", lookups >= 20e6))
    mc_in = median(runs, "BM_memcpy_256k", "bytes_per_second")
    put = median(runs, "BM_put_256k", "bytes_per_second")
    rows.append(("put 256 KiB / memcpy into arena",
                 f"{put / 2**30:.2f} / {mc_in / 2**30:.2f} GiB/s = "
                 f"{ratio(put, mc_in, '.0%', 'memcpy rate')}",
                 ">= 70%", meets(put, mc_in, 0.7)))
    mc_out = median(runs, "BM_memcpy_256k_out", "bytes_per_second")
    get = median(runs, "BM_get_256k", "bytes_per_second")
    rows.append(("get 256 KiB / memcpy out of arena",
                 f"{get / 2**30:.2f} / {mc_out / 2**30:.2f} GiB/s = "
                 f"{ratio(get, mc_out, '.0%', 'memcpy rate')}",
                 ">= 70%", meets(get, mc_out, 0.7)))
    int8 = median(runs, "BM_codec_roundtrip/int8", "bytes_per_second")
    rows.append(("int8 encode + decode, one core", f"{int8 / 1e9:.2f} GB/s",
                 ">= 2 GB/s", int8 >= 2e9))

    # Promotion from disk with the data in the page cache: 16 blocks in
    # flight, as a request's prefix is promoted together.
    # The store's promote path copies (verify:0); the block is verified at
    # its first read, like every block in memory.
    fetch = median(runs, "BM_disk_fetch_256k/depth:16/into:1/verify:0/real_time",
                   "bytes_per_second")
    seq = median(runs, "BM_disk_seq_read/real_time", "bytes_per_second")
    rows.append(("disk promote 256 KiB / sequential read",
                 f"{fetch / 2**30:.2f} / {seq / 2**30:.2f} GiB/s = "
                 f"{ratio(fetch, seq, '.0%', 'sequential read rate')}",
                 ">= 50%", meets(fetch, seq, 0.5)))
    with tempfile.TemporaryDirectory() as d:
        mem = engine_bench(b, "chat", "lru,adaptive")
        disk = engine_bench(b, "chat", "lru,adaptive", ("--disk-dir", d))
    for p in ("lru", "adaptive"):
        a, m = disk[p]["token_hit_ratio"], mem[p]["token_hit_ratio"]
        rows.append((f"chat @25%, {p}: with disk tier / without",
                     f"{a:.4f} / {m:.4f} (disk {disk[p]['disk_token_hit_ratio']:.4f})"
                     + ("" if m > 0 else "; no ratio: baseline hit ratio is 0"),
                     ">= 1.0", meets(a, m, 1.0)))

    for w in ("chat", "shared-prefix"):
        r = engine_bench(b, w)
        lru = r["lru"]["token_hit_ratio"]
        ada = r["adaptive"]["token_hit_ratio"]
        bel = r["belady"]["token_hit_ratio"]
        rows.append((f"{w} @25%: adaptive / lru (belady)",
                     f"{ada:.4f} / {lru:.4f} = {ratio(ada, lru, '.3f', 'lru hit ratio')} "
                     f"(belady {bel:.4f} = {ratio(bel, lru, '.3f', 'lru hit ratio')})",
                     ">= 1.10", meets(ada, lru, 1.10)))

    for w in ("shared-prefix", "chat"):
        r = routing_bench(b, w)
        ll, kv = r["least_loaded"], r["kv_aware"]
        kv_hits, ll_hits = kv["token_hit_ratio"], ll["token_hit_ratio"]
        rows.append((f"routing {w}, 4 engines: kv_aware / least_loaded hits",
                     f"{kv_hits:.4f} / {ll_hits:.4f} = "
                     f"{ratio(kv_hits, ll_hits, '.3f', 'least_loaded hit ratio')}",
                     ">= 1.5", meets(kv_hits, ll_hits, 1.5)))
        rows.append((f"routing {w}, 4 engines: p95 queue kv_aware / least_loaded",
                     f"{kv['p95_queue']:.0f} / {ll['p95_queue']:.0f}",
                     "<= 1.25x", kv["p95_queue"] <= 1.25 * ll["p95_queue"]))
    a = actors_bench(b, args.repetitions)
    rows.append(("request/reply through balancer and engine actor, 2 threads",
                 f"{a['balancer'] / 1e3:.0f}k req/s (direct {a['direct'] / 1e3:.0f}k; "
                 f"callers with their own CAF timer {a['timed'] / 1e3:.0f}k; "
                 f"full store evicting at every request {a['evicting'] / 1e3:.0f}k; "
                 f"node::process_request from one host thread {a['node'] / 1e3:.0f}k)",
                 ">= 150k req/s", a["balancer"] >= 150e3))
    p = prefetch_bench(b)
    rows.append(("prefetch on chat @25%: used by the session's next round",
                 f"{p['useful']} of {p['prefetches']} = {p['used_fraction']:.3f} "
                 f"(wasted {p['wasted']}, unused {p['unused']}; "
                 f"{p.get('redundant', 0)} found every block in memory)",
                 ">= 0.5", p["prefetches"] > 0 and p["used_fraction"] >= 0.5))

    width = max(len(r[0]) for r in rows)
    failed = 0
    for name, got, want, ok in rows:
        failed += not ok
        print(f"{'PASS' if ok else 'MISS'}  {name:<{width}}  {got}  (bar {want})")
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyError, json.JSONDecodeError) as e:
        # A kvfleet-bench report without a figure the check reads.
        tool_failed(f"a benchmark's output lacks {e}")
