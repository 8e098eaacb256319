"""`python -m bench.cache`: what the result cache gives at 0%, 50% and 90% repeated uploads.

The default model served by `bentoml serve` with the shipped configuration.yaml, the cache off
(as shipped) and on (`cache.enabled: true`), for `--rounds` rounds, off first then on first (a
server start spreads connections over the workers differently each time, and a shared machine's
load changes). Against each server, after a short warm-up, closed-loop wrk at `--connections` for
`--seconds` per share of repeated uploads (bench/cache.lua: every upload is
examples/digit_7_00.png with a few bytes after its end, which the decoder ignores and the cache's
digest does not; a repeat is one of 16 such uploads, any other upload is new). /metrics says the
hit ratio the cache saw, and the server's process tree its CPU time per answer (on a shared
machine, the figure that other load moves least). Writes the table between the markers of
docs/caching-and-rate-limits.md, one table per `--model` (about 5 minutes each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.__main__ import ROOT, WORK

LUA = Path(__file__).with_name("cache.lua")
IMAGE = ROOT / "examples" / "digit_7_00.png"
SHARES = (0.0, 0.5, 0.9)
HOT = 16  # distinct repeated uploads: a few misses each (one per worker), then hits
WARMUP_S = 3
DOC = ROOT / "docs" / "caching-and-rate-limits.md"


def markers(model: str) -> tuple[str, str]:
    """Where one model's table goes in the page."""
    return f"<!-- bench/cache.py {model}: start -->", f"<!-- bench/cache.py {model}: end -->"


@dataclass
class Run:
    cache: bool
    share: float
    requests: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float
    hit_ratio: float | None  # from /metrics, None with the cache off
    cpu_ms: float  # CPU time of the server's processes per answer: what load elsewhere moves least

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds


def counter(url: str, name: str) -> float:
    from bench.load import metric_samples

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(value for _, value in metric_samples(text, name))


def load(url: str, share: float, label: str, connections: int, seconds: float
         ) -> dict[str, float]:
    """One closed-loop wrk run: its WRK_JSON figures (bench/multipart.lua's)."""
    command = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{int(seconds)}s",
               "--timeout", "30s", "-s", str(LUA), f"{url}/classify", "--", str(IMAGE),
               "images", "image/png", str(share), str(HOT), label]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0 or "WRK_JSON" not in finished.stdout:
        raise RuntimeError(f"wrk failed: {finished.stderr or finished.stdout}")
    stats: dict[str, float] = json.loads(finished.stdout.split("WRK_JSON ", 1)[1].splitlines()[0])
    return stats


def measure(url: str, pid: int, cache: bool, share: float, connections: int, seconds: float
            ) -> Run:
    from bench.load import cpu_seconds

    hits = "image_classifier_cache_hits_total"
    misses = "image_classifier_cache_misses_total"
    before = counter(url, hits), counter(url, misses)
    cpu = cpu_seconds(pid)
    stats = load(url, share, f"{time.time_ns()}", connections, seconds)
    cpu = cpu_seconds(pid) - cpu
    found, missed = counter(url, hits) - before[0], counter(url, misses) - before[1]
    errors = stats["requests"] - stats["status_200"]
    if errors:
        print(f"  {errors} answers were not 200", flush=True)
    return Run(cache, share, int(stats["requests"]), int(stats["status_200"]),
               stats["duration_us"] / 1e6, stats["p50_us"] / 1000, stats["p99_us"] / 1000,
               found / (found + missed) if cache and found + missed else None,
               cpu * 1000 / max(1, stats["status_200"]))


def table(runs: list[Run]) -> str:
    """One row per cache setting and share of repeats: the mean over the rounds, and each
    round's figure in brackets."""
    rows = ["| cache | repeated uploads | answers/s | vs. off | p50 ms | p99 ms | "
            "server CPU ms per answer | hit ratio (/metrics) | answers / requests |",
            "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[bool, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.cache, run.share), []).append(run)

    def figure(values: list[float], digits: int) -> str:
        mean = statistics.fmean(values)
        each = ", ".join(f"{v:.{digits}f}" for v in values)
        return f"{mean:.{digits}f} ({each})" if len(values) > 1 else f"{mean:.{digits}f}"

    for (cache, share), group in groups.items():
        throughput = statistics.fmean(r.throughput for r in group)
        off = groups.get((False, share), [])
        gain = (f"{throughput / statistics.fmean(r.throughput for r in off):.2f}x"
                if cache and off else "-")
        ratios = [r.hit_ratio for r in group if r.hit_ratio is not None]
        ratio = f"{statistics.fmean(ratios):.0%}" if ratios else "-"
        rows.append(f"| {'on' if cache else 'off'} | {share:.0%} | "
                    f"{figure([r.throughput for r in group], 0)} | {gain} | "
                    f"{figure([r.p50_ms for r in group], 1)} | "
                    f"{figure([r.p99_ms for r in group], 1)} | "
                    f"{figure([r.cpu_ms for r in group], 2)} | {ratio} | "
                    f"{sum(r.ok for r in group)} / {sum(r.requests for r in group)} |")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="per share of repeats")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="of off, then on")
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES),
                        help="shares of repeated uploads, one row each")
    parser.add_argument("--note", default="", help="said of the machine (e.g. it is shared)")
    parser.add_argument("--model", default="digits", choices=["digits", "mobilenet_v3_small",
                                                               "resnet18"],
                        help="a bench classifier (bench/assets.py MODELS): the default digits "
                        "model, or the light and heavy 224x224 ones")
    parser.add_argument("--out", type=Path, default=DOC)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from bench.assets import MODELS, default_bench_model, ensure_model

    tag, model_dir = default_bench_model()  # before bentoml is imported: the bench's store
    if args.model != "digits":
        import bentoml

        tag = ensure_model(MODELS[args.model], WORK / "home", ROOT)
        model_dir = Path(bentoml.models.get(tag).path)
    from bench import report, servers

    runs = []
    started = time.strftime("%Y-%m-%d %H:%M")
    for number in range(args.rounds):
        # Off first, then on first: a server started second could be favoured or hindered.
        for cache in (False, True) if number % 2 == 0 else (True, False):
            overrides = {"image_classifier": {"cache": {"enabled": cache}}}
            with servers.serve("bentoml", tag, model_dir, WORK, overrides) as running:
                load(running.url, 0.0, "warmup", args.connections, WARMUP_S)
                for share in args.shares:
                    runs.append(measure(running.url, running.pid, cache, share,
                                        args.connections, args.seconds))
                    print(runs[-1], flush=True)
    machine = report.machine()
    note = f"\n\n{args.note}" if args.note else ""
    start, end = markers(args.model)
    section = f"""{start}
`python -m bench.cache --model {args.model}` (bench/cache.py), {started}, on
{machine['cpu']} ({machine['cores']} cores, {machine['memory_gib']} GiB), {machine['os']}.
`{tag}` served with the shipped
configuration.yaml with the cache off and on, {args.rounds} rounds of each; closed-loop wrk,
{args.connections} connections, {args.seconds} s per row and round.{note}

{table(runs)}
{end}"""
    text = args.out.read_text()
    if start in text and end in text:
        text = text.split(start)[0] + section + text.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    args.out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
