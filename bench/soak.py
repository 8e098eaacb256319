"""`make soak`: the default service at about 80% of its measured capacity for 10 minutes.

1. capacity: closed-loop wrk against `bentoml serve` with the shipped configuration, the best
   of three runs (connections land on workers unevenly, and one run can leave a core idle);
2. warm-up: one minute at the soak's load (its RSS rise is reported, not counted as growth);
3. soak: a fixed request rate, the target fraction of that capacity (bench/paced.lua), for
   `--minutes`; errors (every answer but a 200, and socket errors) and the RSS of the server's
   whole process tree at the start, every 30 s, and at the end.
Through warm-up and soak, abusive requests at `--abuse-rate` per second in a thread beside wrk
(bench/abuse.py: the bad-input matrix, the multipart fuzz and the size limit, from the tests),
their answers counted by status class.
Writes docs/soak.md (target: every valid request answered with a 200, no abusive request
answered with a 5xx, RSS growth <= 10%).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.__main__ import ROOT, WORK

CAPACITY_SECONDS = 10
CAPACITY_RUNS = 3  # workers share connections, not requests: one run can land most on one worker
CONNECTIONS = 16  # closed loop, for the capacity
SOAK_CONNECTIONS = 64  # paced: enough that the rate, not the connections, sets the load
RSS_EVERY_S = 30
# The first minute at the soak's load raises RSS once (buffers for 64 connections instead of 16,
# allocator arenas); growth is measured after it, so that it shows a leak rather than warm-up.
WARMUP_SECONDS = 60


class RssSampler:
    """RSS of a process tree every `seconds`, in a thread, until stop()."""

    def __init__(self, seconds: float, pid: int) -> None:
        import threading

        from bench.load import rss_mb

        self.samples: list[float] = [rss_mb(pid)]
        self._stopped = threading.Event()

        def sample() -> None:
            while not self._stopped.wait(seconds):
                self.samples.append(rss_mb(pid))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def failures(result) -> int:
    """Answers other than 200 (wrk counts 429/503/504 apart) and socket errors."""
    return result.status_429 + result.status_503 + result.status_504 + result.other_errors


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    parser.add_argument("--abuse-rate", type=float, default=10,
                        help="abusive requests per second beside the valid load (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from bench.assets import default_bench_model

    tag, model_dir = default_bench_model()  # before bentoml is imported: the bench's store
    from bench import report, servers
    from bench.abuse import FUZZ_PER_ROUND, KEPT_EXAMPLES, AbusiveTraffic, Tally
    from bench.load import run_wrk

    image = ROOT / "examples" / "digit_7_00.png"

    def load(seconds: float, connections: int = CONNECTIONS, rate: float = 0):
        return run_wrk(running.url, running.pid, image, connections, int(seconds),
                       sample_batches=False, rate=rate, content_type="image/png")

    with servers.serve("bentoml", tag, model_dir, WORK) as running:
        runs = [load(CAPACITY_SECONDS) for _ in range(CAPACITY_RUNS)]
        capacity = max(runs, key=lambda run: run.throughput)
        target = args.load * capacity.throughput
        print(f"capacity {capacity.throughput:.0f}/s; soaking {args.minutes:g} min at "
              f"{target:.0f}/s", flush=True)
        abuse = AbusiveTraffic(running.url, args.abuse_rate).start() if args.abuse_rate else None
        warmup = load(WARMUP_SECONDS, SOAK_CONNECTIONS, target)
        warmup_abuse = abuse.take() if abuse else Tally()
        started = time.strftime("%Y-%m-%d %H:%M")
        rss_series = RssSampler(RSS_EVERY_S, running.pid)
        soak = load(args.minutes * 60, SOAK_CONNECTIONS, target)
        rss_series.stop()
        # The series ends where the table does: the load's own RSS reading at its end.
        rss_series.samples.append(soak.server_rss_end_mb)
        if abuse:
            abuse.stop()
        soak_abuse = abuse.take() if abuse else Tally()

    errors = failures(soak)
    growth = (soak.server_rss_end_mb / soak.server_rss_start_mb - 1) * 100
    stopped = f" It stopped early: {abuse.error!r}." if abuse and abuse.error else ""
    met = (errors == failures(warmup) == 0 and soak.ok == soak.requests and not stopped
           and soak_abuse.by_class("5xx") == warmup_abuse.by_class("5xx") == 0 and growth <= 10)
    verdict = "met" if met else "NOT met"
    machine = report.machine()
    a = soak_abuse
    examples = "".join(f"\n- `{e}`" for e in warmup_abuse.examples + a.examples) or " none."
    args.out.write_text(f"""# Soak test

