"""Export a classifier as a self-contained serving graph (ONNX and TorchScript) that checks itself.

The exported graph takes uint8 pixels (N, H, W, C) at the model's input size, scales and
normalizes them itself, and returns class probabilities and penultimate-layer features. Serving
therefore cannot get mean/std wrong, and a GPU receives 4x fewer bytes than float input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from serving.contract import ONNX_FILE, TORCHSCRIPT_FILE

INPUT_NAME, PROBABILITIES_NAME, FEATURES_NAME = "pixels", "probabilities", "features"
# ORT 1.31 reads ONNX IR versions up to 13; onnx 1.23 writes 14 unless told otherwise.
MAX_IR_VERSION = 13


class ServingWrapper(nn.Module):
    """uint8 NHWC pixels -> (probabilities, features), with preprocessing baked in."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, mean, std) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.head = head.eval()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        features = torch.flatten(self.backbone(x), 1)
        return torch.softmax(self.head(features), dim=1), features


@dataclass
class ParityReport:
    samples: int
    tolerance: float
    onnxruntime_max_abs_diff: float
    torchscript_max_abs_diff: float


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


def export_onnx(
    wrapper: ServingWrapper,
    example: torch.Tensor,
    output_file: Path,
    check: bool = True,
) -> list[Path]:
    """Export `wrapper` to ONNX with a dynamic batch axis.

    Args:
        wrapper: the serving wrapper, in eval mode.
        example: uint8 pixels (N, H, W, C), N >= 2, used to trace the graph.
        output_file: where model.onnx goes; external weights (if any) are written beside it.
        check: run onnx.checker (full_check) on the result.

    Returns:
        The files written (model.onnx and, for large models, model.onnx.data).
    """
    output_file = Path(output_file)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about the opset conversion
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[PROBABILITIES_NAME, FEATURES_NAME],
            dynamic_shapes={"pixels": {0: batch}},
            verbose=False,
        )
    program.model_proto.ir_version = min(program.model_proto.ir_version, MAX_IR_VERSION)
    # Weights inside the one file up to protobuf's 2 GB limit: one file is simpler to ship.
    large = program.model_proto.ByteSize() > 1_800_000_000
    program.save(str(output_file), external_data=large)
    written = [output_file] + ([output_file.with_name(output_file.name + ".data")] if large else [])
    if check:
        onnx.checker.check_model(str(output_file), full_check=True)
        model = onnx.load(str(output_file), load_external_data=False)
        if model.ir_version > MAX_IR_VERSION:
            raise ValueError(f"IR version {model.ir_version} > {MAX_IR_VERSION}: ORT cannot load it")
    return written


def export_torchscript(wrapper: ServingWrapper, example: torch.Tensor, output_file: Path) -> Path:
    """TorchScript of the same wrapper (traced), for runtimes that take TorchScript."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
        # TorchServe-style runtimes load; the parity check below proves it round-trips.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        traced.save(str(output_file))
    return Path(output_file)


def check_parity(
    wrapper: ServingWrapper,
    onnx_file: Path,
    torchscript_file: Path,
    pixels: np.ndarray,
    tolerance: float,
) -> ParityReport:
    """Compare probabilities of eager, ONNX Runtime (CPU) and reloaded TorchScript."""
    with torch.no_grad():
        eager, _ = wrapper(torch.from_numpy(pixels))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run([PROBABILITIES_NAME], {INPUT_NAME: pixels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(torchscript_file))
    with torch.no_grad():
        from_ts, _ = loaded(torch.from_numpy(pixels))
    report = ParityReport(
        samples=len(pixels),
        tolerance=tolerance,
        onnxruntime_max_abs_diff=float(np.abs(eager.numpy() - from_onnx).max()),
        torchscript_max_abs_diff=float((eager - from_ts).abs().max().item()),
    )
    worst = max(report.onnxruntime_max_abs_diff, report.torchscript_max_abs_diff)
    if worst > tolerance:
        raise ValueError(
            f"parity check failed: max |p_eager - p_exported| = {worst:.2e} > {tolerance:.0e} "
            f"({report}); the exported graph does not compute what the model computes"
        )
    return report


def run_graph(graph: Path | ort.InferenceSession, output: str, pixels: np.ndarray,
              batch: int = 128) -> np.ndarray:
    """One output of an exported graph (ONNX Runtime, CPU) over many images, a batch at a time."""
    session = graph if isinstance(graph, ort.InferenceSession) else ort.InferenceSession(
        str(graph), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], {INPUT_NAME: pixels[i:i + batch]})[0]
                           for i in range(0, len(pixels), batch)])


def export_all(
    wrapper: ServingWrapper, holdout: np.ndarray, directory: Path, tolerance: float
) -> tuple[list[Path], ParityReport]:
    """ONNX + TorchScript into `directory`, checked against the eager model on `holdout`."""
    example = torch.from_numpy(holdout[:2])
    onnx_files = export_onnx(wrapper, example, Path(directory) / ONNX_FILE)
    ts_file = export_torchscript(wrapper, example, Path(directory) / TORCHSCRIPT_FILE)
    report = check_parity(wrapper, onnx_files[0], ts_file, holdout, tolerance)
    return [*onnx_files, ts_file], report
