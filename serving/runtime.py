"""Batch -> runtime: one ONNX Runtime session, on the best execution provider available."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import GraphSpec, InputSpec

logger = logging.getLogger(__name__)

_PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(
    preferred: Sequence[str], available: Sequence[str], gpu_present: bool
) -> list[str]:
    """The preferred providers that this onnxruntime build offers, CPU always last.

    onnxruntime-gpu lists CUDA and TensorRT even on machines without a GPU, and asking for them
    there logs a loud load failure before it falls back; so GPU providers need a device too.
    """
    usable = [p for p in available if gpu_present or p not in _GPU_PROVIDERS]
    chosen = [_PROVIDER_NAMES[p] for p in preferred if _PROVIDER_NAMES[p] in usable]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntime:
    """Runs uint8 NHWC batches and returns the graph's outputs as float32 arrays: by default
    (probabilities, features), a classifier's; `output_names` chooses others (a detector's).
    A graph whose card fixes its batch size (`graph.batch_size`) is run a piece at a time."""

    def __init__(
        self,
        model_path: Path,
        input_spec: InputSpec,
        graph: GraphSpec,
        providers: Sequence[str] = ("cuda", "cpu"),
        intra_op_threads: int = 0,
        output_names: Sequence[str] | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = choose_providers(providers, ort.get_available_providers(), gpu_available())
        if "CUDAExecutionProvider" in requested:
            # The CUDA/cuDNN libraries come as pip wheels (nvidia-*), which are not on the
            # loader's path; ORT's helper finds and loads them.
            ort.preload_dlls(directory="")
        self.session = ort.InferenceSession(str(model_path), options, providers=requested)
        # A provider can be listed as available yet fail to initialise (no driver, no GPU):
        # ORT then falls back silently, so report what the session really uses.
        self.providers: list[str] = self.session.get_providers()
        self.input_spec = input_spec
        self.graph = graph
        self.output_names = list(output_names or [graph.probabilities_name, graph.features_name])
        logger.info("ONNX Runtime %s session on %s", ort.__version__, self.providers[0])
        self.run(np.zeros((1, *input_spec.shape), dtype=np.uint8))  # warm-up before ready

    @property
    def active_provider(self) -> str:
        return self.providers[0]

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        """The outputs named by `output_names`, in that order, for a batch of any size."""
        size = self.graph.batch_size
        if size is None or len(pixels) == size:
            return self._run(pixels)
        # A graph exported for a fixed batch (torchvision's detectors: 1): one call per piece of
        # that size, the last one padded with blank rows, and the rows stacked again.
        pieces = []
        for start in range(0, len(pixels), size):
            piece = pixels[start:start + size]
            rows = len(piece)
            if rows < size:
                piece = np.concatenate([piece, np.zeros((size - rows, *piece.shape[1:]),
                                                        piece.dtype)])
            pieces.append(tuple(output[:rows] for output in self._run(piece)))
        return tuple(np.concatenate(outputs) for outputs in zip(*pieces))

    def _run(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self.output_names, {self.graph.input_name: pixels}))

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The same, by output name."""
        return dict(zip(self.output_names, self.run(pixels)))


def gpu_available() -> bool:
    """An NVIDIA device is visible and this onnxruntime build has the CUDA provider."""
    has_device = any(Path("/dev").glob("nvidia[0-9]*"))
    return has_device and "CUDAExecutionProvider" in ort.get_available_providers()
