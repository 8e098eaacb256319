"""Workers and GPUs (configuration.gpu.yaml, docs/deploy.md#workers-and-gpus): the file loads for
every service, BentoML's own allocator gives the service's workers the GPUs it declares, and each
worker's runtime takes one of them by its index and says so in /model_info's `device`.

BentoML's GPU detection is faked here (its NVIDIA resource's `from_system`, which asks pynvml);
nothing of ours is."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bentoml
import pytest
from _bentoml_impl.server.allocator import ResourceAllocator
from bentoml._internal.configuration.containers import BentoMLConfiguration
from bentoml._internal.resource import NvidiaGpuResource

from serving import settings
from serving.contract import GraphSpec, InputSpec
from serving.deployment import assigned_device_id, device_info
from serving.runtime import OnnxRuntime, gpu_device_files, on_device, worker_device_id
from tests.helpers import ROOT, python
from tests.serving.test_runtime import channel_stats_graph

GPU_CONFIG = ROOT / "configuration.gpu.yaml"
SERVICES = [(settings.CLASSIFIER, settings.ClassifierSettings),
            (settings.DETECTOR, settings.DetectorSettings),
            (settings.MODEL_SERVER, settings.ModelServerSettings)]
CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def gpu_document() -> dict[str, Any]:
    return settings.read_config_file(GPU_CONFIG)


# --- the file -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("where", "model"), SERVICES, ids=[s.service for s, _ in SERVICES])
def test_the_gpu_configuration_loads_for_every_service(
        where: settings.ServiceSection, model: type[settings.SharedSettings]) -> None:
    document = gpu_document()
    parsed = settings.parse_settings(document, str(GPU_CONFIG), where, model)
    block = settings.service_config(document, parsed)
    gpus, workers = block["resources"]["gpu"], block["workers"]
    assert isinstance(workers, int), \
        f"{where.service}: workers must be a number; with cpu_count BentoML assigns no GPU"
    assert gpus >= 1 and workers % gpus == 0, \
        f"{where.service}: {workers} workers over {gpus} GPUs do not share them evenly"
    assert where.section not in block, "our section must not reach @bentoml.service"


@pytest.mark.parametrize("version", [1, 2])
def test_bentoml_reads_the_gpu_declarations(version: int) -> None:
    """BentoML's CLI validates $BENTOML_CONFIG against its v1 schema, the service loader v2."""
    read = BentoMLConfiguration(override_config_file=str(GPU_CONFIG),
                                use_version=version).to_dict()["services"]
    for where, _ in SERVICES:
        declared = gpu_document()["services"][where.service]
        assert read[where.service]["resources"]["gpu"] == declared["resources"]["gpu"]
        assert read[where.service]["workers"] == declared["workers"]


def test_bentoml_cli_accepts_the_gpu_configuration() -> None:
    env = {**os.environ, "BENTOML_CONFIG": str(GPU_CONFIG)}
    result = python("-c", "import bentoml_cli.cli", env=env)
    assert result.returncode == 0, result.stderr


# --- BentoML's allocator --------------------------------------------------------------------------

Machine = Callable[[int], ResourceAllocator]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    """A machine with `gpus` GPUs as BentoML's allocator sees them (pynvml's answer faked)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("BENTOML_DISABLE_GPU_ALLOCATION", raising=False)

    def with_gpus(gpus: int) -> ResourceAllocator:
        monkeypatch.setattr(NvidiaGpuResource, "from_system",
                            classmethod(lambda cls: list(range(gpus))))
        return ResourceAllocator()
    return with_gpus


def service_block(service: str, gpus: float, workers: int | str) -> dict[str, Any]:
    """configuration.gpu.yaml's block for `service`, as an operator edits it for a machine."""
    block = copy.deepcopy(gpu_document()["services"][service])
    block["resources"]["gpu"], block["workers"] = gpus, workers
    return block


def worker_envs(allocator: ResourceAllocator, service: str, gpus: float, workers: int | str
                ) -> tuple[int, dict[str, str]]:
    """What `bentoml serve` starts: the number of workers and the environment they all get
    (_bentoml_impl/server/serving.py passes one env to the watcher of the service's workers)."""
    config = {service: service_block(service, gpus, workers)}
    return allocator.get_worker_env(SimpleNamespace(name=service), services=config)


@pytest.mark.parametrize(("gpus", "workers", "layout"), [
    (2, 2, [0, 1]),              # one worker per GPU
    (2, 4, [0, 1, 0, 1]),        # two per GPU
    (4, 8, [0, 1, 2, 3, 0, 1, 2, 3]),
    (1, 2, [0, 0]),              # the shipped file: both workers on the one GPU
])
def test_each_worker_takes_its_own_gpu_of_those_bentoml_assigns(
        machine: Machine, gpus: int, workers: int, layout: list[int]) -> None:
    count, env = worker_envs(machine(gpus), "ImageClassifier", gpus, workers)
    assert count == workers
    assert env == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}, \
        "BentoML gives every worker of the service all of its GPUs"
    ids = [worker_device_id(k, env["CUDA_VISIBLE_DEVICES"], device_files=gpus)
           for k in range(1, workers + 1)]
    assert ids == layout


