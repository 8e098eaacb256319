"""A classifier's side of the one export path (store.export_and_store): its serving graph, with
preprocessing baked in, and its parity measure.

The graph takes uint8 pixels (N, H, W, C) at the model's input size, scales and normalizes them
itself, and returns class probabilities and penultimate-layer features. Serving therefore cannot
get mean/std wrong, and a GPU receives 4x fewer bytes than float input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving.contract import TORCHSCRIPT_FILE, InputSpec, ModelCard, Parity

from .export import export_torchscript, load_torchscript, torch_graph
from .graph import run_graph
from .models import split_head
from .store import Exported, ParityError, ReferenceWriter, Stored, export_and_store

PROBABILITIES_NAME, FEATURES_NAME = "probabilities", "features"
OUTPUT_NAMES = (PROBABILITIES_NAME, FEATURES_NAME)


class ServingWrapper(nn.Module):
    """uint8 NHWC pixels -> (probabilities, features), with preprocessing baked in."""

    scale: torch.Tensor  # buffers, registered in __init__
    shift: torch.Tensor

    def __init__(self, backbone: nn.Module, head: nn.Linear, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.head = head.eval()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features  # the head reads the features

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        features = torch.flatten(self.backbone(x), 1)
        return torch.softmax(self.head(features), dim=1), features


def serving_wrapper(model: nn.Module, spec: InputSpec, sample: np.ndarray) -> ServingWrapper:
    """`model` split at its last Linear layer and wrapped for serving, checked on `sample`."""
    backbone, head = split_head(model)
    wrapper = ServingWrapper(backbone, head, spec.mean, spec.std).eval()
    check_head_split(model, wrapper, torch.from_numpy(sample))
    return wrapper


def check_head_split(model: nn.Module, wrapper: ServingWrapper, sample: torch.Tensor) -> None:
    """The wrapper must compute what the original model computes."""
    with torch.no_grad():
        expected = torch.softmax(model.eval()(
            sample.permute(0, 3, 1, 2).to(torch.float32) * wrapper.scale + wrapper.shift), dim=1)
        got, _ = wrapper(sample)
    diff = (expected - got).abs().max().item()
    if diff > 1e-5:
        raise ValueError(
            f"the model's output is not its last nn.Linear layer (difference {diff:.2e}): "
            "export needs a classifier whose final layer is a Linear head"
        )


@dataclass(frozen=True)
class ProbabilityParity:
    """A classifier's parity: max |p_source - p_runtime| over `pixels`, for ONNX Runtime on the
    stored graph and for the reloaded TorchScript where the export wrote one."""

    pixels: np.ndarray  # uint8 (N, H, W, C)
    expected: np.ndarray  # the source model's probabilities for `pixels`
    tolerance: float

    def __call__(self, exported: Exported) -> Parity:
        served = run_graph(exported.graph, PROBABILITIES_NAME, self.pixels)
        torchscript = exported.file(TORCHSCRIPT_FILE)
        parity = Parity(
            samples=len(self.pixels),
            tolerance=self.tolerance,
            onnxruntime_max_abs_diff=float(np.abs(served - self.expected).max()),
            torchscript_max_abs_diff=None if torchscript is None else self.torchscript_diff(
                torchscript),
        )
        worst = max(d for d in (parity.onnxruntime_max_abs_diff, parity.torchscript_max_abs_diff)
                    if d is not None)
        if worst > self.tolerance:
            raise ParityError(
                f"parity check failed: max |p_source - p_exported| = {worst:.2e} > "
                f"{self.tolerance:.0e} ({parity}); the exported graph does not compute what the "
                "model computes")
        return parity

    def torchscript_diff(self, path: Path) -> float:
        with torch.no_grad():
            probabilities, _ = load_torchscript(path)(torch.from_numpy(self.pixels))
        return float(np.abs(probabilities.numpy() - self.expected).max())


def export_classifier(wrapper: ServingWrapper, pixels: np.ndarray, card: ModelCard,
                      tolerance: float, store_labels: dict[str, str],
                      reference: ReferenceWriter | None = None) -> Stored:
    """ONNX and TorchScript of `wrapper`, stored with `card` once both compute what the eager
    wrapper computes on `pixels` (uint8 (N, H, W, C), N >= 2), within `tolerance`."""
    example = torch.from_numpy(pixels[:2])
    with torch.no_grad():
        expected, _ = wrapper(torch.from_numpy(pixels))
    return export_and_store(
        torch_graph(wrapper, example, OUTPUT_NAMES), card,
        ProbabilityParity(pixels, expected.numpy(), tolerance), store_labels,
        other_files=lambda directory: [
            export_torchscript(wrapper, example, directory / TORCHSCRIPT_FILE)],
        reference=reference)
