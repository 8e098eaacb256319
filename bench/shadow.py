"""`make bench-shadow`: does a shadow model slow the served answers?

The default model served by `bentoml serve` with the shipped configuration, without and with a
shadow (the same graph again, `fraction: 1.0`: every image is copied, the shadow costs what the
served model costs). Alternating off/on for `--rounds` rounds, because connections land on the
workers unevenly from one server start to the next, each server gets:
1. capacity: closed-loop wrk, 16 connections;
2. latency at a fixed rate (bench/paced.lua), half the first capacity measured without shadow;
and /metrics then says how many images the shadow compared and how many it dropped.
Writes docs/shadow.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import httpx

from bench.__main__ import ROOT, WORK

CONNECTIONS = 16
PACED_CONNECTIONS = 32
WARMUP_S = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "shadow.md")
    return parser.parse_args()


def shadow_counts(url: str) -> tuple[float, float]:
    from bench.load import metric_samples

    text = httpx.get(f"{url}/metrics", timeout=10).text
    compared = sum(v for _, v in metric_samples(text, "image_classifier_shadow_comparisons_total"))
    dropped = sum(v for _, v in metric_samples(text, "image_classifier_shadow_dropped_total"))
    return compared, dropped


def main() -> None:
    args = parse_args()
    os.environ["BENTOML_HOME"] = str(WORK / "home")  # the bench store, before bentoml loads
    import bentoml

    from bench import report, servers
    from bench.assets import MODELS, ensure_model
    from bench.load import run_wrk

    WORK.mkdir(parents=True, exist_ok=True)
    tag = ensure_model(MODELS["digits"], WORK / "home", ROOT)
    model_dir = Path(bentoml.models.get(tag).path)
    image = ROOT / "examples" / "digit_7_00.png"
    shadow_on = {"image_classifier": {"rollout": {"shadow": {"tag": tag, "fraction": 1.0}}}}
    rows, rate = [], 0.0
    started = time.strftime("%Y-%m-%d %H:%M")
    for round_number in range(args.rounds):
        for shadow in (False, True):
            with servers.serve("bentoml", tag, model_dir, WORK,
                               shadow_on if shadow else {}) as running:
                def load(seconds, connections=CONNECTIONS, at=0.0):
                    return run_wrk(running.url, running.pid, image, connections, seconds,
                                   sample_batches=False, rate=at, content_type="image/png")

                load(WARMUP_S)
                capacity = load(args.seconds)
                saturated = shadow_counts(running.url)
                rate = rate or capacity.throughput / 2
                paced = load(args.seconds, PACED_CONNECTIONS, rate)
                time.sleep(1)  # the copies of the last answers
                after = shadow_counts(running.url)
            row = {"round": round_number + 1, "shadow": shadow, "capacity": capacity,
                   "paced": paced, "saturated": saturated,
                   "at_rate": (after[0] - saturated[0], after[1] - saturated[1])}
            rows.append(row)
            print(f"round {round_number + 1} shadow={'on' if shadow else 'off'}: "
                  f"{capacity.throughput:.0f}/s, p50 {paced.p50_ms:.1f} ms, "
                  f"p99 {paced.p99_ms:.1f} ms at {rate:.0f}/s; shadow compared/dropped "
                  f"{row['saturated']} saturated, {row['at_rate']} at the rate", flush=True)
    write_report(args, rows, rate, tag, started, report.machine())


def write_report(args, rows: list[dict], rate: float, tag: str, started: str,
                 machine: dict) -> None:
    def median(shadow: bool, pick) -> float:
        return statistics.median(pick(r) for r in rows if r["shadow"] == shadow)

    def errors(r) -> int:
        result = r["paced"]
        return result.status_429 + result.status_503 + result.status_504 + result.other_errors

    lines = [f"| {r['round']} | {'on' if r['shadow'] else 'off'} | "
             f"{r['capacity'].throughput:.0f} | {r['paced'].p50_ms:.1f} | "
             f"{r['paced'].p99_ms:.1f} | {errors(r)} | "
             + (f"{r['saturated'][0]:.0f} / {r['saturated'][1]:.0f} | "
                f"{r['at_rate'][0]:.0f} / {r['at_rate'][1]:.0f}" if r["shadow"] else " | ")
             + " |" for r in rows]
    summary = [
        ("capacity, answers/s (closed loop)", lambda r: r["capacity"].throughput, "{:.0f}"),
        (f"p50 at {rate:.0f}/s, ms", lambda r: r["paced"].p50_ms, "{:.1f}"),
        (f"p99 at {rate:.0f}/s, ms", lambda r: r["paced"].p99_ms, "{:.1f}"),
    ]
    summary_lines = [f"| {name} | {fmt.format(median(False, pick))} | "
                     f"{fmt.format(median(True, pick))} |" for name, pick, fmt in summary]
    args.out.write_text(f"""# Shadow traffic: cost to the served answers

`make bench-shadow` (bench/shadow.py), started {started}, on {machine['cpu']}
({machine['cores']} cores, {machine['memory_gib']} GiB), {machine['os']}.

The default model (`{tag}`) served by `bentoml serve` with the shipped configuration, without a
shadow and with one (`rollout.shadow` = the same graph, `fraction: 1.0`, so that every image is
inferred twice). wrk posts examples/digit_7_00.png: closed loop with {CONNECTIONS} connections for
{args.seconds} s (capacity), then {PACED_CONNECTIONS} connections at a fixed {rate:.0f} requests/s
(half the first capacity without shadow) for {args.seconds} s (latency). A new server for each
row, alternating, {args.rounds} rounds.

Medians over the rounds:

| | shadow off | shadow on |
|---|---|---|
{chr(10).join(summary_lines)}

Every run:

| round | shadow | capacity, answers/s | p50, ms | p99, ms | errors (paced) | shadow compared / dropped, closed loop | ... at the fixed rate |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

How it stays off the request path (serving/shadow.py): the answered batch is handed to one
thread through a queue of `queue_batches` batches; when that is full the copy is dropped and
counted (`image_classifier_shadow_dropped_total`), never waited for. The thread runs at nice 19
with a one-thread ONNX Runtime session, so on a saturated CPU the served requests get the cores
and the shadow sees a sample (the dropped columns).
""")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
