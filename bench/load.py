"""Closed-loop load from wrk (C, a few % of a core) and what the server spent meanwhile."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

LUA = Path(__file__).with_name("multipart.lua")
PACED_LUA = Path(__file__).with_name("paced.lua")
PREPARED_LUA = Path(__file__).with_name("prepared.lua")
PLAIN_LUA = Path(__file__).with_name("plain.lua")
BOUNDARY = "----benchboundary7MA4YWxkTrZu0gW"  # multipart.lua's


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    ok: int
    throughput: float          # 200 answers per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    status_429: int
    status_503: int
    status_504: int
    other_errors: int
    server_cpu_cores: float    # CPU seconds of the server's process tree per wall second
    server_rss_mb: float       # peak RSS of the server's process tree
    server_rss_start_mb: float  # ... when the load started, and when it ended
    server_rss_end_mb: float
    loadgen_cpu_cores: float   # the same for wrk: what measuring cost
    batch_sizes: dict[str, float] = field(default_factory=dict)
    # other_errors, in parts: 413 answers, other statuses, and wrk's connect, read, write and
    # timeout errors (requests that got no answer)
    status_413: int = 0
    status_other: int = 0
    socket_errors: int = 0
    images_per_request: int = 1
    body_bytes: int = 0        # of one request


def multipart_body(data: bytes, count: int = 1, field: str = "images",
                   content_type: str = "image/jpeg") -> tuple[str, bytes]:
    """(Content-Type header, body) of one request that uploads `data` `count` times under
    `field`, as multipart.lua builds it for one (the same boundary, file name and part
    headers, so one part here is byte for byte what multipart.lua sends)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    filename = "upload.png" if content_type == "image/png" else "upload.jpg"
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    body = b"".join(part + data + b"\r\n" for _ in range(count)) + f"--{BOUNDARY}--\r\n".encode()
    return f"multipart/form-data; boundary={BOUNDARY}", body


def write_body(image: Path, count: int, content_type: str) -> tuple[Path, str]:
    """multipart_body() of `image` x `count` as a file beside it, for bench/prepared.lua:
    (its path, the Content-Type header)."""
    header, body = multipart_body(image.read_bytes(), count, content_type=content_type)
    path = image.with_name(f"{image.name}.x{count}.multipart")
    path.write_bytes(body)
    return path, header


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_mb(pid: int) -> float:
    return sum(rss_by_process_mb(pid))


def rss_by_process_mb(pid: int) -> list[float]:
    """RSS of `pid` and each process under it, in MB, `pid`'s first: where a server's memory
    sits (BentoML's main process against its workers)."""
    sizes = []
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            sizes.append(proc.memory_info().rss / 2**20)
    return sizes


def metric_samples(text: str, name: str):
    """(labels, value) for each sample of `name` in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            yield dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)


def batch_histogram(url: str, method: str = "classify") -> dict[str, float]:
    """BentoML's adaptive batch-size histogram for the API `method`, summed over workers."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    buckets: dict[str, float] = {"sum": 0.0}
    name = "bentoml_service_adaptive_batch_size"
    for labels, value in metric_samples(text, f"{name}_bucket"):
        if labels.get("method_name") == method:
            buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + value
    for labels, value in metric_samples(text, f"{name}_sum"):
        if labels.get("method_name") == method:
            buckets["sum"] += value
    return buckets if len(buckets) > 1 else {}


