"""serving/weights.py: the large weights of a serialized ONNX graph, read without the `onnx`
package, compared with what `onnx` itself reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.runtime import write_optimized_graph
from serving.weights import ALIGNMENT, SHARED_MIN_ELEMENTS, large_weights
from tests.serving.test_runtime import conv_graph


def as_onnx_reads_them(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


@pytest.mark.parametrize("optimized", [False, True])
def test_the_large_float_weights_are_read_as_onnx_reads_them(tmp_path: Path,
                                                             optimized: bool) -> None:
    """The stored graph, and the one ONNX Runtime's optimizations write (reordered weights on
    x86, the graph a worker's sessions share)."""
    path = conv_graph(tmp_path / "model.onnx", layers=3, width=64)
    if optimized:
        (tmp_path / "scratch").mkdir()
        path = write_optimized_graph(path, tmp_path / "scratch", 1)
    expected = {name: array for name, array in as_onnx_reads_them(onnx.load(str(path))).items()
                if array.dtype == np.float32 and array.size >= SHARED_MIN_ELEMENTS}
    found = large_weights(path.read_bytes())
    assert expected and found.keys() == expected.keys()
    for name, array in found.items():
        np.testing.assert_array_equal(array, expected[name])
        assert array.dtype == expected[name].dtype and array.ctypes.data % ALIGNMENT == 0


def test_small_integer_and_typed_field_tensors_stay_in_the_graph(tmp_path: Path) -> None:
    """Shapes, biases and tensors written in typed fields instead of raw bytes are left to ONNX
    Runtime; float16 weights are shared as float16."""
    big = np.arange(4096, dtype=np.float32).reshape(64, 64)
    tensors = [
        numpy_helper.from_array(big, "big"),
        numpy_helper.from_array(big.astype(np.float16), "half"),
        numpy_helper.from_array(np.ones(8, np.float32), "bias"),
        numpy_helper.from_array(np.arange(4096, dtype=np.int64), "indices"),
        helper.make_tensor("typed", TensorProto.FLOAT, [2048], np.ones(2048).tolist()),
    ]
    graph = helper.make_graph([], "weights", [], [], initializer=tensors)
    found = large_weights(helper.make_model(graph).SerializeToString())
    assert sorted(found) == ["big", "half"]
    np.testing.assert_array_equal(found["big"], big)
    assert found["half"].dtype == np.float16


def test_weights_stored_outside_the_graph_are_left_to_onnx_runtime(tmp_path: Path) -> None:
    path = conv_graph(tmp_path / "model.onnx", layers=2, width=64)
    model = onnx.load(str(path))
    onnx.save(model, str(tmp_path / "external.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    assert large_weights((tmp_path / "external.onnx").read_bytes()) == {}
