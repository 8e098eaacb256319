"""Peer 4: TorchServe 0.12 with its dynamic batching (bench/peers/torchserve_handler.py).

Runs from its own venv (build/peers/torchserve-venv, requirements/peers-torchserve.txt; bench/
peers/venvs.py creates it): it packs the model into a .mar with torch-model-archiver (once per
model and handler version), writes config.properties, then becomes `torchserve --foreground`
(the Java frontend, which starts the Python worker). Knobs, each TorchServe's documented one:

- 1 worker (minWorkers = maxWorkers = 1), batchSize 32, maxBatchDelay 5 ms: the frontend
  gathers up to 32 requests or waits 5 ms, then sends them to the worker as one batch.
- job_queue_size 1024: the default (100) answers 503 once 100 requests wait, and the bench's
  closed loop reaches 128.
- async_logging on (its performance guide's advice); the access log and the per-request
  metrics logs off (torchserve-log4j2.xml), as this project's server runs with its access log
  off; system metrics off (no collector process every minute beside the server); token
  authorization off (no key in the bench's requests).
- ONNX Runtime: one thread per core in the worker (the handler's THREADS).

Every address is 127.0.0.1: inference on --port, management on --management-port (the model API
on, for bench/servers.py to read the worker's status), metrics and the two gRPC servers on free
loopback ports. TMPDIR and TEMP point into --work-dir, so TorchServe's pid file
(TMPDIR/.model_server.pid, which `torchserve --start` refuses to start beside), the worker's
socket and the extracted .mar are this server's own; LOG_LOCATION and METRICS_LOCATION put its
logs there too (TorchServe's default is ./logs).

The route: TorchServe serves a model at /predictions/<name> only; the model is named `classify`,
so the bench's upload (POST multipart, field `images`) goes to /predictions/classify
(bench/servers.py ROUTE_PREFIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from serving.contract import CARD_FILE, ONNX_FILE

MODEL_NAME = "classify"  # served at /predictions/classify
BATCH_SIZE = 32
MAX_BATCH_DELAY_MS = 5
WORKERS = 1
JOB_QUEUE_SIZE = 1024
RESPONSE_TIMEOUT_S = 120
HANDLER = Path(__file__).with_name("torchserve_handler.py")
LOG_CONFIG = Path(__file__).with_name("torchserve-log4j2.xml")


def config_properties(port: int, other_ports: dict[str, int], model_store: Path,
                      mar_name: str) -> str:
    """TorchServe's config.properties: every server on 127.0.0.1, the one model with its
    batching. `other_ports`: management, metrics, grpc_inference, grpc_management."""
    model = {MODEL_NAME: {"1.0": {
        "defaultVersion": True, "marName": mar_name, "minWorkers": WORKERS,
        "maxWorkers": WORKERS, "batchSize": BATCH_SIZE, "maxBatchDelay": MAX_BATCH_DELAY_MS,
        "responseTimeout": RESPONSE_TIMEOUT_S}}}
    settings = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{other_ports['management']}",
        "metrics_address": f"http://127.0.0.1:{other_ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": other_ports["grpc_inference"],
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": other_ports["grpc_management"],
        "model_store": model_store,
        "load_models": mar_name,
        "models": json.dumps(model),
        "default_workers_per_model": WORKERS,
        "job_queue_size": JOB_QUEUE_SIZE,
        "default_response_timeout": RESPONSE_TIMEOUT_S,
        "async_logging": "true",
        "disable_system_metrics": "true",
        "disable_token_authorization": "true",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        "enable_model_api": "true",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def archived_files(model_dir: Path) -> list[Path]:
    """The store entry's files the handler reads: the graph (and its external weights, when the
    exporter wrote them apart) and the card."""
    graph = model_dir / ONNX_FILE
    return [graph, *sorted(model_dir.glob(ONNX_FILE + ".*")), model_dir / CARD_FILE]


def archive_key(model_dir: Path, handler_source: bytes) -> str:
    """One archive per store entry and handler version: a changed handler is packed again."""
    digest = hashlib.sha256(handler_source + str(model_dir.resolve()).encode())
    return f"{model_dir.parent.name}-{model_dir.name}-{digest.hexdigest()[:12]}"


def archive(model_dir: Path, stores: Path) -> Path:
    """The model store holding `<MODEL_NAME>.mar` for this model, made by torch-model-archiver
    if it does not exist yet (written to a temporary name first, so a failed run leaves none)."""
    store = stores / archive_key(model_dir, HANDLER.read_bytes())
    if (store / f"{MODEL_NAME}.mar").is_file():
        return store
    partial = stores / (store.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    graph, *extra = archived_files(model_dir)
    subprocess.run([str(Path(sys.executable).parent / "torch-model-archiver"),
                    "--model-name", MODEL_NAME, "--version", "1.0", "--serialized-file",
                    str(graph), "--extra-files", ",".join(str(p) for p in extra), "--handler",
                    str(HANDLER), "--export-path", str(partial), "--force"], check=True)
    partial.rename(store)
    return store


def free_ports(count: int) -> list[int]:
    from devtools.processes import free_port

    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def main() -> None:
    from bench.peers.common import parse_args

    args = parse_args({"work_dir": Path, "management_port": int})
    work = args.work_dir.resolve()
    temp = work / "tmp"
    temp.mkdir(parents=True, exist_ok=True)
    store = archive(args.model_dir.resolve(), work.parent / "torchserve-models")
    ports = {"management": args.management_port,
             **dict(zip(("metrics", "grpc_inference", "grpc_management"), free_ports(3)))}
    config = work / "config.properties"
    config.write_text(config_properties(args.port, ports, store, f"{MODEL_NAME}.mar"))
    os.environ.update({"TMPDIR": str(temp), "TEMP": str(temp), "LOG_LOCATION": str(work / "logs"),
                       "METRICS_LOCATION": str(work / "logs")})
    torchserve = str(Path(sys.executable).parent / "torchserve")
    # exec: this process becomes the torchserve command, whose child is the Java frontend.
    os.execv(torchserve, [torchserve, "--start", "--foreground", "--ncs", "--disable-token-auth",
                          "--ts-config", str(config), "--model-store", str(store),
                          "--log-config", str(LOG_CONFIG)])


if __name__ == "__main__":
    main()
