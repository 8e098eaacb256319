"""docs/benchmarks.md, plots and the machine description, from the raw results."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import psutil

SERVERS = {"bentoml": "this project (BentoML)", "fastapi": "FastAPI, one at a time",
           "litserve": "LitServe, batching", "ray": "Ray Serve, batching",
           "torchserve": "TorchServe, batching"}


def peer_settings(results: dict) -> list[str]:
    """One line per peer server in the results: what it ran with (bench/servers.py)."""
    from bench.servers import PEER_SETTINGS

    served = {s for entry in results["models"].values() for s in entry["served"]}
    return [f"  - {SERVERS[s]}: {PEER_SETTINGS[s]}." for s in PEER_SETTINGS if s in served]


def batch_table_header(sizes: list) -> list[str]:
    """The head of a table of images/s by batch size."""
    return ["| setting | " + " | ".join(f"b={b}" for b in sizes) + " |",
            "|---|" + "---|" * len(sizes)]


def batch_row(label: str, by_batch: dict) -> str:
    """One row of images/s by batch size, as measured (keys in the header's order)."""
    return f"| {label} | " + " | ".join(f"{by_batch[b]:.0f}" for b in by_batch) + " |"

def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("bentoml", "onnxruntime-gpu", "litserve", "fastapi", "uvicorn", "uvloop",
                    "httptools", "pillow", "numpy", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    found = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(
        psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
        "python": platform.python_version(), "versions": versions}
    if gpus := nvidia_gpus():
        found["gpus"] = gpus
    return found


def nvidia_gpus() -> list[str]:
    """Each NVIDIA GPU as nvidia-smi names it, with its memory and driver; none without one."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def machine_line(m: dict) -> str:
    """The report's line on the machine (machine()'s record)."""
    return (f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
            f"Python {m['python']}" + "".join(f"; GPU {gpu}" for gpu in m.get("gpus", [])))


def ceiling_of(entry: dict) -> float:
    """The runtime's best images/s, in the served layout or on one process with all cores."""
    return max(max(entry["runtime_service_threads"].values()),
               max(entry["runtime_all_threads"].values()))


def is_detector(entry: dict) -> bool:
    return entry.get("task") == "detection"


def served_ceiling(entry: dict) -> float:
    """What the served throughput is compared with. A classifier: the runtime's best
    (ceiling_of). A detector: the best uploads/s through decode + letterbox, the runtime and
    post-processing in-process in the served layout, which its server must do per image
    whatever it is built with; its runtime alone is reported beside it."""
    if is_detector(entry):
        return max(entry["pipeline_service_threads"].values())
    return ceiling_of(entry)


def best(levels: list[dict]) -> dict:
    return max(levels, key=lambda r: r["throughput"])


def at(levels: list[dict], concurrency: int) -> dict | None:
    return next((r for r in levels if r["concurrency"] == concurrency), None)


def uploads_line(results: dict) -> str:
    """Which image each classifier was sent: the same for every server."""
    from bench.assets import UPLOADS

    sent: dict[str, list[str]] = {}
    for key, entry in results["models"].items():
        if not is_detector(entry):
            sent.setdefault(entry.get("upload", "jpeg"), []).append(key)
    return "; ".join(
        f"{', '.join(keys)}: a {UPLOADS[upload][0]} ({results['images'][upload] / 1000:.1f} kB)"
        for upload, keys in sent.items()) + (", the same for every server, as "
                                             "multipart/form-data.")


def best_peer(entry: dict, concurrency: int) -> tuple[str, dict | None]:
    """The peer with the most answers/s at `concurrency`, and its level (None: no peer ran)."""
    theirs = {name: at(run["levels"], concurrency) for name, run in entry["served"].items()
              if name != "bentoml"}
    theirs = {name: level for name, level in theirs.items() if level}
    if not theirs:
        return "", None
    return max(theirs.items(), key=lambda item: item[1]["throughput"])


def peer_rows(key: str, entry: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 18's goals against the peers on one model: at 64 and 128 connections >= 1.3x the
    best peer's throughput with a p99 at or below its; at 1 and 4 connections a p50 within 10%
    of FastAPI's (no batching); at 1 connection a p99 within 3x the p50."""
    served = entry["served"]
    ours = served.get("bentoml")
    if not ours:
        return []
    rows: list[tuple[str, str, bool | None]] = []
    for c in (64, 128):
        level, (name, peer) = at(ours["levels"], c), best_peer(entry, c)
        if not level or not peer:
            continue
        ratio = level["throughput"] / peer["throughput"]
        rows.append((f"{key}: c={c} ≥ 1.3x the best peer ({SERVERS.get(name, name)}), p99 at "
                     "or below its",
                     f"{level['throughput']:.0f} vs {peer['throughput']:.0f} req/s = {ratio:.2f}x"
                     f"; p99 {level['p99_ms']:.0f} vs {peer['p99_ms']:.0f} ms",
                     ratio >= 1.3 and level["p99_ms"] <= peer["p99_ms"]))
    fastapi = served.get("fastapi")
    for c in (1, 4):
        level = at(ours["levels"], c)
        other = at(fastapi["levels"], c) if fastapi else None
        if level and other:
            rows.append((f"{key}: c={c} p50 within 10% of FastAPI's (no batching)",
                         f"{level['p50_ms']:.1f} vs {other['p50_ms']:.1f} ms",
                         level["p50_ms"] <= 1.1 * other["p50_ms"]))
    for route, figures in ours.get("floor", {}).items():
        rows.append((f"{key}: c=1 floor, {route}",
                      f"p50 {figures['p50_ms']:.2f} ms, {figures['throughput']:.0f} req/s",
                      None))
    level = at(ours["levels"], 1)
    if level:
        rows.append((f"{key}: c=1 p99 within 3x its p50",
                     f"{level['p99_ms']:.1f} / {level['p50_ms']:.1f} ms = "
                     f"{level['p99_ms'] / level['p50_ms']:.1f}x",
                     level["p99_ms"] <= 3 * level["p50_ms"]))
    return rows


def load_rows(key: str, entry: dict, litserve_idle_mb: float | None, on_gpu: bool = False
              ) -> list[tuple[str, str, bool | None]]:
    """Goodput (200s only) at 128 and 256 connections >= 90% of the peak; idle RSS of the whole
    server at most LitServe's; peak RSS at 128 connections <= 600 MB, a CPU server's target
    (`on_gpu`: reported, not judged; each GPU worker holds CUDA's and cuDNN's libraries)."""
    ours = entry["served"].get("bentoml")
    if not ours:
        return []
    rows: list[tuple[str, str, bool | None]] = []
    peak = best(ours["levels"])
    for c in (128, 256):
        level = at(ours["levels"], c)
        if level:
            share = level["throughput"] / peak["throughput"]
            refused = level["status_429"] + level["status_503"] + level["status_504"]
            rows.append((f"{key}: goodput at c={c} ≥ 90% of the peak",
                         f"{level['throughput']:.0f} / {peak['throughput']:.0f} = {share:.0%} "
                         f"({refused} refused)", share >= 0.90))
    if "idle_rss_mb" in ours and litserve_idle_mb:
        rows.append((f"{key}: idle RSS (all processes) ≤ LitServe's",
                     f"{ours['idle_rss_mb']:.0f} vs {litserve_idle_mb:.0f} MB"
                     + processes_note(ours.get("idle_rss_processes_mb", [])),
                     ours["idle_rss_mb"] <= litserve_idle_mb))
    level = at(ours["levels"], 128)
    if level:
        rows.append((f"{key}: peak RSS at c=128" + (" (≤ 600 MB on a CPU)" if on_gpu else
                                                     " ≤ 600 MB"),
                     f"{level['server_rss_mb']:.0f} MB",
                     None if on_gpu else level["server_rss_mb"] <= 600))
    return rows


def processes_note(sizes: list[float]) -> str:
    """" (main process 101 MB, 2 processes 139-140 MB)": where a server's idle memory sits
    (for this service: BentoML's main process, then its workers)."""
    if len(sizes) < 2:
        return ""
    main, workers = sizes[0], sizes[1:]
    spread = (f"{min(workers):.0f}-{max(workers):.0f}" if round(min(workers)) != round(max(workers))
              else f"{workers[0]:.0f}")
    return (f" (main process {main:.0f} MB, {len(workers)} "
            f"{'process' if len(workers) == 1 else 'processes'} {spread} MB)")


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    rows = []
    models = results["models"]
    on_gpu = results["args"].get("gpu") == "True"  # `python -m bench --gpu`
    if "mobilenet_v3_small" in models:
        light = models["mobilenet_v3_small"]
        ceiling = ceiling_of(light)
        ours = light["served"].get("bentoml")
        if ours:
            peak = best(ours["levels"])
            ratio = peak["throughput"] / ceiling
            rows.append(("light: served ≥ 60% of the runtime's best batched throughput",
                         f"{peak['throughput']:.0f} / {ceiling:.0f} img/s = {ratio:.0%}",
                         ratio >= 0.60))
            for c in (64, 128):
                level = at(ours["levels"], c)
                if level:
                    share = level["throughput"] / peak["throughput"]
                    rows.append((f"light: throughput at c={c} ≥ 90% of peak",
                                 f"{level['throughput']:.0f} / {peak['throughput']:.0f} = "
                                 f"{share:.0%}", share >= 0.90))
            level = at(ours["levels"], 64)
            if level:
                rows.append(("light: p99 at c=64 ≤ 500 ms", f"{level['p99_ms']:.0f} ms",
                             level["p99_ms"] <= 500))
                for peer, factor in (("fastapi", 1.5), ("litserve", 1.2)):
                    other = light["served"].get(peer)
                    if other and at(other["levels"], 64):
                        theirs = at(other["levels"], 64)["throughput"]
                        rows.append((f"light: ≥ {factor}x {SERVERS[peer]} at c=64",
                                     f"{level['throughput']:.0f} vs {theirs:.0f} req/s = "
                                     f"{level['throughput'] / theirs:.2f}x",
                                     level["throughput"] >= factor * theirs))
    if "resnet18" in models and "bentoml" in models["resnet18"]["served"]:
        heavy = models["resnet18"]
        ceiling = ceiling_of(heavy)
        peak = best(heavy["served"]["bentoml"]["levels"])
        ratio = peak["throughput"] / ceiling
        rows.append(("heavy: served ≥ 90% of the runtime's best batched throughput",
                     f"{peak['throughput']:.1f} / {ceiling:.1f} img/s = {ratio:.0%}",
                     ratio >= 0.90))
    if "resnet50" in models and "bentoml" in models["resnet50"]["served"]:
        entry = models["resnet50"]
        ceiling = ceiling_of(entry)
        levels = entry["served"]["bentoml"]["levels"]
        peak = best(levels)
        rows.append(("GPU, resnet50: served vs raw runtime throughput",
                     f"{peak['throughput']:.0f} / {ceiling:.0f} img/s = "
                     f"{peak['throughput'] / ceiling:.0%}", None))
        half = min((r for r in levels if r["throughput"] >= 0.5 * peak["throughput"]),
                   key=lambda r: r["concurrency"])
        rows.append(("GPU, resnet50: p99 at half load",
                     f"{half['p99_ms']:.0f} ms at c={half['concurrency']} "
                     f"({half['throughput']:.0f} answers/s)", None))
    for key, entry in models.items():
        if is_detector(entry) and "bentoml" in entry["served"]:
            rows += detector_targets(key, entry)
    for key, entry in models.items():
        if not is_detector(entry):
            litserve = entry["served"].get("litserve", {})
            rows += peer_rows(key, entry) + load_rows(key, entry, litserve.get("idle_rss_mb"),
                                                      on_gpu)
    ready = [m["served"]["bentoml"]["ready_s"] for m in models.values()
             if "bentoml" in m["served"]]
    if ready:
        # A GPU worker first starts CUDA and loads cuDNN (the H200 runs: 8-9 s): reported there.
        rows.append(("ready (/readyz 200)" + (" (within 5 s on a CPU)" if on_gpu else
                                              " within 5 s of start"),
                     f"{max(ready):.1f} s (slowest model)", None if on_gpu else max(ready) <= 5))
    return rows


# --- What bounds each miss, from the run's own measurements -----------------------------------


def miss_bounds(results: dict) -> list[str]:
    """For each goal against a peer that the run missed (1.3x the best peer at 64 and 128
    connections, FastAPI's p50 at 1 and 4), what the run's own figures say holds it: the
    runtime's ceiling, the CPU budget of one answer, the runtime's threads, the cost of a
    request that does no work. None for a GPU run (its goals are the CPU's)."""
    if results["args"].get("gpu") == "True":
        return []
    bounds = []
    for key, entry in results["models"].items():
        if is_detector(entry) or "bentoml" not in entry["served"]:
            continue
        bounds += [text for c in (64, 128) if (text := peer_bound(key, entry, c, results))]
        bounds += [text for c in (1, 4) if (text := latency_bound(key, entry, c, results))]
    return bounds


def work_ms(entry: dict, cores: int) -> tuple[float, float]:
    """Core-ms per image of the runtime at its best batch, and of decoding the upload: what any
    server for this model spends on an answer."""
    return cores * 1000 / ceiling_of(entry), entry["decode_ms"][entry.get("upload", "jpeg")]


def floor_core_ms(ours: dict) -> tuple[str, float] | None:
    """The cheapest floor route and its server core-ms per request (results before the floor
    measured CPU: none)."""
    costs = [(route, f["server_core_ms"]) for route, f in ours.get("floor", {}).items()
             if "server_core_ms" in f]
    return min(costs, key=lambda item: item[1]) if costs else None


def peer_bound(key: str, entry: dict, c: int, results: dict) -> str | None:
    """Why 1.3x the best peer at `c` connections was missed, or None if it was met."""
    ours, (name, peer) = at(entry["served"]["bentoml"]["levels"], c), best_peer(entry, c)
    if not ours or not peer:
        return None
    goal, who = 1.3 * peer["throughput"], SERVERS[name]
    if ours["throughput"] >= goal and ours["p99_ms"] <= peer["p99_ms"]:
        return None
    head = (f"- **{key}, {c} connections**: 1.3x {who} ({peer['throughput']:.0f} answers/s) is "
            f"{goal:.0f}/s; this service answered {ours['throughput']:.0f}/s")
    if ours["throughput"] >= goal:
        return head + (f", with a p99 of {ours['p99_ms']:.0f} ms against its "
                       f"{peer['p99_ms']:.0f}: the throughput goal is met, the tail's is not.")
    cores = results["machine"]["cores"]
    runtime_ms, decode_ms = work_ms(entry, cores)
    any_server = cores * 1000 / (runtime_ms + decode_ms)
    if goal > any_server:
        return head + (
            f". No server can answer that on these {cores} cores: the runtime at its best batch "
            f"({runtime_ms:.2f} core-ms per image) and decoding the upload ({decode_ms:.2f}) "
            f"allow at most {any_server:.0f}/s, of which {who} answers "
            f"{peer['throughput'] / any_server:.0%} and this service "
            f"{ours['throughput'] / any_server:.0%}. What would lift it: more cores, or a GPU "
            f"(benchmarks-gpu.md).")
    used = ours["server_cpu_cores"]
    spent, budget = used * 1000 / ours["throughput"], used * 1000 / goal
    text = head + (
        f" on {used:.2f} cores: {spent:.2f} core-ms per answer, where 1.3x allows {budget:.2f} on "
        f"those cores ({1 - budget / spent:.0%} less; {who} spends "
        f"{peer['server_cpu_cores'] * 1000 / peer['throughput']:.2f}). The runtime at its best "
        f"batch and decoding take {runtime_ms + decode_ms:.2f} of the {budget:.2f}")
    if floor := floor_core_ms(entry["served"]["bentoml"]):
        route, floor_ms = floor
        left = budget - runtime_ms - decode_ms - floor_ms
        text += (f", and a request this service answers without work, the {route}, "
                 f"{floor_ms:.2f} at 1 connection: "
                 + (f"{left:.2f} core-ms would be left for multipart, validation, admission, "
                    f"batching, metrics, the request log and the JSON answer" if left > 0 else
                    "more than the budget before any of the request's own work"))
    text += "."
    if profile := profiles_of(results).get(f"{key}, c={c}"):
        text += " Where a worker's CPU went at this level (py-spy): " + ", ".join(
            f"{stage} {share:.0%}" for stage, share in profile.items()) + "."
    return text + (" What would lift it: fewer core-ms per answer around the work"
                   + (" (HTTP parsed off the Python event loop, as TorchServe's Java front "
                      "end does before it hands its Python worker whole batches)"
                      if name == "torchserve" else "") + ", or more cores.")


def latency_bound(key: str, entry: dict, c: int, results: dict) -> str | None:
    """Why a p50 within 10% of FastAPI's (no batching) at `c` connections was missed, or None
    if it was met."""
    ours = at(entry["served"]["bentoml"]["levels"], c)
    fastapi = entry["served"].get("fastapi")
    theirs = at(fastapi["levels"], c) if fastapi else None
    if not ours or not theirs or ours["p50_ms"] <= 1.1 * theirs["p50_ms"]:
        return None
    cores, service = results["machine"]["cores"], results["service"]
    decode_ms = work_ms(entry, cores)[1]
    served_ms = service["workers"] * 1000 / by_batch(entry["runtime_service_threads"], 1)
    all_cores_ms = 1000 / by_batch(entry["runtime_all_threads"], 1)
    every_core = alone_on_every_core(entry, service, served_ms, cores)
    alone_ms = all_cores_ms if every_core else served_ms
    image_ms = alone_ms if c == 1 else served_ms  # a request alone only at 1 connection
    head = (f"- **{key}, {c} connection{'s' if c > 1 else ''}**: p50 {ours['p50_ms']:.1f} ms "
            f"against FastAPI's {theirs['p50_ms']:.1f} (10% over is "
            f"{1.1 * theirs['p50_ms']:.1f})")
    if c == 1 and every_core and alone_ms + decode_ms > 1.1 * theirs["p50_ms"]:
        return head + (
            f". A request alone runs on every core here (model.lone_request_threads), as "
            f"FastAPI's does: the image through the runtime takes {alone_ms:.1f} ms and decoding "
            f"it {decode_ms:.2f} ms in this run's ceiling, already over; the two servers' runtimes "
            f"ran at different speeds in their own starts.")
    if c == 1 and served_ms + decode_ms > 1.1 * theirs["p50_ms"] and not every_core:
        return head + (
            f". One image through the runtime as served ({service['intra_op_threads']} thread "
            f"per worker) takes {served_ms:.1f} ms and decoding it {decode_ms:.2f} ms, already "
            f"over; FastAPI's runtime spreads the image over every core ({all_cores_ms:.1f} ms). "
            f"What would lift it: `model.intra_op_threads: {cores}`, at the price the levers "
            f"table measures under load" + thread_lever(results, key) + ".")
    if ours["server_cpu_cores"] < 0.75 * min(c, cores):
        pinned = (f". The server used {ours['server_cpu_cores']:.2f} of {cores} cores: "
                  f"keep-alive connections stay on the worker that accepted them, and these {c} "
                  f"landed unevenly. ")
        if service.get("connections_balance"):  # absent in runs before it was recorded
            return head + pinned + (
                "`connections.balance` was on and did not move them: it closes connections "
                "only on a busy worker over its share (serving/balance.py); the server's "
                "image_classifier_connections_rebalanced_total says whether it closed any.")
        return head + pinned + (
            "What would lift it: `connections.balance` (serving/balance.py), which moves "
            "connections off a busy worker over its share.")
    text = head + (". One image through the runtime as served"
                   + (" (on every core, a request alone)" if every_core and c == 1 else "")
                   + f" and its decoding take {image_ms + decode_ms:.2f} ms, work FastAPI "
                   f"also does"
                   + (f" (its runtime on every core: {all_cores_ms:.2f} ms for the image)"
                      if all_cores_ms < image_ms else ""))
    floors = entry["served"]["bentoml"].get("floor", {})
    if floors:
        text += "; requests that do no work here: " + ", ".join(
            f"{route} p50 {f['p50_ms']:.2f} ms" for route, f in floors.items())
    return text + (
        f". The rest of the {ours['p50_ms'] - theirs['p50_ms']:.2f} ms over FastAPI is what this "
        f"service's path adds to a request (admission and limits, the request log, metrics, the "
        f"drift window, BentoML's outer middlewares and its input and output models, a call of "
        f"over 1 ms handed to a thread): the price of those features, not a bound of the machine "
        f"(docs/request-path.md, `make bench-request-path`, times them one by one inside a "
        f"worker)" + thread_lever(results, key) + ".")


def alone_on_every_core(entry: dict, service: dict, served_ms: float, cores: int) -> bool:
    """Whether the run's service answered a request alone on every core: the session for calls
    alone (serving/cores.py, model.lone_request_threads), as the server's /model_info said
    (`lone_request_threads` of its served entry). Runs before that was recorded: `auto` opened
    it then (round 10) for a model whose image took 10 ms or more on a worker's threads
    (`served_ms` here); runs before the setting existed: never."""
    served = entry["served"]["bentoml"].get("lone_request_threads")
    if served is not None:
        return bool(served >= cores)
    setting = service.get("lone_request_threads")
    if setting is None:
        return False
    own = service["intra_op_threads"] or cores
    wanted = (cores if served_ms >= 10 else 0) if setting == "auto" else int(setting) or cores
    return bool(wanted > own and wanted >= cores)


def by_batch(rates: dict, size: int) -> float:
    """Images/s at one batch size (results.json keeps the sizes as strings)."""
    return rates[str(size)] if str(size) in rates else rates[size]


def thread_lever(results: dict, key: str) -> str:
    """" (levers, 2 workers x 2 ORT threads: 46.8/s against 27.3 shipped at c=1; ...)": the
    levers that give each worker more runtime threads on `key`, each against the shipped
    layout (the levers' own start of it, else the main table's)."""
    rows = [r for r in results.get("levers", []) if r["model"] == key
            and "ORT threads" in r["name"] and "spinning" not in r["name"]]
    shipped = {r["concurrency"]: r["throughput"] for r in results.get("levers", [])
               if r["model"] == key and r["name"] == "shipped defaults"}
    main = {level["concurrency"]: level["throughput"] for level in
            results["models"][key]["served"]["bentoml"]["levels"]}
    parts = [f"{r['throughput']:.1f}/s against "
             f"{shipped.get(r['concurrency'], main.get(r['concurrency'], 0)):.1f} shipped at "
             f"c={r['concurrency']}" for r in rows
             if r["concurrency"] in shipped or r["concurrency"] in main]
    return f" (levers, {rows[0]['name']}: " + "; ".join(parts) + ")" if parts else ""


def detector_targets(key: str, entry: dict) -> list[tuple[str, str, bool | None]]:
    """The classifier's load targets for the detector (c=128 >= 90% of the peak, p99 at c=64
    <= 500 ms), and its served share of its ceiling, for which no target is set."""
    levels = entry["served"]["bentoml"]["levels"]
    peak = best(levels)
    ceiling = served_ceiling(entry)
    rows: list[tuple[str, str, bool | None]] = [(
        f"{key}: served vs its ceiling (decode + runtime + post-processing, in-process)",
        f"{peak['throughput']:.0f} / {ceiling:.0f} uploads/s = "
        f"{peak['throughput'] / ceiling:.0%} (runtime alone: {ceiling_of(entry):.0f} img/s)",
        None)]
    level = at(levels, 128)
    rows.append((f"{key}: throughput at c=128 ≥ 90% of peak",
                 f"{level['throughput']:.0f} / {peak['throughput']:.0f} = "
                 f"{level['throughput'] / peak['throughput']:.0%}" if level else "not measured",
                 level["throughput"] >= 0.90 * peak["throughput"] if level else None))
    level = at(levels, 64)
    rows.append((f"{key}: p99 at c=64 ≤ 500 ms",
                 f"{level['p99_ms']:.0f} ms" if level else "not measured",
                 level["p99_ms"] <= 500 if level else None))
    return rows


def detector_analysis(key: str, entry: dict, cores: int) -> str:
    """The detector's CPU budget of one answer: runtime, decode + letterbox, post-processing,
    and what serving adds."""
    stages = entry["stages"]
    runtime, pipeline = ceiling_of(entry), served_ceiling(entry)
    runtime_ms, pipeline_ms = cores * 1000 / runtime, cores * 1000 / pipeline
    upload = entry["upload"]
    text = (
        f"**{key}** (`service:ObjectDetector`, /detect): the runtime alone answers at most "
        f"{runtime:.0f} images/s on {cores} cores ({runtime_ms:.2f} core-ms per image). Per "
        f"upload the server also decodes and letterboxes the {upload['width']}x"
        f"{upload['height']} PNG ({upload['bytes'] / 1000:.0f} kB; {stages['decode_ms']:.2f} ms "
        f"on one core) and post-processes the dense outputs (threshold, per-class NMS, top-k, "
        f"boxes mapped back: {stages['postprocess_ms']:.2f} ms for "
        f"{len(stages['detections'])} detections), against {stages['runtime_ms']:.2f} ms for "
        f"the runtime at batch 1. Through all three, in-process in the served layout: "
        f"{pipeline:.0f} uploads/s ({pipeline_ms:.2f} core-ms each, {pipeline / runtime:.0%} of "
        f"the runtime alone). That is the ceiling the served share uses: work any server for "
        f"this model must do per image, which leaves what is measured against it to HTTP, "
        f"multipart, batching and JSON; a ratio to the runtime alone would charge the decode "
        f"and NMS to the serving layer.")
    if "bentoml" in entry["served"]:
        peak = best(entry["served"]["bentoml"]["levels"])
        spent = peak["server_cpu_cores"] * 1000 / peak["throughput"]
        text += (
            f" The service peaked at {peak['throughput']:.0f}/s (c={peak['concurrency']}) = "
            f"{peak['throughput'] / pipeline:.0%} of it, using {peak['server_cpu_cores']:.2f} "
            f"cores: {spent:.2f} core-ms per answer, {max(spent - pipeline_ms, 0):.2f} more than "
            f"the in-process pipeline.")
    return text


def analysis(results: dict) -> str:
    """Per model: the CPU budget of one answer. What the runtime (at its best) and decoding the
    upload cost bound what any server on this machine can answer; the rest is serving overhead."""
    cores = results["machine"]["cores"]
    paragraphs = []
    for key, entry in results["models"].items():
        if is_detector(entry):
            paragraphs.append(detector_analysis(key, entry, cores))
            continue
        if "bentoml" not in entry["served"] or entry["kind"] not in ("light", "heavy"):
            continue
        ceiling = ceiling_of(entry)
        as_served = max(entry["runtime_service_threads"].values())
        runtime_ms, decode_ms = work_ms(entry, cores)
        upload = entry.get("upload", "jpeg")  # results before per-model uploads: the 640x480
        bound = cores * 1000 / (runtime_ms + decode_ms)
        peak = best(entry["served"]["bentoml"]["levels"])
        spent = peak["server_cpu_cores"] * 1000 / peak["throughput"]
        paragraphs.append(
            f"**{key}** ({entry['kind']}): the runtime's best on {cores} cores is {ceiling:.0f} "
            f"images/s ({runtime_ms:.2f} core-ms per image; {as_served:.0f}/s in the served layout "
            f"of one single-threaded runtime per worker), and decoding the "
            f"{results['images'][upload] / 1000:.0f} kB upload costs {decode_ms:.2f} core-ms more, "
            f"which the ceiling leaves out. A server that did nothing else could answer at most "
            f"{bound:.0f} uploads/s = {bound / ceiling:.0%} of the ceiling. The service peaked at "
            f"{peak['throughput']:.0f}/s (c={peak['concurrency']}) = "
            f"{peak['throughput'] / bound:.0%}"
            f" of that bound, using {peak['server_cpu_cores']:.2f} cores: {spent:.2f} core-ms per "
            f"answer, {max(spent - runtime_ms - decode_ms, 0):.2f} more than runtime plus decoding "
            f"(HTTP, multipart, validation, batching, JSON, Python, and the runtime running slower "
            f"beside a busy event loop than alone).")
    repeat = next((r for r in results.get("levers", []) if r["name"] == "shipped defaults"
                   and r["model"] == "mobilenet_v3_small"), None)
    light = results["models"].get("mobilenet_v3_small", {}).get("served", {}).get("bentoml")
    if repeat and light and at(light["levels"], repeat["concurrency"]):
        first = at(light["levels"], repeat["concurrency"])["throughput"]
        paragraphs.append(
            f"Noise: the shipped configuration on the light model at c={repeat['concurrency']} "
            f"was measured twice (main table, levers table): {first:.0f} and "
            f"{repeat['throughput']:.0f} answers/s, {abs(first - repeat['throughput']) / first:.0%}"
            f" apart. This is a shared 2-core VM; read differences smaller than that as noise.")
    for run, shares in profiles_of(results).items():
        top = ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
        paragraphs.append(f"Profile of one worker, {run} (py-spy, busy samples): {top}.")
    return "\n\n".join(paragraphs)


def profiles_of(results: dict) -> dict[str, dict[str, float]]:
    """The py-spy shares by run ("model, c=N"); results.json from before several runs were
    profiled held one, of the light model at c=64."""
    profiles = results.get("profile") or {}
    if profiles and not isinstance(next(iter(profiles.values())), dict):
        return {"mobilenet_v3_small, c=64": profiles}
    return profiles


def plot(results: dict, out: Path, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric, label, filename in (("throughput", "answers/s", "throughput"),
                                    ("p99_ms", "p99 latency (ms)", "p99")):
        models = results["models"]
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, (key, entry) in zip(axes[0], models.items()):
            for server, served in entry["served"].items():
                xs = [r["concurrency"] for r in served["levels"]]
                ax.plot(xs, [r[metric] for r in served["levels"]], marker="o",
                        label=SERVERS[server])
            if metric == "throughput" and is_detector(entry):
                ax.axhline(ceiling_of(entry), color="grey", linestyle="--",
                           label="runtime alone")
                ax.axhline(served_ceiling(entry), color="black", linestyle=":",
                           label="decode + runtime + post-processing")
                ax.legend(fontsize=8)
            elif metric == "throughput":
                ceiling = ceiling_of(entry)
                ax.axhline(ceiling, color="grey", linestyle="--", label="runtime ceiling")
            ax.set_xscale("log", base=2)
            if metric == "p99_ms":
                ax.set_yscale("log")  # one-at-a-time tails reach seconds; batching stays in ms
            ax.set_title(key)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        name = f"{filename}{suffix}.png"
        fig.savefig(out / "bench" / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


SERVED_HEADER = [
    "| server | c | answers/s | p50 ms | p95 ms | p99 ms | 429 | 503 | 504 | other errors "
    "| server CPU (cores) | server RSS MB | loadgen CPU (cores) | mean batch |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def served_rows(entry: dict) -> list[str]:
    """The load table of one model (every server, every level) and its start-to-ready line."""
    lines = list(SERVED_HEADER)
    for server, served in entry["served"].items():
        for r in served["levels"]:
            batch = r["batch_sizes"].get("mean")
            lines.append(
                f"| {SERVERS[server]} | {r['concurrency']} | {r['throughput']:.1f} | "
                f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
                f"{r['status_429']} | {r['status_503']} | {r['status_504']} | "
                f"{r['other_errors']} | {r['server_cpu_cores']:.2f} | "
                f"{r['server_rss_mb']:.0f} | {r['loadgen_cpu_cores']:.3f} | "
                f"{f'{batch:.1f}' if batch else '-'} |")
    ready = ", ".join(f"{SERVERS[s]} {v['ready_s']:.1f} s" for s, v in entry["served"].items())
    return [*lines, "", f"Start to ready: {ready}.", ""]


def detector_section(key: str, entry: dict) -> list[str]:
    svc, upload, stages = entry["service"], entry["upload"], entry["stages"]
    sizes = list(entry["runtime_service_threads"])
    layout = f"{svc['workers']} processes x {svc['intra_op_threads']} thread (as served)"
    found = ", ".join(d["label"] for d in stages["detections"]) or "none"
    thresholds = ", ".join(f"{k} {v}" for k, v in svc["detection"].items())
    lines = [
        f"## {key} (`service:ObjectDetector`; `{entry['tag']}`)",
        "",
        f"Served as configured under `services: ObjectDetector:`: {svc['workers']} workers x "
        f"{svc['intra_op_threads']} ONNX Runtime thread(s), providers {svc['providers']}, "
        f"max_batch_size {svc['max_batch_size']}, max_latency_ms {svc['max_latency_ms']}; "
        f"{thresholds}.",
        "",
        f"Upload: a {upload['width']}x{upload['height']} PNG ({upload['bytes'] / 1000:.1f} kB, "
        f"{upload['background']} background) with {len(upload['labels'])} digits never seen in "
        f"training ({', '.join(map(str, upload['labels']))}), composed by `bench/assets.py` from "
        f"`train_export.detection.scenes`, POSTed to /detect as multipart/form-data. The "
        f"detector finds: {found}.",
        "",
        "Ceiling, in-process, no HTTP (images/s by batch size). The served share in the targets "
        "uses the last row: decode + letterbox, runtime and post-processing are work the server "
        "must do per upload, so the runtime alone is a ceiling no server reaches:",
        "",
        *batch_table_header(sizes),
        batch_row(f"runtime alone, {layout}", entry["runtime_service_threads"]),
        batch_row("runtime alone, 1 process, all cores", entry["runtime_all_threads"]),
        batch_row(f"decode + letterbox + runtime + post-processing, {layout}",
                  entry["pipeline_service_threads"]),
        "",
        f"One upload on one core: decode + letterbox {stages['decode_ms']:.2f} ms (PNG; the "
        f"same scene as a {upload['jpeg_bytes'] / 1000:.1f} kB JPEG: "
        f"{entry['decode_ms']['jpeg']:.2f} ms), runtime {stages['runtime_ms']:.2f} ms (batch 1), "
        f"post-processing {stages['postprocess_ms']:.2f} ms.",
        "",
    ]
    return lines + served_rows(entry)


def shape_change_lines(entry: dict) -> list[str]:
    """A `--gpu` run's calls of one runtime whose batch size changes from call to call."""
    if "shape_changes_ms" not in entry:
        return []
    return ["One runtime, not settled, its batch size changing from call to call (size: ms): "
            + ", ".join(f"{rows}: {ms:.0f}" for rows, ms in entry["shape_changes_ms"]) + ".", ""]


def run_options(args: dict[str, str]) -> str:
    """The options of `python -m bench` that shape the measurements, as given to this run."""
    def listed(value: str) -> str:
        return " ".join(str(v) for v in ast.literal_eval(value))

    return " ".join([*(["--gpu"] if args.get("gpu") == "True" else []),
                     f"--models {listed(args['models'])}", f"--servers {listed(args['servers'])}",
                     f"--concurrency {listed(args['concurrency'])}",
                     f"--duration {args['duration']}",
                     f"--ceiling-seconds {args['ceiling_seconds']}",
                     f"--config {Path(args['config']).name}",
                     # A part left out keeps its last measurement, which says when it was taken.
                     *(["--no-levers"] if args.get("levers") == "False" else []),
                     *(["--no-curves"] if args.get("curves") == "False" else [])])


# Bench model kinds (bench/assets.py) that are trained as shipped, not exported with random weights.
TRAINED = ("default", "detector")


def write(results: dict, out: Path, suffix: str = "") -> None:
    plots = plot(results, out, suffix)
    m = results["machine"]
    svc = results["service"]
    detectors = {k: e for k, e in results["models"].items() if is_detector(e)}
    lines = [
        "# Benchmarks" + (" (GPU)" if suffix else ""),
        "",
        *(["**A `--quick` smoke run** (short levels, on whatever else the machine was doing): "
           "not a result. `make bench` measures the report.", ""] if results.get("quick") else []),
        f"Produced by `make bench` (`python -m bench`) on {results['started']} UTC. Raw numbers: "
        f"[bench/results{suffix}.json](bench/results{suffix}.json).",
        "",
        machine_line(m),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- Run: `python -m bench {run_options(results['args'])}`",
        f"- Service configuration ({Path(results['args']['config']).name}): "
        f"{svc['workers']} workers x "
        f"{svc['intra_op_threads']} ONNX Runtime thread(s), providers {svc['providers']}, "
        f"max_batch_size {svc['max_batch_size']}, max_latency_ms {svc['max_latency_ms']}",
        "- Models: exported through the project's own path (`python -m train_export`); "
        + " and ".join(k for k, e in results["models"].items() if e["kind"] not in TRAINED)
        + " at 224x224 with **random weights** (`--epochs 0`: speed only, their answers mean "
        "nothing)" + ("; the digits model trained as shipped" if "digits" in results["models"]
                      else "")
        + ("; the detector (`digits-detector`, 128x128 letterboxed input) trained as shipped "
           "(`--task detection`)." if detectors else "."),
        "- Uploads: " + uploads_line(results)
        + (" The detector: one composed scene, the same for every request, as a PNG (its "
           "section says what is in it)." if detectors else ""),
        f"- Load: `wrk`, closed loop (each connection sends its next request when the last is "
        f"answered), {results['args']['duration']} s per level after a 3 s warm-up, from the same "
        "machine; its own CPU use is in the tables (`loadgen CPU`).",
        "- Peers run the same ONNX graph through the same decode, runtime and postprocess code "
        "(`bench/peers/`), so only the serving layer differs"
        + (". They classify only: the detector is served by this project alone." if detectors
           else "."),
        *peer_settings(results),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, figure, met in targets(results):
        verdict = "-" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {figure} | {verdict} |")
    if bounds := miss_bounds(results):
        lines += ["", "## What holds each missed goal against a peer", "",
                  "From this run's own figures: the runtime's ceiling and the decode cost "
                  "(each model's section), the server's CPU at the level, the floor routes at 1 "
                  "connection, the profiles and the levers below.", "", *bounds]
    lines += ["", *(f"![{p}](bench/{p})" for p in plots), ""]
    for key, entry in results["models"].items():
        if is_detector(entry):
            lines += detector_section(key, entry)
            continue
        sizes = list(entry["runtime_service_threads"])
        lines += [
            f"## {key} ({entry['kind']}; `{entry['tag']}`)",
            "",
            "Runtime ceiling, in-process ONNX Runtime, no HTTP (images/s by batch size):",
            "",
            *batch_table_header(sizes),
            batch_row(f"{svc['workers']} processes x {svc['intra_op_threads']} thread "
                      "(as served)", entry["runtime_service_threads"]),
            batch_row("1 process, all cores", entry["runtime_all_threads"]),
            "",
            "Decode + preprocess alone (one core): " + ", ".join(
                f"{fmt.upper()} {ms:.2f} ms" for fmt, ms in entry["decode_ms"].items()) + ".",
            "",
            *shape_change_lines(entry),
        ]
        lines += served_rows(entry)
    if "litserve_tuning" in results:
        lines += ["## LitServe tuning (mobilenet_v3_small, c=64; the best is used above)", "",
                  "| configuration | answers/s | p99 ms |", "|---|---|---|"]
        lines += [f"| {name} | {r['throughput']:.1f} | {r['p99_ms']:.0f} |"
                  for name, r in results["litserve_tuning"].items()]
        lines.append("")
    if results.get("levers"):
        when = (f" Measured {results['levers_measured']} UTC, apart from the tables above."
                if results.get("levers_measured") else "")
        lines += ["## Levers (one change at a time against configuration.yaml)", "",
                  "Each row is its own server start, warm-up and run." + when, "",
                  "| model | c | configuration | answers/s | p99 ms | 503 | server CPU (cores) |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["levers"]:
            lines.append(f"| {r['model']} | {r['concurrency']} | {r['name']} | "
                         f"{r['throughput']:.1f} | {r['p99_ms']:.0f} | {r['status_503']} | "
                         f"{r['server_cpu_cores']:.2f} |")
        lines.append("")
    if profiles := profiles_of(results):
        runs = list(profiles)
        stages = list(dict.fromkeys(stage for shares in profiles.values() for stage in shares))
        lines += ["## Where a worker's CPU goes (py-spy, share of busy samples)", "",
                  "| stage | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        lines += [f"| {stage} | " + " | ".join(f"{profiles[run].get(stage, 0):.0%}"
                                               for run in runs) + " |" for stage in stages]
        lines.append("")
    if not suffix and (curves := out / "bench" / "curves.json").exists():  # bench/curves.py
        lines += write_curves_plots(json.loads(curves.read_text()), out)
    if analysis := results.get("analysis"):
        lines += ["## Analysis", "", analysis, ""]
    (out / f"benchmarks{suffix}.md").write_text("\n".join(lines))


# --- How cost grows (bench/curves.py): its section of benchmarks.md, its plots -----------------

CURVES_HEADING = "## How cost grows"
CURVE_SWEEPS = {  # sweep: (title, the x column's name)
    "image_size": ("Image size", "upload"),
    "images_per_request": ("Images per request", "images per request"),
    "connections": ("Connections", "connections"),
}
CURVES_HEADER = [
    "| model | {x} | answers/s | goodput (200/s) | images/s | p50 ms | p99 ms | 413 | 429 | 503 "
    "| 504 | other status | no answer | server CPU (cores) | CPU ms per image "
    "| images per runtime call |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def upload_name(upload: dict) -> str:
    """An upload as the tables and plots name it: 4000x3000 JPEG."""
    kind = upload["content_type"].split("/")[1].upper()
    return f"{upload['width']}x{upload['height']} {kind}"


def curve_x(sweep: str, point: dict, uploads: dict) -> str:
    """A point's place on its sweep's axis, as its table shows it."""
    if sweep == "image_size":
        return upload_name(uploads[point["upload"]])
    if sweep == "images_per_request":
        return str(point["images_per_request"])
    return str(point["concurrency"])


def as_answered(points: list[dict]) -> list[dict]:
    """The points of one model's sweep with each one its limits refused replaced by its run
    with the limits raised, where there is one (marked `limits_raised`)."""
    raised = {(p["upload"], p["images_per_request"], p["concurrency"]): p
              for p in points if p["limits_raised"]}
    return [raised.get((p["upload"], p["images_per_request"], p["concurrency"]), p)
            for p in points if not p["limits_raised"]]


def curve_points(curves: dict, sweep: str) -> list[tuple[str, dict]]:
    """(model, point) of one sweep, models in run order, points as measured."""
    return [(key, point) for key, entry in curves["models"].items()
            for point in entry["sweeps"].get(sweep, {}).get("points", [])]


def curve_row(key: str, sweep: str, point: dict, uploads: dict) -> str:
    cpu = point["cpu_ms_per_image"]
    batch = point["batch_sizes"].get("mean")  # requests per batch (BentoML's histogram)
    images = f"{batch * point['images_per_request']:.1f}" if batch else "-"
    x = curve_x(sweep, point, uploads) + (" (limits raised)" if point["limits_raised"] else "")
    # wrk's percentiles are 0 when nothing was answered in the time: no latency was measured
    median, tail = ((f"{point['p50_ms']:.0f}", f"{point['p99_ms']:.0f}") if point["requests"]
                    else ("-", "-"))
    return (f"| {key} | {x} | {point['answers_per_s']:.1f} | {point['goodput_per_s']:.1f} | "
            f"{point['images_per_s']:.1f} | {median} | {tail} | "
            f"{point['status_413']} | {point['status_429']} | {point['status_503']} | "
            f"{point['status_504']} | {point['status_other']} | {point['socket_errors']} | "
            f"{point['server_cpu_cores']:.2f} | {f'{cpu:.2f}' if cpu else '-'} | "
            f"{images} |")


def p99(point: dict) -> str:
    """A point's p99, or what stands for it when nothing was answered in the time."""
    return f"{point['p99_ms']:.0f} ms" if point["requests"] else "no answer in the time"


def curve_findings(curves: dict, sweep: str) -> list[str]:
    """A line per model: how its cost and latency moved along the sweep."""
    uploads, lines = curves["uploads"], []
    for key, entry in curves["models"].items():
        points = as_answered(entry["sweeps"].get(sweep, {}).get("points", []))
        if len(points) < 2:
            continue
        first = points[0]
        if sweep == "image_size":
            parts = [f"{upload_name(uploads[p['upload']])}"
                     + (" (limits raised)" if p["limits_raised"] else "")
                     + f" {p['images_per_s']:.0f} images/s"
                     + (f", {p['cpu_ms_per_image']:.1f} CPU ms each"
                        + (f" ({p['cpu_ms_per_image'] / first['cpu_ms_per_image']:.1f}x)"
                           if p is not first and first["cpu_ms_per_image"] else "")
                        if p["cpu_ms_per_image"] else "")
                     + f", p99 {p99(p)}" for p in points]
            lines.append(f"- {key}: " + "; ".join(parts) + ".")
        elif sweep == "images_per_request":
            last = points[-1]
            lines.append(
                f"- {key}: from {first['images_per_request']} to {last['images_per_request']} "
                f"images per request{' (limits raised)' if last['limits_raised'] else ''}, "
                f"{first['images_per_s']:.0f} -> {last['images_per_s']:.0f} "
                f"images/s and {first['goodput_per_s']:.1f} -> {last['goodput_per_s']:.1f} "
                f"requests/s answered; p99 {p99(first)} -> {p99(last)}"
                + (f"; {last['status_503']} answered 503 and {last['status_429']} 429 at "
                   f"{last['images_per_request']}" if last["status_503"] + last["status_429"]
                   else "") + ".")
        else:
            peak, last = max(points, key=lambda p: p["goodput_per_s"]), points[-1]
            refused = last["status_429"] + last["status_503"] + last["status_504"]
            lost = refused + last["status_other"] + last["socket_errors"]
            first_refusal = next((p["concurrency"] for p in points
                                  if p["requests"] > p["ok"] or p["socket_errors"]), None)
            lines.append(
                f"- {key}: goodput peaks at {peak['goodput_per_s']:.0f}/s (c="
                f"{peak['concurrency']}, p99 {p99(peak)}); at c={last['concurrency']}"
                f" {last['goodput_per_s']:.0f}/s, p99 {p99(last)}, "
                f"{lost / max(last['requests'] + last['socket_errors'], 1):.0%} of requests not "
                f"answered 200 (429: {last['status_429']}, 503: {last['status_503']}, 504: "
                f"{last['status_504']}, no answer: {last['socket_errors']}); "
                + (f"the first refusal or error at c={first_refusal}." if first_refusal
                   else "no refusal or error at any level."))
    return lines


def plot_curves(curves: dict, out: Path) -> list[str]:
    """One small PNG per sweep: throughput, and p99 (log scale), against the sweep's axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    uploads, names = curves["uploads"], []
    for sweep, (title, xlabel) in CURVE_SWEEPS.items():
        if not curve_points(curves, sweep):
            continue
        fig, (rate, tail) = plt.subplots(1, 2, figsize=(10, 3.4))
        for index, (key, entry) in enumerate(curves["models"].items()):
            points = as_answered(entry["sweeps"].get(sweep, {}).get("points", []))
            if not points:
                continue
            colour = f"C{index}"
            if sweep == "image_size":
                xs: list = list(range(len(points)))
            elif sweep == "images_per_request":
                xs = [p["images_per_request"] for p in points]
            else:
                xs = [p["concurrency"] for p in points]
            rate.plot(xs, [p["images_per_s"] for p in points], marker="o", color=colour,
                      label=f"{key}, images/s")
            if sweep == "images_per_request":
                rate.plot(xs, [p["goodput_per_s"] for p in points], marker=".", color=colour,
                          linestyle="--", label=f"{key}, requests/s")
            elif sweep == "connections":
                rate.plot(xs, [p["answers_per_s"] for p in points], marker=".", color=colour,
                          linestyle=":", label=f"{key}, all answers/s")
            tail.plot(xs, [p["p99_ms"] if p["requests"] else float("nan") for p in points],
                      marker="o", color=colour, label=key)
            for x, p in zip(xs, points):
                if p["limits_raised"]:
                    rate.annotate("limits raised", (x, p["images_per_s"]), fontsize=7)
        for ax in (rate, tail):
            if sweep == "image_size":
                ticks = [p["upload"] for p in next(
                    e["sweeps"][sweep]["points"] for e in curves["models"].values()
                    if sweep in e["sweeps"])]
                ax.set_xticks(range(len(ticks)))
                ax.set_xticklabels([upload_name(uploads[t]).replace(" ", "\n") for t in ticks],
                                   fontsize=8)
            else:
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted({p["images_per_request" if sweep == "images_per_request"
                                        else "concurrency"]
                                      for _, p in curve_points(curves, sweep)}))
                ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        rate.set_ylabel("per second (200 answers)")
        rate.set_ylim(bottom=0)
        tail.set_yscale("log")
        tail.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        tail.yaxis.set_major_formatter(ScalarFormatter())
        tail.yaxis.set_minor_formatter(NullFormatter())
        tail.set_ylabel("p99 latency (ms)")
        rate.legend(fontsize=7)
        fig.suptitle(f"{title} (this project's service)", fontsize=10)
        fig.tight_layout()
        name = f"curves-{sweep.replace('_', '-')}.png"
        fig.savefig(out / "bench" / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names


def sweep_uploads(curves: dict) -> list[str]:
    """A sentence per sweep that ran: its fixed concurrency or upload."""
    uploads, sentences = curves["uploads"], []
    for sweep, (title, _) in CURVE_SWEEPS.items():
        by_task = {curves["models"][key]["task"]: p["upload"]
                   for key, p in sorted(curve_points(curves, sweep),
                                        key=lambda kp: curves["models"][kp[0]]["task"])}
        if not by_task:
            continue
        fixed = [f"{curves['concurrency']} connections"] if sweep != "connections" else []
        if sweep != "image_size":
            fixed += [f"one {upload_name(uploads[upload])} per image"
                      + (" (the detector)" if task == "detection" and len(by_task) > 1 else "")
                      for task, upload in by_task.items()]
        sentences.append(f"{title}: {', '.join(fixed)}.")
    return sentences


def curves_section(curves: dict, plots: list[str]) -> list[str]:
    """The "How cost grows" section of benchmarks.md, from curves.json."""
    m, uploads = curves["machine"], curves["uploads"]
    lines = [
        CURVES_HEADING, "",
        *(["**A `--quick` smoke run** (short points, on whatever else the machine was doing): "
           "not a result.", ""] if curves.get("quick") else []),
        f"Produced by `python -m bench.curves` (also run by `make bench`) on {curves['started']} "
        "UTC. Raw numbers: [bench/curves.json](bench/curves.json). This project's service only, "
        "on one server per model and sweep.",
        "",
        machine_line(m),
    ]
    config = Path(curves["config"]).name
    for task, svc in curves["service"].items():
        if not any(e["task"] == task for e in curves["models"].values()):
            continue
        limits = svc["limits"]
        lines.append(
            f"- {'Classifiers' if task == 'classification' else 'Detector'} ({config}"
            f"{' as shipped' if config == 'configuration.yaml' else ''}): {svc['workers']} "
            f"workers x {svc['intra_op_threads']} ONNX Runtime thread(s), max_batch_size "
            f"{svc['max_batch_size']}, max_latency_ms "
            f"{svc['max_latency_ms']} (503 beyond it), max_concurrency {svc['max_concurrency']} "
            f"per worker (429 beyond it); limits: max_images_per_request "
            f"{limits['max_images_per_request']}, max_image_pixels "
            f"{limits['max_image_pixels']:,}, max_request_bytes {limits['max_request_bytes']:,}.")
    lines += [
        f"- Load: `wrk`, closed loop, {curves['duration_s']} s per point after "
        f"{curves['warmup_s']} s of the same load (not measured), from the same machine. "
        + " ".join(sweep_uploads(curves)),
        "- answers/s counts every answer; goodput, the 200 answers (every success this API "
        "sends is a 200); images/s = goodput x images per request. p50 and p99 are wrk's, over "
        "every answer, refusals included (a quick 429 pulls them down). no answer: wrk's "
        "connect, read and write errors and timeouts. CPU ms per image: the server's process "
        "tree's CPU time per image answered. Images per runtime call: BentoML's batch-size "
        "histogram (requests per batch) x images per request.",
    ]
    refused = [(key, p) for sweep in CURVE_SWEEPS for key, p in curve_points(curves, sweep)
               if p["refused_by_limits"] and not p["limits_raised"]]
    shipped = "shipped" if config == "configuration.yaml" else "configured"
    largest = max((p for _, p in curve_points(curves, "images_per_request")),
                  key=lambda p: p["body_bytes"], default=None)
    pixels = max((uploads[p["upload"]]["width"] * uploads[p["upload"]]["height"]
                  for sweep in CURVE_SWEEPS for _, p in curve_points(curves, sweep)), default=0)
    if refused:
        lines.append(
            f"- **The {shipped} limits refuse** "
            + "; ".join(sorted({
                f"{key} {upload_name(uploads[p['upload']])} x{p['images_per_request']} "
                f"({', '.join(p['refused_by_limits'])})" for key, p in refused}))
            + f": measured as {shipped} (the refusal is the outcome: the 413 column), then on a "
            "second server with those limits raised through the bench's configuration override "
            "(rows marked \"limits raised\").")
    elif largest:
        lines.append(
            f"- The {shipped} limits admit every point: the largest request is "
            f"{largest['images_per_request']} images ({largest['body_bytes'] / 1e6:.1f} MB), the "
            f"largest image {pixels / 1e6:.1f} megapixels.")
    lines += ["", "| upload | pixels | bytes | file (bench/assets.py) |", "|---|---|---|---|"]
    lines += [f"| {u['label']} | {u['width'] * u['height'] / 1e6:.2f} MP | {u['bytes']:,} | "
              f"{u['file']} |" for u in uploads.values()]
    lines.append("")
    for sweep, (title, xlabel) in CURVE_SWEEPS.items():
        points = curve_points(curves, sweep)
        if not points:
            continue
        lines += [f"### {title}", ""]
        plot = f"curves-{sweep.replace('_', '-')}.png"
        if plot in plots:
            lines += [f"![{plot}](bench/{plot})", ""]
        lines += [header.replace("{x}", xlabel) for header in CURVES_HEADER]
        lines += [curve_row(key, sweep, p, uploads) for key, p in points]
        lines += ["", *curve_findings(curves, sweep), ""]
    return lines


def replace_section(text: str, heading: str, section: list[str]) -> str:
    """`text` (Markdown) with the `heading` section (up to the next heading of its level)
    replaced by `section`; where there is none, it goes before the Analysis, or at the end."""
    level = heading.split(" ", 1)[0] + " "
    lines = text.split("\n")
    body = [*section] if not section or section[-1] == "" else [*section, ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(level)),
                   len(lines))
        return "\n".join(lines[:start] + body + lines[end:])
    if "## Analysis" in lines:
        at = lines.index("## Analysis")
        return "\n".join(lines[:at] + body + lines[at:])
    return "\n".join([*lines, *([""] if lines and lines[-1] else []), *body])


def write_curves_plots(curves: dict, out: Path) -> list[str]:
    """The plots, and the section's lines."""
    (out / "bench").mkdir(parents=True, exist_ok=True)
    return curves_section(curves, plot_curves(curves, out))


def write_curves(curves: dict, out: Path) -> None:
    """The plots, and the section in out/benchmarks.md (which keeps everything else)."""
    section = write_curves_plots(curves, out)
    path = out / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(replace_section(text, CURVES_HEADING, section))
