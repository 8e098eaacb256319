"""`python -m train_export import-onnx`: an ONNX classifier from elsewhere, made to fit the store
contract, validated and stored like our own exports.

Serving feeds every graph uint8 pixels (N, H, W, C) and reads `probabilities` and `features`, so
one code path serves every model and normalization cannot be forgotten or done twice. A typical
exported classifier instead takes normalized float (N, C, H, W) and returns logits. Rather than
teach serving a second input format, the imported graph gets the missing pieces as ONNX nodes
around it: Cast -> Transpose -> Mul/Add (the user's mean and std) in front, Softmax (unless it
already returns probabilities) behind. The original graph is untouched inside (its names
prefixed), and a parity check compares the result with the original run on numpy-normalized
input (within --parity-tolerance). It is then saved, checked and stored through the same path as
every other model (store.export_and_store).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from serving.contract import GraphSpec, InputSpec, Lineage, ModelCard, Parity, sha256_of

from .classification import FEATURES_NAME, PROBABILITIES_NAME, ProbabilityParity
from .graph import INPUT_NAME
from .imports import PARITY_SAMPLES, input_spec
from .store import ParityError, export_and_store, library_versions

PREFIX = "imported/"


def fail(message: str) -> SystemExit:
    return SystemExit(f"import-onnx: {message}")


def graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    inputs: list[onnx.ValueInfoProto] = [i for i in model.graph.input
                                         if i.name not in initializers]
    if len(inputs) != 1:
        raise fail(f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                   "an image classifier takes one, the image batch")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or len(tensor.shape.dim) != 4:
        kind = TensorProto.DataType.Name(tensor.elem_type).lower()
        raise fail(f"input {inputs[0].name!r} is {kind} of rank {len(tensor.shape.dim)}; expected "
                   "float (N, C, H, W)")
    return inputs[0]


def known_input(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """Size and colour mode where the graph fixes them (dims with a value, not a name)."""
    _, channels, height, width = (d.dim_value or None for d in value.type.tensor_type.shape.dim)
    known: dict[str, Any] = {}
    if height and width:
        known["input_size"] = [height, width]
    if channels in (1, 3):
        known["color_mode"] = "L" if channels == 1 else "RGB"
    return known


def check_input_fits(value: onnx.ValueInfoProto, spec: InputSpec) -> None:
    dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
    expected = [None, spec.channels, spec.height, spec.width]
    for have, want in zip(dims[1:], expected[1:]):
        if have is not None and have != want:
            raise fail(f"the graph's input is {dims} (N, C, H, W) but the spec says C, H, W = "
                       f"{spec.channels}, {spec.height}, {spec.width}: fix --input-size / "
                       "--color-mode, or leave them out to use the graph's")


def preprocessing_nodes(spec: InputSpec,
                        target: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """uint8 NHWC `pixels` -> (x/255 - mean)/std as float NCHW, written to `target`."""
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    initializers = [numpy_helper.from_array(1.0 / (255.0 * std), "pre/scale"),
                    numpy_helper.from_array(-mean / std, "pre/shift")]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pre/float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre/float"], ["pre/nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["pre/nchw", "pre/scale"], ["pre/scaled"]),
        helper.make_node("Add", ["pre/scaled", "pre/shift"], [target]),
    ]
    return nodes, initializers


def wrap(model: onnx.ModelProto, spec: InputSpec, scores: str, features: str,
         scores_are_logits: bool, classes: int, feature_dim: int) -> onnx.ModelProto:
    """The imported graph between our preprocessing and our two named outputs."""
    original_input = graph_input(model).name
    inner = onnx.compose.add_prefix(model, PREFIX)
    pre_nodes, pre_init = preprocessing_nodes(spec, PREFIX + original_input)
    post_nodes = [
        helper.make_node("Softmax", [PREFIX + scores], [PROBABILITIES_NAME], axis=1)
        if scores_are_logits else
        helper.make_node("Identity", [PREFIX + scores], [PROBABILITIES_NAME]),
        # (N, D) whatever the output's rank: drift detection compares rows of features.
        helper.make_node("Flatten", [PREFIX + features], [FEATURES_NAME], axis=1),
    ]
    pixels = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.UINT8, ["batch", spec.height, spec.width, spec.channels])
    outputs = [helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT,
                                             ["batch", classes]),
               helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT,
                                             ["batch", feature_dim])]
    graph = helper.make_graph(
        pre_nodes + list(inner.graph.node) + post_nodes, "imported_classifier", [pixels],
        outputs, initializer=pre_init + list(inner.graph.initializer),
        value_info=list(inner.graph.value_info))
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import),
                                producer_name="image-classifier train_export import-onnx")
    # The original's IR version fits its opsets; save_onnx lowers it where ORT needs it.
    wrapped.ir_version = model.ir_version
    wrapped.functions.extend(inner.functions)
    return wrapped


def run_original(model_bytes: bytes, input_name: str, outputs: list[str],
                 batch: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    try:
        results: list[np.ndarray] = session.run(outputs, {input_name: batch})
        return results
    except Exception as exc:  # ORT raises its own types: say what it means for the user
        raise fail(f"a test inference on a batch of {len(batch)} failed ({exc}); if the graph "
                   "has a fixed batch size, export it with a dynamic batch axis (torch: "
                   "dynamic_axes={'input': {0: 'batch'}} or dynamic_shapes)") from None


def normalized(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """What the preprocessing nodes compute, in numpy: the reference for parity."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def looks_like_probabilities(scores: np.ndarray) -> bool:
    return bool((scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


def import_onnx(args: argparse.Namespace) -> str:
    started = time.perf_counter()
    labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
    try:
        onnx.checker.check_model(str(args.model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise fail(f"{args.model} is not a valid ONNX model: {exc}") from None
    model = onnx.load(str(args.model))
    value = graph_input(model)
    spec = input_spec(args, known_input(value))
    check_input_fits(value, spec)
    output_names = [o.name for o in model.graph.output]
    scores_name = args.output or output_names[0]
    features_name = args.features_output or scores_name
    missing = sorted({scores_name, features_name} - set(output_names))
    if missing:
        raise fail(f"the graph has no output {missing[0]!r}; its outputs: "
                   f"{', '.join(output_names)}")

    pixels = np.random.default_rng(0).integers(0, 256, (PARITY_SAMPLES, *spec.shape), np.uint8)
    scores, features = run_original(model.SerializeToString(), value.name,
                                     [scores_name, features_name], normalized(pixels, spec))
    if scores.ndim != 2 or scores.shape[1] != len(labels):
        raise fail(f"output {scores_name!r} has shape {scores.shape} for {len(pixels)} images; "
                   f"expected ({len(pixels)}, {len(labels)}): one score per label in "
                   f"{args.labels}, in output order")
    logits = {"logits": True, "probabilities": False}.get(args.outputs_are,
                                                          not looks_like_probabilities(scores))
    expected = softmax(scores) if logits else scores

    feature_dim = int(features.reshape(len(pixels), -1).shape[1])
    wrapped = wrap(model, spec, scores_name, features_name, logits, len(labels), feature_dim)
    scores_were: Literal["logits", "probabilities"] = "logits" if logits else "probabilities"
    card = ModelCard(
        name=args.name,
        architecture=f"onnx:{model.graph.name or args.model.stem}",
        labels=labels,
        input=spec,
        graph=GraphSpec(feature_dim=feature_dim,
                        opset=next((o.version for o in model.opset_import
                                    if o.domain in ("", "ai.onnx")), None)),
        lineage=Lineage(source="onnx", file=args.model.name, file_sha256=sha256_of(args.model),
                        original_input=value.name, original_outputs=output_names,
                        scores_output=scores_name, scores_were=scores_were,
                        features_output=features_name,
                        producer=f"{model.producer_name} {model.producer_version}".strip(),
                        parity_data=f"{len(pixels)} random images",
                        versions=library_versions()),
    )
    try:
        stored = export_and_store(wrapped, card,
                                  ProbabilityParity(pixels, expected, args.parity_tolerance),
                                  store_labels={"task": "image-classification", "source": "onnx"})
    except ParityError as exc:
        raise fail(f"{exc}. If a difference that size is acceptable for this model, raise "
                   "--parity-tolerance; otherwise please report it with the model's opset"
                   ) from None
    parity = stored.card.parity
    assert isinstance(parity, Parity)  # export_and_store measured it, with ProbabilityParity
    print(json.dumps({"tag": stored.tag,
                      "parity": {"onnxruntime_max_abs_diff": parity.onnxruntime_max_abs_diff},
                      "scores_were": scores_were,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return stored.tag
