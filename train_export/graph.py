"""ONNX graph files, whatever the task: written where ONNX Runtime can load them and checked, and
run over many images. Every graph serving loads takes uint8 pixels (N, H, W, C) as `pixels`; its
outputs are the task's own (a classifier's `probabilities` and `features`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

INPUT_NAME = "pixels"
# ORT 1.31 reads ONNX IR versions up to 13; onnx 1.23 writes 14 unless told otherwise.
MAX_IR_VERSION = 13
# Weights inside the one file up to protobuf's 2 GB limit: one file is simpler to ship.
EXTERNAL_DATA_ABOVE_BYTES = 1_800_000_000


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `model` to `path` with an IR version ONNX Runtime reads, and check it in full.

    Args:
        model: the graph, from any exporter or converter (its IR version is lowered in place).
        path: where model.onnx goes; for a model over about 1.8 GB its weights go beside it, in
            `<name>.data`, and the two files must stay side by side.

    Returns:
        The files written: `path`, and its external weights where there are any.

    Raises:
        onnx.checker.ValidationError: the graph is not valid ONNX (onnx.checker, full_check).
    """
    path = Path(path)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    large = model.ByteSize() > EXTERNAL_DATA_ABOVE_BYTES
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=large, location=data.name)
    # By path: the checker then reads external weights too, and is not bound by 2 GB.
    onnx.checker.check_model(str(path), full_check=True)
    return [path, data] if large else [path]


def run_graph(graph: Path | ort.InferenceSession, output: str, pixels: np.ndarray,
              batch: int = 128) -> np.ndarray:
    """One output of an exported graph (ONNX Runtime, CPU) over many images, a batch at a time."""
    session = graph if isinstance(graph, ort.InferenceSession) else ort.InferenceSession(
        str(graph), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], {INPUT_NAME: pixels[i:i + batch]})[0]
                           for i in range(0, len(pixels), batch)])