`make soak` (bench/soak.py), started {started}, on {machine['cpu']} ({machine['cores']} cores,
{machine['memory_gib']} GiB), {machine['os']}.

The default model (`{tag}`) served by `bentoml serve` with the shipped configuration.yaml;
wrk posting examples/digit_7_00.png: first closed-loop with {CONNECTIONS} connections for the
capacity, then {SOAK_CONNECTIONS} connections at a fixed rate, {args.load:.0%} of that capacity.

Through the warm-up and the soak, a thread beside wrk sends abusive requests (bench/abuse.py),
one at a time, at most {args.abuse_rate:g}/s, in rounds: every case of the bad-input
matrix (tests/test_hardening.py, each with the status it must get), a head declaring a body over
the size limit and a chunked body streamed until refused (tests/test_limits.py), then
{FUZZ_PER_ROUND} multipart bodies from the fuzz's generator (tests/test_request_fuzz.py), a new
seed per round, to /classify and /classify_batch/submit (3 to 1). Some fuzzed bodies are valid
uploads: their answers are the abusive 2xx.{stopped}

| | |
|---|---|
| capacity (closed loop, {CONNECTIONS} connections, best of {CAPACITY_RUNS} x {CAPACITY_SECONDS} s) | {capacity.throughput:.0f} answers/s (runs: {", ".join(f"{r.throughput:.0f}" for r in runs)}) |
| offered during the soak | {soak.requests / soak.seconds:.0f} requests/s ({soak.requests / soak.seconds / capacity.throughput:.0%} of capacity) |
| duration | {soak.seconds / 60:.1f} min |
| valid requests answered with a 200 / sent | **{soak.ok} / {soak.requests}** |
| valid errors (non-200 answers and socket errors) | **{errors}** (429: {soak.status_429}, 503: {soak.status_503}, 504: {soak.status_504}, other: {soak.other_errors}) |
| valid latency p50 / p95 / p99 | {soak.p50_ms:.1f} / {soak.p95_ms:.1f} / {soak.p99_ms:.1f} ms |
| abusive requests sent (matrix / size limit / fuzz) | {a.sent} ({a.by_kind("matrix")} / {a.by_kind("limit")} / {a.by_kind("fuzz")}), {a.sent / soak.seconds:.1f}/s |
| abusive answers 2xx / 4xx / 5xx / none | {a.by_class("2xx")} / {a.by_class("4xx")} / **{a.by_class("5xx")}** / {a.by_class("no answer")} |
| abusive answers other than the status the matrix or the limit expects | {a.unexpected} |
| abusive refusals whose body is not `{{"error", "detail"}}` | {a.bad_bodies} |
| warm-up ({WARMUP_SECONDS} s at the same rates): valid errors, abusive sent / 5xx, RSS before / after | {failures(warmup)}, {warmup_abuse.sent} / {warmup_abuse.by_class("5xx")}, {warmup.server_rss_start_mb:.0f} / {warmup.server_rss_end_mb:.0f} MB |
| server RSS (all processes) at start / end / peak | {soak.server_rss_start_mb:.0f} / {soak.server_rss_end_mb:.0f} / {soak.server_rss_mb:.0f} MB |
| RSS growth | **{growth:+.1f}%** |
| server CPU | {soak.server_cpu_cores:.2f} cores |

RSS of all server processes (MB), every {RSS_EVERY_S} s from the start of the soak, and at its end:
{" ".join(f"{mb:.0f}" for mb in rss_series.samples)}

Abusive answers that were a 5xx, none, or not what was expected (first {KEPT_EXAMPLES} of each kind):{examples}

Target (every valid request answered with a 200, no abusive request answered with a 5xx, RSS
growth <= 10%): **{verdict}**.
""")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