def batch_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches formed during the run: count, mean size, and the share in each bucket."""
    if not after:
        return {}
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    count = delta.get("+Inf", 0.0)
    if count <= 0:
        return {}
    summary = {"batches": count, "mean": delta["sum"] / count}
    previous = 0.0
    for le in sorted((k for k in delta if k not in ("sum", "+Inf")), key=float):
        summary[f"<={float(le):g}"] = (delta[le] - previous) / count
        previous = delta[le]
    return summary


def run_wrk(url: str, pid: int, image: Path, concurrency: int, seconds: int,
            timeout_s: int = 30, sample_batches: bool = True, rate: float = 0,
            content_type: str = "image/jpeg", route: str = "classify",
            images_per_request: int = 1) -> LoadResult:
    """Closed loop; with `rate`, at most that many requests per second (bench/paced.lua).
    `route`: /classify, or /detect for a detector. `images_per_request` > 1: each request
    uploads the image that many times (a body built beforehand, bench/prepared.lua)."""
    threads = 1 if concurrency < 8 else 2
    if images_per_request > 1:
        if rate:
            raise ValueError("a paced run sends one image per request")
        body, header = write_body(image, images_per_request, content_type)
        body_bytes = body.stat().st_size
        script = [str(PREPARED_LUA), f"{url}/{route}", "--", str(body), header]
    else:
        body_bytes = len(multipart_body(b"", content_type=content_type)[1]) + image.stat().st_size
        script = [str(PACED_LUA) if rate else str(LUA), f"{url}/{route}", "--", str(image),
                  "images", content_type, *([f"{rate / threads:.3f}"] if rate else [])]
    command = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s",
               "--timeout", f"{int(timeout_s)}s", "-s", *script]
    peak_rss = [rss_mb(pid)]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.5):
            peak_rss.append(rss_mb(pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    histogram_before = batch_histogram(url, route) if sample_batches else {}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
    sampler.start()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0 or "WRK_JSON" not in finished.stdout:
        raise RuntimeError(f"wrk failed: {finished.stderr or finished.stdout}")
    output = finished.stdout
    wall = time.perf_counter() - wall_before
    server_cpu = cpu_seconds(pid) - cpu_before
    stop.set()
    sampler.join()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    loadgen_cpu = (children_after.ru_utime - children_before.ru_utime
                   + children_after.ru_stime - children_before.ru_stime)
    stats = json.loads(output.split("WRK_JSON ", 1)[1].splitlines()[0])
    duration = stats["duration_us"] / 1e6
    socket_errors = (stats["connect_errors"] + stats["read_errors"] + stats["write_errors"]
                     + stats["timeouts"])
    return LoadResult(
        concurrency=concurrency,
        seconds=round(duration, 2),
        requests=stats["requests"],
        ok=stats["status_200"],
        throughput=stats["status_200"] / duration,
        p50_ms=stats["p50_us"] / 1000,
        p95_ms=stats["p95_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        status_429=stats["status_429"],
        status_503=stats["status_503"],
        status_504=stats["status_504"],
        other_errors=stats["status_413"] + stats["status_other"] + socket_errors,
        server_cpu_cores=server_cpu / wall,
        server_rss_mb=max(peak_rss),
        server_rss_start_mb=peak_rss[0],
        server_rss_end_mb=peak_rss[-1],
        loadgen_cpu_cores=loadgen_cpu / wall,
        batch_sizes=(batch_summary(histogram_before, batch_histogram(url, route))
                     if sample_batches else {}),
        status_413=stats["status_413"],
        status_other=stats["status_other"],
        socket_errors=socket_errors,
        images_per_request=images_per_request,
        body_bytes=body_bytes,
    )


# What a request costs this project's service before any work, at 1 connection: a route our own
# middleware answers (uvicorn, BentoML's outer middlewares and ours), and a BentoML API that does
# nothing (the same, plus BentoML's router, endpoint, thread hand-off and serialization).
FLOOR_ROUTES = {
    "middleware route (GET /v2/health/live)": ("GET", "/v2/health/live", None),
    "empty BentoML API (POST /model_info {})": ("POST", "/model_info", "{}"),
}
_WRK_TIME = re.compile(r"([\d.]+)(us|ms|s)\b")


def wrk_ms(text: str) -> float:
    """wrk's "369.00us", "1.23ms", "2.01s" in milliseconds."""
    match = _WRK_TIME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a wrk time: {text!r}")
    value, unit = float(match[1]), match[2]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_plain(url: str, method: str, body: str | None, seconds: int, pid: int
              ) -> dict[str, float]:
    """One connection, closed loop, on a route without an upload: answers/s, the p50 (wrk's
    own p99 for such short requests counts its connection set-up, so it is not kept) and the
    server's CPU per answer (`pid`'s process tree), what such a request costs the machine."""
    command = ["wrk", "-t", "1", "-c", "1", "-d", f"{seconds}s", "--latency", "-s",
               str(PLAIN_LUA), url, "--", method, *([body] if body else [])]
    cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu, wall = cpu_seconds(pid) - cpu_before, time.perf_counter() - wall_before
    p50 = next(line.split()[1] for line in output.splitlines()
               if line.strip().startswith("50%"))
    rate = float(next(line.split(":")[1] for line in output.splitlines()
                      if line.startswith("Requests/sec")))
    return {"throughput": rate, "p50_ms": wrk_ms(p50),
            "server_core_ms": cpu * 1000 / max(rate * wall, 1.0)}


def floor(url: str, seconds: int, pid: int) -> dict[str, dict[str, float]]:
    return {name: run_plain(url + path, method, body, seconds, pid)
            for name, (method, path, body) in FLOOR_ROUTES.items()}
