"""configuration.gpu.yaml served by a real `bentoml serve`, as an operator edits it for a machine
with two GPUs (`resources.gpu: 2`, `workers: 2`): BentoML starts on a CPU-only machine too, gives
both workers the two GPUs, and each worker's /model_info names a GPU of its own.

Here, without a GPU, the runtime runs on the CPU and `device_id` is the worker's assignment; on a
machine with two GPUs the same test checks the devices the sessions really use."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import yaml

from serving.runtime import gpu_device_files
from tests.helpers import ROOT, RunningServer, start_server

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(gpu_device_files() == 1,
                                 reason="two GPUs declared on a machine with one: both workers "
                                 "share it (tests/serving/test_gpu_layout.py)")]

GPUS = WORKERS = 2
POLL_S = 60


@pytest.fixture(scope="module")
def two_gpu_server(trained_model: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("gpu-layout")
    document = yaml.safe_load((ROOT / "configuration.gpu.yaml").read_text())
    block = document["services"]["ImageClassifier"]
    block["resources"]["gpu"], block["workers"] = GPUS, WORKERS
    config = directory / "configuration.gpu.yaml"
    config.write_text(yaml.safe_dump(document))
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "BENTOML_DISABLE_GPU_ALLOCATION")}
    env.update(BENTOML_CONFIG=str(config), IMAGE_CLASSIFIER_MODEL_TAG=trained_model)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env=env) as server:
        yield server


def worker_processes(server: RunningServer) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children(recursive=True)
            if "_bentoml_impl.worker.service" in p.cmdline()]


def devices_by_worker(url: str) -> dict[int, dict[str, Any]]:
    """/model_info's `device` from each worker: a new connection per request (workers take
    connections, not requests) until every worker has answered."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + POLL_S
    while len(seen) < WORKERS and time.monotonic() < deadline:
        response = httpx.post(f"{url}/model_info", json={}, timeout=30)
        assert response.status_code == 200, response.text
        info = response.json()
        seen[info["device"]["worker_index"]] = {**info["device"],
                                                "provider": info["active_provider"]}
    return seen


def test_bentoml_gives_every_worker_the_services_gpus(two_gpu_server: RunningServer) -> None:
    workers = worker_processes(two_gpu_server)
    assert len(workers) == WORKERS, [p.cmdline() for p in workers]
    assert {p.environ().get("CUDA_VISIBLE_DEVICES") for p in workers} == {"0,1"}


def test_each_worker_reports_a_gpu_of_its_own(two_gpu_server: RunningServer) -> None:
    seen = devices_by_worker(two_gpu_server.url)
    assert sorted(seen) == [1, 2], f"workers that answered in {POLL_S} s: {sorted(seen)}"
    for index, device in seen.items():
        assert device["cuda_visible_devices"] == "0,1"
        assert device["device_id"] == index - 1, f"worker {index}: {device}"
        assert device["on_gpu"] == (device["provider"] != "CPUExecutionProvider")
