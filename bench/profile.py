"""Where a worker's CPU goes under load: py-spy samples of one BentoML worker, by stage."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil

STAGES = {  # first match wins, checked from the innermost frame outwards
    "ONNX Runtime (inference)": ("Session.run",),
    "decode + resize (Pillow)": ("decode_image", "_decode_upload"),
    "multipart parsing": ("parse_request", "_get_form", "MultiPartParser"),
    "response (JSON)": ("to_http_response", "to_predictions", "serialize_model"),
    "batching (dispatcher)": ("CorkDispatcher", "EagerDispatcher", "batches_to_batch",
                              "batch_to_batches"),
    "tracing, metrics middleware": ("OpenTelemetry", "Tracer.", "MetricsMiddleware",
                                    "Instrument"),
    "request log (JSON line)": ("RequestLog.", "log_line", "Logger.", "StreamHandler"),
    "our middlewares (admission, lane, protocol paths)": (
        "Admission.", "Exchange.", "FastLane.", "ProtocolPaths.", "ProtocolRoutes."),
}


def worker_pid(server_pid: int) -> int:
    for child in psutil.Process(server_pid).children(recursive=True):
        if "_bentoml_impl.worker" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("no BentoML worker process found")


def start(server_pid: int, seconds: int, output: Path) -> subprocess.Popen:
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "-p", str(worker_pid(server_pid)), "-d",
                             str(seconds), "-f", "raw", "-o", str(output), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(raw: Path) -> dict[str, float]:
    """Share of the worker's busy samples per stage (py-spy leaves idle threads out)."""
    shares: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        total += int(count)
        stage = next((name for frame in reversed(frames) for name, keys in STAGES.items()
                      if any(k in frame for k in keys)), "other (event loop, HTTP, Python)")
        shares[stage] += int(count)
    return {stage: n / total for stage, n in shares.most_common()} if total else {}
