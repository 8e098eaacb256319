"""OnnxRuntime: provider choice, and the stored graph answering uint8 batches of any size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.contract import ONNX_FILE, GraphSpec, InputSpec, ModelCard
from serving.runtime import OnnxRuntime, choose_providers

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_gpu_providers_need_a_gpu() -> None:
    assert choose_providers(["cuda", "cpu"], ALL, gpu_present=False) == ["CPUExecutionProvider"]
    assert choose_providers(["cuda", "cpu"], ALL, gpu_present=True) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cpu_is_always_the_fallback() -> None:
    assert choose_providers(["tensorrt"], ALL, gpu_present=True) == [
        "TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["cuda"], ["CPUExecutionProvider"], gpu_present=True) == [
        "CPUExecutionProvider"]


@pytest.mark.e2e  # the model trained by the real CLI
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_stored_graph_runs_any_batch_size(model_dir: Path, batch: int) -> None:
    card = ModelCard.read(model_dir)
    runtime = OnnxRuntime(model_dir / ONNX_FILE, card.input, card.graph, providers=["cpu"])
    assert runtime.active_provider == "CPUExecutionProvider"
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *card.input.shape), dtype=np.uint8)
    probabilities, features = runtime.run(pixels)
    assert probabilities.shape == (batch, len(card.labels))
    assert features.shape == (batch, card.graph.feature_dim)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def channel_stats_graph(path: Path, batch: int | str, shape: tuple[int, int, int]) -> Path:
    """A graph of uint8 pixels -> per row, the mean and the max of each channel
    (`probabilities`, `features`); for `batch` rows only where it is a number (as torchvision's
    detectors export), any where it is a name."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["probabilities"], axes=[1, 2], keepdims=0),
             helper.make_node("ReduceMax", ["x"], ["features"], axes=[1, 2], keepdims=0)]
    graph = helper.make_graph(
        nodes, "fixed_batch",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [batch, *shape])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, shape[2]])
         for name in ("probabilities", "features")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # ONNX Runtime 1.31 reads up to 13
    onnx.save(model, str(path))
    return path


def stats_runtime(tmp_path: Path, graph_batch: int | str, card_batch: int | None
                  ) -> OnnxRuntime:
    spec = InputSpec(height=4, width=5, channels=3, color_mode="RGB", mean=(0, 0, 0),
                     std=(1, 1, 1))
    path = channel_stats_graph(tmp_path / ONNX_FILE, graph_batch, spec.shape)
    return OnnxRuntime(path, spec, GraphSpec(feature_dim=3, batch_size=card_batch),
                       providers=["cpu"])


@pytest.mark.parametrize(("graph_batch", "batch"), [(1, 1), (1, 5), (2, 1), (2, 5), (2, 6)])
def test_a_fixed_batch_graph_answers_any_batch_a_piece_at_a_time(
        tmp_path: Path, graph_batch: int, batch: int) -> None:
    runtime = stats_runtime(tmp_path, graph_batch, graph_batch)  # warms up with 1 row
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 4, 5, 3), dtype=np.uint8)
    means, maxima = runtime.run(pixels)
    assert means.shape == (batch, 3) and maxima.shape == (batch, 3)
    np.testing.assert_allclose(means, pixels.mean(axis=(1, 2)), rtol=1e-5,
                               err_msg="rows came back out of order, or from a padding row")
    np.testing.assert_array_equal(maxima, pixels.max(axis=(1, 2)))


def test_a_fixed_batch_graph_without_its_batch_size_in_the_card_fails(tmp_path: Path) -> None:
    """What the card's graph.batch_size is for: ONNX Runtime refuses any other batch."""
    with pytest.raises(Exception, match="(?i)invalid dimensions|got invalid"):
        stats_runtime(tmp_path, graph_batch=2, card_batch=None)  # the 1-row warm-up


def test_a_dynamic_graph_still_runs_in_one_call(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = stats_runtime(tmp_path, graph_batch="batch", card_batch=None)
    calls: list[int] = []
    session_run = runtime.session.run

    def counted(names: list[str], feed: dict[str, np.ndarray], options: object = None
                ) -> list[np.ndarray]:
        calls.append(len(feed["pixels"]))
        return session_run(names, feed, options)

    monkeypatch.setattr(runtime.session, "run", counted)
    runtime.run(np.zeros((3, 4, 5, 3), dtype=np.uint8))
    assert calls == [3], "a graph with a dynamic batch axis runs a batch in one call"


def grow_and_shrink_the_arena(directory: str) -> None:
    """Prints the RSS growth (bytes) after a 64-row call, and what is kept after shrink_arena(1).

    Run in a fresh interpreter: in a process that has already freed memory (the rest of the
    suite), the allocator hands the arena pages it already holds and RSS does not move."""
    import psutil

    spec = InputSpec(height=256, width=256, channels=3, color_mode="RGB", mean=(0, 0, 0),
                     std=(1, 1, 1))  # 64 rows: 50 MB of float activations
    path = channel_stats_graph(Path(directory) / ONNX_FILE, "batch", spec.shape)
    runtime = OnnxRuntime(path, spec, GraphSpec(feature_dim=3), providers=["cpu"],
                          intra_op_threads=1)
    process = psutil.Process()
    before = process.memory_info().rss
    runtime.run(np.zeros((64, *spec.shape), dtype=np.uint8))
    grown = process.memory_info().rss - before
    runtime.shrink_arena(1)
    kept = process.memory_info().rss - before
    means, _ = runtime.run(np.full((2, *spec.shape), 7, dtype=np.uint8))
    np.testing.assert_allclose(means, 7.0)  # the shrunk arena still serves
    print(json.dumps({"grown": grown, "kept": kept}))


def test_shrinking_the_arena_gives_back_what_a_larger_call_grew(tmp_path: Path) -> None:
    """What the start-up calibration's largest calls leave in ONNX Runtime's CPU arena is given
    back by one call of the size serving uses (serving/deployment.py's piece_size)."""
    code = ("from tests.serving.test_runtime import grow_and_shrink_the_arena; "
            f"grow_and_shrink_the_arena({str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    grown, kept = measured["grown"], measured["kept"]
    assert grown > 40 * 2**20, f"the 64-row call grew the arena by {grown / 2**20:.0f} MB only"
    assert kept < grown / 2, f"{kept / 2**20:.0f} of {grown / 2**20:.0f} MB still held"


def test_a_runtime_that_cannot_shrink_its_arena_still_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Giving memory back is a saving: a provider that refuses the run option (not every
    allocator has an arena) leaves the worker serving, with a warning."""
    runtime = stats_runtime(tmp_path, graph_batch="batch", card_batch=None)
    session_run = runtime.session.run

    def refuses_options(names: list[str], feed: dict[str, np.ndarray], options: object = None
                        ) -> list[np.ndarray]:
        if options is not None:
            raise RuntimeError("no arena on this device")
        return session_run(names, feed)

    monkeypatch.setattr(runtime.session, "run", refuses_options)
    runtime.shrink_arena(2)
    assert "kept its memory arena" in caplog.text
    means, _ = runtime.run(np.full((1, 4, 5, 3), 3, dtype=np.uint8))
    np.testing.assert_allclose(means, 3.0)
