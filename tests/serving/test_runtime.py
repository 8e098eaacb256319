"""OnnxRuntime: provider choice, and the stored graph answering uint8 batches of any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.contract import ONNX_FILE, ModelCard
from serving.runtime import OnnxRuntime, choose_providers

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
