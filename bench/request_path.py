"""`make bench-request-path`: where one request's time goes inside a worker, without HTTP.

Served figures on a small VM move 15-25% from one server start to the next (wrk shares the
cores; the kernel's networking and the other worker run beside the one measured), which hides
costs of a few percent. Here, in a fresh process per configuration, the worker's app is built
as `bentoml serve` builds it (`service.to_asgi()`: BentoML's middlewares and ours, its lifespan,
the model loaded), and one POST /classify of examples/digit_7_00.png (the bench's multipart body)
is driven through it `--requests` times, one at a time, on uvloop as a worker runs, with no
socket: what is left is the Python and the runtime of one request, which these figures hold to
a few percent. Configurations alternate for `--rounds` rounds; the FastAPI peer's app
(bench/peers/fastapi_app.py) on the same graph is driven the same way, and so is a request that
does no work (GET /v2/health/live, answered by our middleware). Writes docs/request-path.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, WORK

IMAGE = ROOT / "examples" / "digit_7_00.png"
WARMUP = 500  # requests before the timed ones: lazy imports, the arena, the runtime's caches

# What each configuration changes in configuration.yaml's ImageClassifier block.
CONFIGURATIONS: dict[str, dict] = {
    "shipped": {},
    "request log off": {"image_classifier": {"request_log": {"enabled": False}}},
    "drift off": {"image_classifier": {"drift": {"enabled": False}}},
    "BentoML metrics off": {"metrics": {"enabled": False}},
    "all three off": {"metrics": {"enabled": False}, "image_classifier": {
        "request_log": {"enabled": False}, "drift": {"enabled": False}}},
    "fast lane off": {"image_classifier": {"batching": {"fast_lane": False}}},
}
FLOOR = "GET /v2/health/live (shipped)"
FASTAPI = "FastAPI peer"
DESCRIPTIONS = {
    "shipped": "configuration.yaml as shipped",
    "request log off": "no JSON line per request",
    "drift off": "no drift window (each image's features are not kept)",
    "BentoML metrics off": "BentoML's request metrics middleware left out (`metrics.enabled: "
                           "false`; the service's own metrics stay)",
    "all three off": "the three above together",
    "fast lane off": "every request through BentoML's endpoint and batcher",
    FLOOR: "a request our middleware answers without work, through the same app",
    FASTAPI: "bench/peers/fastapi_app.py on the same graph: no batching, no middleware",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.request_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5000, help="timed, per process")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "request-path.md")
    parser.add_argument("--drive", choices=["service", "floor", "fastapi"],
                        help=argparse.SUPPRESS)  # one process's measurement (run by the parent)
    return parser.parse_args()


def multipart_request(path: str = "/classify") -> tuple[dict, bytes]:
    """The ASGI scope and body of the bench's upload (bench/load.py multipart_body)."""
    from bench.load import multipart_body

    content_type, body = multipart_body(IMAGE.read_bytes(), content_type="image/png")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 3000), "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1:3000"), (b"content-type", content_type.encode()),
                         (b"content-length", str(len(body)).encode())]}
    return scope, body


def floor_request() -> tuple[dict, bytes]:
    scope, _ = multipart_request("/v2/health/live")
    scope = {**scope, "method": "GET", "headers": [(b"host", b"127.0.0.1:3000")]}
    return scope, b""


async def answer(app: Any, scope: dict, body: bytes) -> int:
    """One request through the app: its status. By hand rather than httpx's ASGITransport,
    whose own request and response objects would be in every figure (and which runs no
    lifespan)."""
    sent, status = False, 0

    async def receive() -> dict:
        nonlocal sent
        if sent:  # the app asks again only to learn of a disconnect: none comes
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app({**scope, "state": {}}, receive, send)
    return status


async def start_lifespan(app: Any) -> None:
    """The app's startup, as uvicorn runs it (the service is built and its model loaded)."""
    started = asyncio.get_running_loop().create_future()

    async def receive() -> dict:
        if started.done():
            await asyncio.Event().wait()
        return {"type": "lifespan.startup"}

    async def send(message: dict) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set_result(True)
        elif message["type"] == "lifespan.startup.failed":
            started.set_exception(RuntimeError(message.get("message", "startup failed")))

    asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                              receive, send))
    await started


def service_app() -> Any:
    """service:ImageClassifier's ASGI app, as _bentoml_impl/worker/service.py builds it."""
    from _bentoml_impl.loader import load
    from bentoml._internal.context import server_context

    server_context.worker_index = 1
    server_context.service_type = "entry_service"
    service = load("service:ImageClassifier", standalone_load=True)
    server_context.service_name = service.name
    return service.to_asgi(is_main=True)


