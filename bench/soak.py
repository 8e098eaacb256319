"""`make soak`: the default service at about 80% of its measured capacity for 10 minutes.

1. capacity: closed-loop wrk against `bentoml serve` with the shipped configuration, the best
   of three runs (connections land on workers unevenly, and one run can leave a core idle);
2. pacing: each connection pauses between requests; two short runs tune the pause until the
   offered load is the target fraction of capacity;
3. soak: that load for `--minutes`; errors (every answer but a 200, and socket errors) and the
   RSS of the server's whole process tree when it started and ended.
Writes docs/soak.md (target: 0 errors, RSS growth <= 10%).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.__main__ import ROOT, WORK

CAPACITY_SECONDS = 10
CAPACITY_RUNS = 3  # workers share connections, not requests: one run can land most on one worker
TUNING_SECONDS = 15
CONNECTIONS = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["BENTOML_HOME"] = str(WORK / "home")  # the bench store, before bentoml loads
    from bench import report, servers
    from bench.assets import MODELS, ensure_model
    from bench.load import run_wrk

    import bentoml

    WORK.mkdir(parents=True, exist_ok=True)
    tag = ensure_model(MODELS["digits"], WORK / "home", ROOT)
    model_dir = Path(bentoml.models.get(tag).path)
    image = ROOT / "examples" / "digit_7_00.png"

    def load(seconds: float, pause_ms: float = 0):
        return run_wrk(running.url, running.pid, image, CONNECTIONS, int(seconds),
                       sample_batches=False, pause_ms=pause_ms, content_type="image/png")

    with servers.serve("bentoml", tag, model_dir, WORK) as running:
        runs = [load(CAPACITY_SECONDS) for _ in range(CAPACITY_RUNS)]
        capacity = max(runs, key=lambda run: run.throughput)
        target = args.load * capacity.throughput
        # C connections each pausing P between answers offer C / (L + P) requests/s, where
        # L is the mean latency: solve for P, then refine with the L measured at that P.
        period_ms = CONNECTIONS / target * 1000  # each connection's time per request
        pause_ms = max(0.0, period_ms - CONNECTIONS / capacity.throughput * 1000)
        for _ in range(3):
            tuning = load(TUNING_SECONDS, pause_ms)
            mean_latency_ms = CONNECTIONS / (tuning.requests / tuning.seconds) * 1000 - pause_ms
            pause_ms = max(0.1, period_ms - mean_latency_ms)
        print(f"capacity {capacity.throughput:.0f}/s; target {target:.0f}/s; pause "
              f"{pause_ms:.1f} ms; soaking {args.minutes:g} min", flush=True)
        started = time.strftime("%Y-%m-%d %H:%M")
        soak = load(args.minutes * 60, pause_ms)

    errors = soak.requests - soak.ok + soak.other_errors
    growth = (soak.server_rss_end_mb / soak.server_rss_start_mb - 1) * 100
    verdict = "met" if errors == 0 and growth <= 10 else "NOT met"
    machine = report.machine()
    args.out.write_text(f"""# Soak test

`make soak` (bench/soak.py), started {started}, on {machine['cpu']} ({machine['cores']} cores,
{machine['memory_gib']} GiB), {machine['os']}.

The default model (`{tag}`) served by `bentoml serve` with the shipped configuration.yaml;
{CONNECTIONS} wrk connections each posting examples/digit_7_00.png, pacing tuned to
{args.load:.0%} of the capacity measured first.

| | |
|---|---|
| capacity (closed loop, {CONNECTIONS} connections, best of {CAPACITY_RUNS} x {CAPACITY_SECONDS} s) | {capacity.throughput:.0f} answers/s (runs: {", ".join(f"{r.throughput:.0f}" for r in runs)}) |
| offered during the soak | {soak.requests / soak.seconds:.0f} requests/s ({soak.requests / soak.seconds / capacity.throughput:.0%} of capacity) |
| duration | {soak.seconds / 60:.1f} min, {soak.requests} requests |
| errors (non-200 answers and socket errors) | **{errors}** (429: {soak.status_429}, 503: {soak.status_503}, 504: {soak.status_504}, other: {soak.other_errors}) |
| latency p50 / p95 / p99 | {soak.p50_ms:.1f} / {soak.p95_ms:.1f} / {soak.p99_ms:.1f} ms |
| server RSS (all processes) at start / end / peak | {soak.server_rss_start_mb:.0f} / {soak.server_rss_end_mb:.0f} / {soak.server_rss_mb:.0f} MB |
| RSS growth | **{growth:+.1f}%** |
| server CPU | {soak.server_cpu_cores:.2f} cores |

Target (0 errors, RSS growth <= 10%): **{verdict}**.
""")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