def test_services_of_one_server_get_different_gpus(machine: Machine) -> None:
    """The allocator hands out GPUs once per server: a second service gets the next ones."""
    allocator = machine(4)
    _, first = worker_envs(allocator, "ImageClassifier", 2, 2)
    _, second = worker_envs(allocator, "ObjectDetector", 2, 2)
    assert (first, second) == ({"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"})


def test_cpu_count_workers_get_no_gpu(machine: Machine) -> None:
    _, env = worker_envs(machine(2), "ImageClassifier", 2, "cpu_count")
    assert env == {}, "BentoML 1.4.39 skips GPU assignment for workers: cpu_count"


def test_cuda_visible_devices_set_by_hand_turns_assignment_off(
        machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    allocator = machine(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    _, env = worker_envs(allocator, "ImageClassifier", 2, 2)
    assert env == {}, "the workers inherit the operator's CUDA_VISIBLE_DEVICES"
    assert [worker_device_id(k, "2,3", device_files=4) for k in (1, 2)] == [0, 1]


def test_more_gpus_declared_than_the_machine_has(machine: Machine) -> None:
    """BentoML warns (a ResourceWarning) and names GPUs that do not exist; CUDA shows only the
    real ones, and the workers share those."""
    with pytest.warns(ResourceWarning):
        _, env = worker_envs(machine(1), "ImageClassifier", 2, 2)
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert [worker_device_id(k, "0,1", device_files=1) for k in (1, 2)] == [0, 0]


def test_a_machine_without_a_gpu_still_serves_the_gpu_configuration(machine: Machine) -> None:
    """No refusal on a CPU-only machine: BentoML warns and assigns; the runtime uses the CPU."""
    with pytest.warns(ResourceWarning):
        count, env = worker_envs(machine(0), "ImageClassifier", 1, 2)
    assert (count, env) == (2, {"CUDA_VISIBLE_DEVICES": "0"})


# --- a worker's device ----------------------------------------------------------------------------

@pytest.mark.parametrize(("worker", "visible", "files", "device"), [
    (1, None, 0, None),           # no GPU at all
    (3, None, 2, 0),              # nothing set: every GPU visible
    (2, "", 2, None),             # set empty: CUDA shows none
    (2, "-1", 2, None),
    (2, "0,-1,1", 2, 0),          # CUDA stops at the first invalid entry
    (2, "GPU-8a1d,GPU-77f0", 2, 1),  # UUIDs count as well
    (None, "0,1", 2, 0),          # outside `bentoml serve`: the first
    (4, "0,1", 0, 1),             # no device files (no GPU here): the entries alone
])
def test_worker_device_id(worker: int | None, visible: str | None, files: int,
                          device: int | None) -> None:
    assert worker_device_id(worker, visible, files) == device


def test_only_gpu_providers_are_pinned_to_the_device() -> None:
    heuristic = {"cudnn_conv_algo_search": "HEURISTIC"}
    assert on_device([TENSORRT, CUDA, CPU], 1) == [
        (TENSORRT, {"device_id": "1"}), (CUDA, {"device_id": "1", **heuristic}), CPU]
    assert on_device([CUDA, CPU], None) == [(CUDA, heuristic), CPU]


@pytest.mark.parametrize("setting, option", [
    ("heuristic", "HEURISTIC"), ("exhaustive", "EXHAUSTIVE"), ("default", "DEFAULT")])
def test_the_convolution_search_setting_reaches_the_cuda_provider(setting: str,
                                                                  option: str) -> None:
    model = settings.ModelSettings(cudnn_conv_algo_search=setting)
    assert on_device([CUDA, CPU], None, model.cudnn_conv_algo_search) == [
        (CUDA, {"cudnn_conv_algo_search": option}), CPU]


def test_the_convolution_search_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        settings.ModelSettings(cudnn_conv_algo_search="fastest")


def cpu_runtime(tmp_path: Path, device_id: int | None) -> OnnxRuntime:
    spec = InputSpec(height=4, width=5, channels=3, color_mode="RGB", mean=(0, 0, 0),
                     std=(1, 1, 1))
    graph = channel_stats_graph(tmp_path / "model.onnx", "N", spec.shape)
    return OnnxRuntime(graph, spec, GraphSpec(feature_dim=3), providers=["cpu"],
                       device_id=device_id)


@pytest.mark.skipif(gpu_device_files() == 1, reason="with one GPU every worker is on it")
def test_model_info_reports_the_workers_device(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As BentoML's worker 2 of a service given GPUs 0 and 1 (its server context and the
    environment it sets)."""
    monkeypatch.setattr(bentoml.server_context, "worker_index", 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    runtime = cpu_runtime(tmp_path, assigned_device_id())
    info = device_info(runtime).model_dump()
    assert info == {"worker_index": 2, "cuda_visible_devices": "0,1", "device_id": 1,
                    "on_gpu": False, "lone_request_threads": 0}


def test_the_device_is_in_the_model_info_schema() -> None:
    from serving.schemas import DetectorInfo, ModelInfo

    for schema in (ModelInfo, DetectorInfo):
        assert "device" in schema.model_json_schema()["required"]

