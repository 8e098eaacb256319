"""What a worker does when it starts: its runtime gets the model settings, and once its models
are loaded, the heap allocated so far leaves the garbage collector's generations
(keep_out_of_collections) and what starting freed goes back to the system
(return_freed_memory)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.classification import Classification
from serving.contract import ONNX_FILE, GraphSpec
from serving.cores import machine_cores
from serving.deployment import (
    Deployment,
    StoreEntry,
    keep_out_of_collections,
    return_freed_memory,
)
from serving.routing import Router
from serving.settings import ClassifierSettings
from tests.serving.test_runtime import CONV_SPEC, conv_graph, measured_in_a_fresh_interpreter


def test_objects_allocated_at_start_are_frozen_and_new_ones_are_not() -> None:
    loaded = [[] for _ in range(1000)]
    try:
        keep_out_of_collections()
        frozen = gc.get_freeze_count()
        assert frozen >= len(loaded)
        later: list[list[int]] = [[] for _ in range(1000)]
        assert gc.get_freeze_count() == frozen  # only what existed at the call
        # The collector's generations hold the new lists, not the frozen ones.
        scanned = {id(o) for o in gc.get_objects()}
        assert id(later[0]) in scanned and id(loaded[0]) not in scanned
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


@pytest.mark.parametrize("spinning", [False, True])
def test_model_thread_spinning_reaches_the_session(tmp_path: Path, spinning: bool) -> None:
    """model.thread_spinning (off by default) is what the worker's ONNX Runtime session gets."""
    graph = conv_graph(tmp_path / ONNX_FILE, layers=2, width=8)
    card = SimpleNamespace(input=CONV_SPEC, graph=GraphSpec(feature_dim=8))
    settings = ClassifierSettings.model_validate(
        {"model": {"providers": ["cpu"], "intra_op_threads": 2, "thread_spinning": spinning}})
    deployment = Deployment(settings, settings.served_variants(), [], None, Router([1.0], []))
    entry = StoreEntry("graph:1", card, graph.parent)  # type: ignore[arg-type]
    runtime = deployment.load_runtime(entry, Classification(list("abcdefgh"), top_k=1))
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == \
        ("1" if spinning else "0")
    assert ClassifierSettings().model.thread_spinning is False


def conv_deployment(tmp_path: Path, model: dict, **graph: int
                    ) -> tuple[Deployment, StoreEntry]:
    graph_path = conv_graph(tmp_path / ONNX_FILE, **graph)
    card = SimpleNamespace(input=CONV_SPEC, graph=GraphSpec(feature_dim=graph.get("width", 256)))
    settings = ClassifierSettings.model_validate({"model": {"providers": ["cpu"], **model}})
    deployment = Deployment(settings, settings.served_variants(), [], None, Router([1.0], []))
    return deployment, StoreEntry("graph:1", card, graph_path.parent)  # type: ignore[arg-type]


@pytest.mark.parametrize(("setting", "threads"), [(2, 2), (1, 0), (0, machine_cores())])
def test_model_lone_request_threads_set_gives_the_runtime_that_session(
        tmp_path: Path, setting: int, threads: int) -> None:
    deployment, entry = conv_deployment(tmp_path, {"lone_request_threads": setting},
                                        layers=2, width=8)
    runtime = deployment.load_runtime(entry, Classification(list("abcdefgh"), top_k=1))
    deployment.add_lone_session(entry, runtime)
    expected = threads if threads > 1 else 0
    assert runtime.lone_threads == expected
    assert (runtime.lone_session is not None) == bool(expected)


def test_auto_gives_a_light_model_every_core_too(tmp_path: Path) -> None:
    """An 8x8 image through two small convolutions: its threads spin while the call runs, which
    pays for light models as well (serving/cores.py)."""
    deployment, entry = conv_deployment(tmp_path, {}, layers=2, width=8)
    assert ClassifierSettings().model.lone_request_threads == "auto"
    runtime = deployment.load_runtime(entry, Classification(list("abcdefgh"), top_k=1))
    deployment.add_lone_session(entry, runtime)
    cores = machine_cores()
    assert runtime.lone_threads == (cores if cores > 1 else 0)
    assert (runtime.lone_session is not None) == (cores > 1)


def free_the_middle_of_the_heap_and_trim() -> None:
    """Prints the RSS (bytes) 100 MB of freed heap still held, and after return_freed_memory.
    In a fresh interpreter: a process that has freed memory before reuses it instead."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    blocks = [bytes(1000) + bytes([i % 256]) for i in range(100_000)]  # malloc'd, not pymalloc'd
    # The last block stays: above the others, it keeps glibc from giving the freed pages back
    # from the top of the heap by itself.
    del blocks[:-1]
    held = process.memory_info().rss - before
    return_freed_memory()
    print(json.dumps({"held": held, "kept": process.memory_info().rss - before}))


def test_memory_freed_at_start_goes_back_to_the_system() -> None:
    measured = measured_in_a_fresh_interpreter(
        "from tests.serving.test_deployment import free_the_middle_of_the_heap_and_trim; "
        "free_the_middle_of_the_heap_and_trim()")
    assert measured["held"] > 80 * 2**20, "glibc kept no freed memory: nothing to test"
    assert measured["kept"] < measured["held"] / 4, measured
