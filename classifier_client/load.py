"""`load`: closed-loop load from this machine and a summary table. For numbers to publish use
`make bench` (wrk, written in C): a Python client on the server's own cores takes CPU from it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def load(url: str, image: Path, concurrency: int, duration_s: float,
         api_key: str | None = None) -> dict[str, Any]:
    files = [("images", (image.name, image.read_bytes(), "application/octet-stream"))]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client_loop() -> None:
        with httpx.Client(timeout=60, headers=headers) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    status = str(client.post(f"{url}/classify", files=files).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(elapsed)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client_loop)
    wall = time.monotonic() - started
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (0, 0, 0)
    return {"concurrency": concurrency, "seconds": round(wall, 1),
            "requests": sum(statuses.values()), "ok": statuses["200"],
            "answers_per_s": round(statuses["200"] / wall, 1),
            "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "p99_ms": round(p99, 1),
            "statuses": dict(statuses)}


def print_table(summary: dict[str, Any]) -> None:
    for key, value in summary.items():
        print(f"{key:<14} {value}")
