"""`python -m train_export quantize --model TAG`: fp16 and int8 variants of a stored model, each
stored as a model of its own (`<name>-fp16`, `<name>-int8`) with its accuracy against the fp32
original in the card.

- fp16 (for GPUs; most CPU kernels have no fp16 and run slower): weights and activations in
  half precision, input and outputs unchanged (ONNX Runtime's float16 converter, keep_io_types).
- int8 (for CPUs): static quantization with ONNX Runtime's tools, QDQ format, per-channel int8
  weights and uint8 activations whose ranges are calibrated on training images. Only Conv,
  Gemm and MatMul are quantized: they hold the compute; the normalization in front and the
  softmax behind stay float, where quantizing buys nothing and costs accuracy.

Calibration and evaluation data: the model's own (the embedded digits, or the ImageFolder it
was trained on), or `--data DIR` (ImageFolder layout, its classes named like the model's labels).
The variant is compared with the fp32 graph on the held-out images: accuracy, its delta, top-1
agreement and the largest probability difference, recorded in the card's lineage (`precision`,
`derived_from`, `vs_fp32`) and shown by /model_info. Each variant is saved, checked and stored
like every other model (graph.save_onnx, store.save_to_store); its parity is against fp32, so
its card's `parity` (against the eager model) is empty.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import bentoml
import numpy as np
import onnx

from serving.contract import ONNX_FILE, ModelCard, PrecisionComparison

from .classification import FEATURES_NAME, PROBABILITIES_NAME
from .data import split_from_card
from .graph import INPUT_NAME, run_graph, save_onnx
from .reference import ReferenceSample
from .store import Exported, save_to_store

PRECISIONS = ("fp16", "int8")
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train_export quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the stored fp32 model, name[:version]")
    parser.add_argument("--to", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="the variants to store")
    parser.add_argument("--data", type=Path, help="an ImageFolder to calibrate and evaluate on "
                        "(default: the data the model was trained on)")
    parser.add_argument("--calibration-images", type=int, default=512,
                        help="training images used to calibrate int8 activation ranges")
    return parser.parse_args(argv)


class Calibration:
    """onnxruntime.quantization's CalibrationDataReader protocol over uint8 training images."""

    def __init__(self, pixels: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([pixels[i:i + batch] for i in range(0, len(pixels), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def to_fp16(source: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted: onnx.ModelProto = convert_float_to_float16(onnx.load(str(source)),
                                                          keep_io_types=True)
    return converted


def to_int8(source: Path, calibration: np.ndarray) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "quantized.onnx"
        quant_pre_process(str(source), str(prepared))  # shapes and folding, as ORT recommends
        quantize_static(str(prepared), str(quantized), Calibration(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(quantized))


def compare(fp32: np.ndarray, variant: np.ndarray, truth: np.ndarray, labels: list[str],
            calibration_images: int | None = None) -> tuple[dict[str, float], PrecisionComparison]:
    base_accuracy = float((fp32.argmax(1) == truth).mean())
    accuracy = float((variant.argmax(1) == truth).mean())
    predicted = variant.argmax(1)
    per_class = {label: round(float((predicted[truth == i] == i).mean()), 4)
                 for i, label in enumerate(labels) if (truth == i).any()}
    return per_class, PrecisionComparison(
        holdout_images=int(len(truth)),
        fp32_accuracy=round(base_accuracy, 4),
        accuracy=round(accuracy, 4),
        accuracy_delta=round(accuracy - base_accuracy, 4),
        top1_agreement=round(float((fp32.argmax(1) == predicted).mean()), 4),
        max_abs_diff=float(np.abs(fp32 - variant).max()),
        mean_abs_diff=float(np.abs(fp32 - variant).mean()),
        calibration_images=calibration_images,
    )


def quantize(args: argparse.Namespace) -> list[str]:
    base = bentoml.models.get(args.model)
    base_graph = Path(base.path) / ONNX_FILE
    card = ModelCard.read(Path(base.path))
    if card.lineage.precision:
        raise SystemExit(f"{base.tag} is already a {card.lineage.precision} variant; "
                         "quantize the fp32 model it came from")
    split = split_from_card(card, args.data)
    if split is None:
        raise SystemExit("this model came without its training data: pass --data DIR, an "
                         "ImageFolder of images like the ones it will serve, to calibrate and "
                         "evaluate the variants")
    fp32 = run_graph(base_graph, PROBABILITIES_NAME, split.holdout_x)
    rng = np.random.default_rng(0)
    calibration = split.train_x[rng.permutation(len(split.train_x))[:args.calibration_images]]
    tags = []
    for precision in args.to:
        started = time.perf_counter()
        graph = to_fp16(base_graph) if precision == "fp16" else to_int8(base_graph, calibration)
        with tempfile.TemporaryDirectory() as tmp:
            exported = Exported(tuple(save_onnx(graph, Path(tmp) / ONNX_FILE)))
            per_class, figures = compare(
                fp32, run_graph(exported.graph, PROBABILITIES_NAME, split.holdout_x),
                split.holdout_y, card.labels,
                calibration_images=int(len(calibration)) if precision == "int8" else None)
            variant = card.model_copy(update={
                "name": f"{card.name}-{precision}",
                "parity": None,  # parity is against the eager model; these figures are vs fp32
                "accuracy": {"holdout": figures.accuracy},
                "class_accuracy": per_class,
                "lineage": card.lineage.model_copy(update={
                    "precision": precision, "derived_from": str(base.tag), "vs_fp32": figures}),
            })
            # The variant's own features: what serving will compare its traffic with.
            stored = save_to_store(variant, exported, store_labels={
                "task": "image-classification", "precision": precision,
                "derived_from": str(base.tag).replace(":", "-")},
                reference=ReferenceSample(split.train_x, seed=0, output=FEATURES_NAME))
        tags.append(stored.tag)
        print(json.dumps({"tag": stored.tag, "precision": precision, **figures.model_dump(),
                          "seconds": round(time.perf_counter() - started, 1)}))
    return tags
