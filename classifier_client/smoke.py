"""`smoke`: what to run against a fresh deployment. Health, the model it serves, one known
prediction, and latency over N sequential requests."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from .retry import RetryingClient


def smoke(url: str, image: Path, expect: str, requests: int = 50,
          api_key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    checks: list[tuple[str, bool, str]] = []
    for path in ("/livez", "/readyz"):
        status = httpx.get(url + path, timeout=10).status_code
        checks.append((f"GET {path}", status == 200, str(status)))
    info = httpx.post(f"{url}/model_info", json={}, headers=headers, timeout=10)
    checks.append(("POST /model_info", info.status_code == 200,
                   info.json().get("tag", info.text) if info.status_code == 200 else info.text))
    latencies = []
    with RetryingClient(url, api_key=api_key) as client:
        answer = client.classify([image])[0]
        checks.append((f"{image.name} -> {expect}", answer["label"] == expect,
                       f"{answer['label']} ({answer['confidence']:.3f})"))
        for _ in range(requests):
            started = time.perf_counter()
            client.classify([image])
            latencies.append((time.perf_counter() - started) * 1000)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    checks.append((f"latency over {requests} requests", True,
                   f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, "
                   f"max {max(latencies):.1f} ms"))
    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name:<{width}}  {detail}")
    return all(ok for _, ok, _ in checks)
