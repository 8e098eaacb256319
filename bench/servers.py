"""Start the servers under test on 127.0.0.1, each on the same ONNX graph from the store: this
project's service and the peer classifier servers (bench/peers/), and this project's
ObjectDetector for a detector. FastAPI and LitServe run from the project's venv; Ray Serve and
TorchServe each from a venv of their own (bench/peers/venvs.py)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from bench.peers import torchserve_app, venvs
from devtools.processes import NotReadyError, free_port, stop_tree, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Running:
    name: str
    url: str  # the task's route is under it: {url}/classify (TorchServe's: .../predictions)
    pid: int
    ready_s: float


@dataclass
class Launch:
    """How to start one server and tell when it is ready."""
    command: list[str]
    env: dict
    ready_path: str  # answers 200 once the server is up
    route_prefix: str = ""  # between the address and the task's route
    ready: Callable[[str], bool] | None = None  # more than ready_path's 200, given the address
    timeout_s: float = 120  # to ready, on a busy 2-core machine


# Under /predictions/<model name>, the only place TorchServe serves a model: its model is named
# after the route (torchserve_app.MODEL_NAME, "classify"), so the same wrk script drives it.
TORCHSERVE_PREFIX = "/predictions"


# What each peer runs with, for the report (docs/benchmarks.md); the modules' docstrings say why.
PEER_SETTINGS = {
    "fastapi": "FastAPI 0.165 on uvicorn, 1 process, an async handler that decodes and runs each "
               "image in turn (batch 1), ONNX Runtime one thread per core "
               "(bench/peers/fastapi_app.py)",
    "litserve": "LitServe 0.2.19 dynamic batching, max_batch_size 64; inference workers, ONNX "
                "Runtime threads, batch_timeout and API servers: the best of the grid in "
                "*LitServe tuning* (bench/peers/litserve_app.py)",
    "ray": "Ray Serve 2.60.0, RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (its HAProxy left off: it binds "
           "all interfaces), 1 replica, max_ongoing_requests 256, @serve.batch max_batch_size "
           "32 and batch_wait_timeout_s 0.02, the batch's runtime call in a thread, ONNX Runtime "
           "one thread per core, access log off; its own venv (bench/peers/ray_app.py)",
    "torchserve": f"TorchServe 0.12.0, {torchserve_app.WORKERS} worker, batchSize "
                  f"{torchserve_app.BATCH_SIZE}, maxBatchDelay {torchserve_app.MAX_BATCH_DELAY_MS}"
                  f" ms, job_queue_size {torchserve_app.JOB_QUEUE_SIZE}, async logging, access "
                  "and metrics logs off, ONNX Runtime one thread per core, uploads to "
                  f"/predictions/{torchserve_app.MODEL_NAME}; its own venv "
                  "(bench/peers/torchserve_app.py)",
}


def deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Per task: the service class (its block in configuration.yaml) and our section inside it.
SERVICES = {"classification": ("ImageClassifier", "image_classifier"),
            "detection": ("ObjectDetector", "object_detector")}
# The route each task's load goes to (and its method in BentoML's batch-size histogram).
ROUTES = {"classification": "classify", "detection": "detect"}


def bentoml_config(tag: str, overrides: dict, directory: Path,
                   task: str = "classification") -> Path:
    """configuration.yaml with the model tag and any lever under test, as an operator would."""
    base = Path(os.environ.get("BENTOML_CONFIG") or ROOT / "configuration.yaml")
    document = yaml.safe_load(base.read_text())
    name, section = SERVICES[task]
    service = document["services"][name]
    service[section]["model"]["tag"] = tag
    document["services"][name] = deep_merge(service, overrides)
    path = directory / f"bench-{tag.replace(':', '-')}-{abs(hash(repr(overrides)))}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def without_modules(names: list[str], workdir: Path) -> dict:
    """Environment in which importing `names` fails (uvicorn then falls back to asyncio/h11)."""
    shim = workdir / ("without-" + "-".join(names))
    shim.mkdir(parents=True, exist_ok=True)
    for name in names:
        (shim / f"{name}.py").write_text("raise ImportError('left out for the benchmark')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}


def command_for(server: str, tag: str, model_dir: Path, port: int, workdir: Path,
                overrides: dict, without: tuple[str, ...], task: str = "classification"
                ) -> Launch:
    env = os.environ.copy()
    if without:
        env.update(without_modules(list(without), workdir))
    if server == "bentoml":
        env["BENTOML_CONFIG"] = str(bentoml_config(tag, overrides, workdir, task))
        return Launch([str(BIN / "bentoml"), "serve", f"service:{SERVICES[task][0]}", "--host",
                       "127.0.0.1", "--port", str(port)], env, "/readyz")
    if task != "classification":
        raise ValueError(f"{server} serves classifiers only (bench/peers/); {task}: bentoml")
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    if server in ("fastapi", "litserve"):
        module = f"bench.peers.{server}_app"
        return Launch([sys.executable, "-m", module, "--model-dir", str(model_dir), "--port",
                       str(port), *extra], env, "/health")
    # A venv of its own, where bench/ and serving/ come from the repository on PYTHONPATH.
    python = str(venvs.venv_python(server))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run_dir = fresh_dir(workdir / server)  # its session, logs and temporary files; the last kept
    if server == "ray":
        return Launch([python, "-m", "bench.peers.ray_app", "--model-dir", str(model_dir),
                       "--port", str(port), "--temp-dir", str(run_dir), *extra], env, "/health",
                      timeout_s=300)  # Ray starts a dozen processes: 30-60 s here when busy
    if server == "torchserve":
        management = free_port()
        return Launch([python, "-m", "bench.peers.torchserve_app", "--model-dir",
                       str(model_dir), "--port", str(port), "--management-port",
                       str(management), "--work-dir", str(run_dir), *extra], env, "/ping",
                      TORCHSERVE_PREFIX, torchserve_worker_ready(management), timeout_s=300)
    raise ValueError(f"unknown server {server!r}: bentoml, fastapi, litserve, ray or torchserve")


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def torchserve_worker_ready(management_port: int) -> Callable[[str], bool]:
    """Whether TorchServe's worker has loaded the model. Its /ping says Healthy as soon as the
    worker process starts, seconds before it can answer (9 s here); the management API's
    describe-model says READY only then."""
    def ready(_: str) -> bool:
        answer = httpx.get(
            f"http://127.0.0.1:{management_port}/models/{torchserve_app.MODEL_NAME}", timeout=2)
        return answer.status_code == 200 and any(
            worker.get("status") == "READY" for model in answer.json()
            for worker in model.get("workers", []))
    return ready


@contextlib.contextmanager
def serve(server: str, tag: str, model_dir: Path, workdir: Path, overrides: dict | None = None,
          without: tuple[str, ...] = (), timeout_s: float | None = None,
          task: str = "classification") -> Iterator[Running]:
    """Start `server` (with `overrides` to its configuration, and `without` these modules
    importable) for a model of `task`, wait until it is ready (`timeout_s`: the server's own
    default where not given), stop it and its children after."""
    port = free_port()
    launch = command_for(server, tag, model_dir, port, workdir, overrides or {}, without, task)
    timeout_s = launch.timeout_s if timeout_s is None else timeout_s
    with open(workdir / f"{server}-{port}.log", "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(launch.command, cwd=ROOT, env=launch.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            try:  # polled often: the time to ready is one of the figures reported
                wait_until_ready(url + launch.ready_path, lambda: process.poll() is None,
                                 timeout_s, interval_s=0.05)
                if launch.ready is not None:
                    wait_until(launch.ready, url, lambda: process.poll() is None,
                               timeout_s - (time.perf_counter() - started))
            except NotReadyError as exc:
                raise RuntimeError(f"{server}: {exc}; see {log.name}") from None
            yield Running(server, url + launch.route_prefix, process.pid,
                          time.perf_counter() - started)
        finally:
            # With its descendants: LitServe's parent exits on SIGTERM but leaves its spawned
            # workers behind, busy-polling their queues; they would eat CPU in every later run.
            # TorchServe's command leaves its Java frontend (and that its worker) the same way.
            stop_tree(process)


def wait_until(ready: Callable[[str], bool], url: str, alive: Callable[[], bool],
               timeout_s: float, interval_s: float = 0.05) -> None:
    """Until `ready(url)`; NotReadyError once the process exits or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if ready(url):
                return
        if not alive():
            raise NotReadyError(f"{url}: the process exited before it was ready")
        if time.monotonic() > deadline:
            raise NotReadyError(f"{url} was not ready within {timeout_s:.0f} s")
        time.sleep(interval_s)
