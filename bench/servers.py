"""Start the servers under test on 127.0.0.1, each on the same ONNX graph from the store: the
three classifier servers, and this project's ObjectDetector for a detector."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from devtools.processes import NotReadyError, free_port, stop_tree, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Running:
    name: str
    url: str
    pid: int
    ready_s: float


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
                ) -> tuple[list[str], dict, str]:
    env = os.environ.copy()
    if without:
        env.update(without_modules(list(without), workdir))
    if server == "bentoml":
        env["BENTOML_CONFIG"] = str(bentoml_config(tag, overrides, workdir, task))
        return ([str(BIN / "bentoml"), "serve", f"service:{SERVICES[task][0]}", "--host",
                 "127.0.0.1", "--port", str(port)], env, "/readyz")
    if task != "classification":
        raise ValueError(f"{server} serves classifiers only (bench/peers/); {task}: bentoml")
    module = {"fastapi": "bench.peers.fastapi_app", "litserve": "bench.peers.litserve_app"}[server]
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    return ([sys.executable, "-m", module, "--model-dir", str(model_dir), "--port", str(port),
             *extra], env, "/health")


@contextlib.contextmanager
def serve(server: str, tag: str, model_dir: Path, workdir: Path, overrides: dict | None = None,
          without: tuple[str, ...] = (), timeout_s: float = 120,
          task: str = "classification") -> Iterator[Running]:
    """Start `server` (with `overrides` to its configuration, and `without` these modules
    importable) for a model of `task`, wait until it answers its readiness path, stop it and its
    children after."""
    port = free_port()
    command, env, ready_path = command_for(server, tag, model_dir, port, workdir,
                                           overrides or {}, without, task)
    with open(workdir / f"{server}-{port}.log", "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            try:  # polled often: the time to ready is one of the figures reported
                wait_until_ready(url + ready_path, lambda: process.poll() is None, timeout_s,
                                 interval_s=0.05)
            except NotReadyError as exc:
                raise RuntimeError(f"{server}: {exc}; see {log.name}") from None
            yield Running(server, url, process.pid, time.perf_counter() - started)
        finally:
            # With its descendants: LitServe's parent exits on SIGTERM but leaves its spawned
            # workers behind, busy-polling their queues; they would eat CPU in every later run.
            stop_tree(process)