async def drive(kind: str, requests: int, model_dir: str | None) -> dict[str, float]:
    if kind == "fastapi":
        from bench.peers.fastapi_app import create_app

        if model_dir is None:
            raise ValueError("the FastAPI peer needs the model's directory (BENCH_MODEL_DIR)")
        app, (scope, body) = create_app(Path(model_dir)), multipart_request()
    else:
        app = service_app()
        await start_lifespan(app)
        scope, body = floor_request() if kind == "floor" else multipart_request()
    for _ in range(WARMUP):
        if (status := await answer(app, scope, body)) != 200:
            raise RuntimeError(f"{kind}: {scope['method']} {scope['path']} answered {status}")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        await answer(app, scope, body)
    return {"ms": (time.perf_counter() - wall) / requests * 1000,
            "cpu_ms": (time.process_time() - cpu) / requests * 1000}


def run_loop(coroutine: Any) -> Any:
    """On uvloop where it is installed, as a BentoML worker runs (uvicorn's loop: auto)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def measure(kind: str, requests: int, config: Path, model_dir: Path) -> dict[str, float]:
    """One fresh process: the app built, warmed and timed. Its stdout, where the request log
    goes, is a file, as in `make bench` (under Docker or Kubernetes it is a pipe the runtime
    reads, which costs the writer more)."""
    with tempfile.TemporaryDirectory(prefix="request-path-") as directory:
        env = {**os.environ, "BENTOML_CONFIG": str(config), "BENCH_MODEL_DIR": str(model_dir),
               "PROMETHEUS_MULTIPROC_DIR": directory}  # as a worker's metrics are kept
        output = Path(directory) / "stdout"
        with output.open("w") as stdout:  # a file, as `make bench` gives its servers
            done = subprocess.run([sys.executable, "-m", "bench.request_path", "--drive", kind,
                                   "--requests", str(requests)], cwd=ROOT, env=env,
                                  stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
        last = output.read_text().strip().splitlines()[-1:] or [""]
    if done.returncode != 0 or not last[0].startswith("{"):
        raise RuntimeError(f"{kind} with {config.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(last[0])


def main() -> None:
    args = parse_args()
    if args.drive:
        print(json.dumps(run_loop(drive(args.drive, args.requests,
                                        os.environ.get("BENCH_MODEL_DIR")))), flush=True)
        return
    from bench.assets import default_bench_model

    tag, model_dir = default_bench_model()  # sets BENTOML_HOME: the bench's store
    from bench import report, servers

    started = time.strftime("%Y-%m-%d %H:%M")
    configs = {name: servers.bentoml_config(tag, overrides, WORK)
               for name, overrides in CONFIGURATIONS.items()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*configs, FLOOR, FASTAPI]}
    for round_number in range(args.rounds):
        for name in runs:
            kind = {FLOOR: "floor", FASTAPI: "fastapi"}.get(name, "service")
            result = measure(kind, args.requests, configs.get(name, configs["shipped"]),
                             model_dir)
            runs[name].append(result)
            print(f"round {round_number + 1} {name}: {result['ms']:.3f} ms a request, "
                  f"{result['cpu_ms']:.3f} CPU-ms", flush=True)
    args.out.write_text(render(runs, args, tag, started, report.machine()))
    print(f"wrote {args.out}")


def render(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace, tag: str,
           started: str, machine: dict) -> str:
    from bench.report import machine_line

    def median(name: str, key: str = "ms") -> float:
        return statistics.median(run[key] for run in runs[name])

    shipped = median("shipped")
    rows = []
    for name, measured in runs.items():
        spread = f"{min(r['ms'] for r in measured):.3f}-{max(r['ms'] for r in measured):.3f}"
        change = "" if name == "shipped" else f"{median(name) - shipped:+.3f}"
        rows.append(f"| {name} | {DESCRIPTIONS[name]} | {median(name):.3f} | {change} | "
                    f"{spread} | {median(name, 'cpu_ms'):.3f} |")
    features = shipped - median("all three off")
    return f"""# Where a request's time goes inside a worker

`make bench-request-path` (bench/request_path.py), started {started}.
{machine_line(machine)}

The default model (`{tag}`): in a fresh process per row, the worker's app as `bentoml serve`
builds it, one POST /classify of examples/digit_7_00.png at a time, {args.requests} timed after
{WARMUP} to warm up, no socket and no HTTP parsing (uvicorn's part is not in these figures);
rows alternating, {args.rounds} rounds, medians. CPU-ms counts every thread of the process (the
runtime's own threads too).

| configuration | what differs | ms a request | vs shipped | lowest-highest | CPU-ms a request |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Reading it

- The request log, drift detection and BentoML's metrics middleware together:
  {features:+.3f} ms a request of the shipped {shipped:.3f} ({features / shipped:.0%}).
- The FastAPI peer's app does the same decoding and runtime call on the same graph in
  {median(FASTAPI):.3f} ms: {shipped - median(FASTAPI):+.3f} ms to the shipped service, of which
  the features above are {features:.3f}; the rest is the request path every answer of this
  service takes (BentoML's outer middlewares and its input and output models, admission and
  limits, the service's own metrics, the fast lane) and no feature can be switched off for.
- A request that does no work, through the same app: {median(FLOOR):.3f} ms.
- Without the fast lane (BentoML's endpoint, its batcher and a thread hand-off per batch):
  {median("fast lane off") - shipped:+.3f} ms a request.
"""


if __name__ == "__main__":
    main()
