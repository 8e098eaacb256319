"""OnnxRuntime: provider choice, and the stored graph answering uint8 batches of any size."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from serving.contract import ONNX_FILE, GraphSpec, InputSpec, ModelCard
from serving.cores import REQUEST_ALONE, CoreShare
from serving.deployment import return_freed_memory
from serving.runtime import OnnxRuntime, choose_providers, cpu_session_of_optimized_graph
from serving.slots import Board
from serving.weights import large_weights

if TYPE_CHECKING:
    import onnxruntime as ort

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


def shapes_met(session) -> list[int]:
    """The batch sizes the session is called with from now on (it still runs them)."""
    met: list[int] = []
    run = session.run
    session.run = lambda names, feed, options=None: (met.append(len(feed["pixels"])) or
                                                     run(names, feed, options))
    return met


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11, 20])
def test_settled_batch_shapes_keep_each_session_on_one_shape(tmp_path: Path, rows: int) -> None:
    """What a GPU worker does (settle_batch_shapes): one image on the first session, anything
    else filled up to 8 on the second, and the same answers as one call of the rows."""
    runtime = stats_runtime(tmp_path, graph_batch="batch", card_batch=None)
    pixels = np.random.default_rng(rows).integers(0, 256, (rows, *runtime.input_spec.shape),
                                                  dtype=np.uint8)
    expected = runtime.run(pixels)
    runtime.settle_batch_shapes(8, even_on_cpu=True)
    assert runtime.batch_session is not None
    lone, batched = shapes_met(runtime.session), shapes_met(runtime.batch_session)
    answered = runtime.run(pixels)
    for got, want in zip(answered, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert set(lone) <= {1} and set(batched) <= {8}
    assert (lone, len(batched)) == (([1], 0) if rows == 1 else ([], -(-rows // 8)))


def test_a_cpu_runtime_keeps_one_session_for_every_shape(tmp_path: Path) -> None:
    """A CPU's time grows with the rows and it builds nothing per shape: no second session,
    no padding."""
    runtime = stats_runtime(tmp_path, graph_batch="batch", card_batch=None)
    runtime.settle_batch_shapes(8)
    met = shapes_met(runtime.session)
    probabilities, _ = runtime.run(np.zeros((5, *runtime.input_spec.shape), np.uint8))
    assert runtime.batch_session is None and met == [5] and probabilities.shape == (5, 3)


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


def conv_graph(path: Path, layers: int = 16, width: int = 256, side: int = 8) -> Path:
    """uint8 NHWC pixels -> `layers` 3x3 convolutions of `width` channels (35 MB of weights at
    the defaults, on 8x8 images so that a call is cheap) -> (probabilities, features): the kind
    of graph ONNX Runtime's layout optimizations rewrite (NCHWc, on x86)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights, nodes = [], [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
                          helper.make_node("Transpose", ["x"], ["h0"], perm=[0, 3, 1, 2])]
    channels = 3
    for i in range(layers):
        weight = (rng.standard_normal((width, channels, 3, 3)) * 0.01).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes += [helper.make_node("Conv", [f"h{i}", f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"h{i + 1}"])]
        channels = width
    nodes += [helper.make_node("GlobalAveragePool", [f"h{layers}"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["features"]),
              helper.make_node("Softmax", ["features"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "convolutions",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", side, side, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])
         for name in ("probabilities", "features")], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


CONV_SPEC = InputSpec(height=8, width=8, channels=3, color_mode="RGB", mean=(0, 0, 0),
                      std=(1, 1, 1))


def session_memory(path: str, optimized: bool) -> None:
    """Prints the RSS growth (bytes) a CPU session of `path` and one call cost, from the stored
    graph or from the optimized one (in a fresh interpreter: see grow_and_shrink_the_arena)."""
    import onnxruntime as ort
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    if optimized:
        session = cpu_session_of_optimized_graph(Path(path), 1)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    one = [size if isinstance(size, int) else 1 for size in session.get_inputs()[0].shape]
    session.run(None, {"pixels": np.zeros(one, np.uint8)})
    # What the session holds, not what glibc kept of the heap it freed (that varied by run).
    return_freed_memory()
    print(json.dumps({"grown": process.memory_info().rss - before}))


def measured_in_a_fresh_interpreter(call: str) -> dict:
    code = f"from tests.serving.test_runtime import *; {call}"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cpu_session_of_the_optimized_graph_holds_no_more_than_one_of_the_stored_graph(
        tmp_path: Path) -> None:
    """Loading the optimized graph costs a worker no memory, once freed heap is handed back (as
    a worker does, and session_memory does): resnet18 holds 60 MB either way."""
    path = str(conv_graph(tmp_path / ONNX_FILE))
    stored = measured_in_a_fresh_interpreter(f"session_memory({path!r}, optimized=False)")
    optimized = measured_in_a_fresh_interpreter(f"session_memory({path!r}, optimized=True)")
    assert optimized["grown"] <= stored["grown"] * 1.1, \
        f"{stored['grown'] / 2**20:.0f} MB as stored, {optimized['grown'] / 2**20:.0f} MB optimized"


def test_the_optimized_graph_answers_as_the_stored_one(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = conv_graph(tmp_path / ONNX_FILE)
    runtime = OnnxRuntime(path, CONV_SPEC, GraphSpec(feature_dim=256), providers=["cpu"],
                          intra_op_threads=1)
    stored = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(1).integers(0, 256, (5, *CONV_SPEC.shape), dtype=np.uint8)
    for ours, theirs in zip(runtime.run(pixels),
                            stored.run(["probabilities", "features"], {"pixels": pixels})):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_the_optimized_graph_is_not_left_on_disk(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """It fits this machine's CPU only: written at start, read, deleted."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    OnnxRuntime(conv_graph(tmp_path / ONNX_FILE), CONV_SPEC, GraphSpec(feature_dim=256),
                providers=["cpu"])
    assert list(scratch.iterdir()) == []


def test_a_graph_onnx_runtime_cannot_write_optimized_is_served_as_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    stored_session = ort.InferenceSession

    def cannot_write(path: str, options: ort.SessionOptions | None = None,
                     **kwargs: object) -> ort.InferenceSession:
        if options is not None and options.optimized_model_filepath:
            raise RuntimeError("no room to write the optimized graph")
        return stored_session(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", cannot_write)
    path = conv_graph(tmp_path / ONNX_FILE, layers=2, width=8)
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        runtime = OnnxRuntime(path, CONV_SPEC, GraphSpec(feature_dim=8), providers=["cpu"])
    assert "no room to write" in caplog.text and "as stored" in caplog.text
    probabilities, _ = runtime.run(np.zeros((2, *CONV_SPEC.shape), np.uint8))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("spin", [False, True])
def test_threads_spin_only_when_asked(tmp_path: Path, spin: bool) -> None:
    """Spinning threads take the cores other workers need: off unless model.thread_spinning."""
    runtime = OnnxRuntime(conv_graph(tmp_path / ONNX_FILE, layers=2, width=8), CONV_SPEC,
                          GraphSpec(feature_dim=8), providers=["cpu"], intra_op_threads=2,
                          spin=spin)
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == \
        ("1" if spin else "0")
    assert options.intra_op_num_threads == 2
    probabilities, _ = runtime.run(np.zeros((2, *CONV_SPEC.shape), np.uint8))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


# --- the session on every core for a call alone (serving/cores.py) ------------------------------

def lone_runtime(tmp_path: Path, **graph: int) -> OnnxRuntime:
    return OnnxRuntime(conv_graph(tmp_path / ONNX_FILE, **graph), CONV_SPEC,
                       GraphSpec(feature_dim=graph.get("width", 256)), providers=["cpu"],
                       intra_op_threads=1)


def called_alone(runtime: OnnxRuntime, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
    marked = REQUEST_ALONE.set(True)
    try:
        return runtime.run(pixels)
    finally:
        REQUEST_ALONE.reset(marked)


def spinning(session: ort.InferenceSession) -> tuple[str, str]:
    """A session's intra-op spinning and its stop at the end of a call, as ONNX Runtime keeps
    them ("" where unset)."""
    options = session.get_session_options()

    def entry(key: str) -> str:
        try:
            return str(options.get_session_config_entry(key))
        except RuntimeError:  # ONNX Runtime's answer for a key never set
            return ""
    return entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")


def test_a_call_alone_of_one_image_runs_on_every_core_with_the_same_answer(tmp_path: Path
                                                                          ) -> None:
    runtime = lone_runtime(tmp_path, layers=4, width=32)
    pixels = np.random.default_rng(2).integers(0, 256, (3, *CONV_SPEC.shape), dtype=np.uint8)
    before = [runtime.run(pixels[:1]), runtime.run(pixels)]
    calls: list[int] = []
    assert runtime.open_lone_session(2, lambda: calls.append(1))
    assert runtime.lone_threads == 2 and runtime.lone_session is not None
    assert runtime.lone_session.get_session_options().intra_op_num_threads == 2
    assert runtime.session.get_session_options().intra_op_num_threads == 1
    assert spinning(runtime.lone_session) == ("1", "1"), "spins while its call runs, then stops"
    assert spinning(runtime.session)[0] == "0", "the worker's own, as model.thread_spinning"
    alone = called_alone(runtime, pixels[:1])
    assert len(calls) == 1
    for ours, expected in zip(alone, before[0]):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
    for ours, expected in zip(runtime.run(pixels[:1]), before[0]):  # not marked: its own
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
    for ours, expected in zip(called_alone(runtime, pixels), before[1]):  # 3 images: its own
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
    assert len(calls) == 1, "only a marked call of one image takes every core"


def test_a_call_alone_keeps_to_its_own_thread_while_another_workers_runtime_is_busy(
        tmp_path: Path) -> None:
    path = tmp_path / "runtime.slots"
    runtime = lone_runtime(tmp_path, layers=2, width=8)
    runtime.cores = CoreShare(Board(path, 1))
    other = CoreShare(Board(path, 2))
    calls: list[int] = []
    assert runtime.open_lone_session(2, lambda: calls.append(1))
    blank = np.zeros((1, *CONV_SPEC.shape), np.uint8)
    with other.call():
        called_alone(runtime, blank)
    assert calls == []
    other.board.publish(0)  # type: ignore[union-attr]  # long idle
    called_alone(runtime, blank)
    assert calls == [1]


def test_no_session_for_calls_alone_on_a_fixed_batch_graph_or_where_it_cannot_be_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    assert not stats_runtime(tmp_path, graph_batch=1, card_batch=1).open_lone_session(2)
    runtime = lone_runtime(tmp_path, layers=2, width=8)
    own = runtime.session

    def unreadable(model: bytes) -> dict:
        raise ValueError("protobuf wire type 7 is not one ONNX writes")

    monkeypatch.setattr("serving.runtime.large_weights", unreadable)
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        assert not runtime.open_lone_session(2)
    assert "wire type 7" in caplog.text
    assert runtime.session is own and runtime.lone_session is None and runtime.lone_threads == 0


def lone_session_memory(path: str) -> None:
    """Prints the RSS growth (bytes) of a session on 2 threads for calls alone over a runtime's
    own, and the graph's weights (in a fresh interpreter: see grow_and_shrink_the_arena)."""
    import psutil

    process = psutil.Process()
    weights = sum(array.nbytes for array in large_weights(Path(path).read_bytes()).values())
    runtime = OnnxRuntime(Path(path), CONV_SPEC, GraphSpec(feature_dim=256), providers=["cpu"],
                          intra_op_threads=1)
    return_freed_memory()
    before = process.memory_info().rss
    runtime.open_lone_session(2)
    called_alone(runtime, np.zeros((1, *CONV_SPEC.shape), np.uint8))
    gc.collect()  # the session it replaced, as a worker collects once started
    return_freed_memory()
    print(json.dumps({"grown": process.memory_info().rss - before, "weights": weights}))


def test_the_session_for_calls_alone_shares_the_weights(tmp_path: Path) -> None:
    """Its own copy of them would grow the worker by their size (35 MB here)."""
    path = str(conv_graph(tmp_path / ONNX_FILE))
    measured = measured_in_a_fresh_interpreter(f"lone_session_memory({path!r})")
    assert measured["grown"] < measured["weights"] / 4, \
        f"grew {measured['grown'] / 2**20:.0f} MB for {measured['weights'] / 2**20:.0f} MB"
