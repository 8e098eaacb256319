"""Bring your own model: `python -m train_export import-pickle | import-torchvision | import-onnx`.

- import-pickle: a model saved whole with `torch.save(model)`. Such a file holds a reference to
  its class (`tasks.detection.model.Net`), not the class: loading it anywhere that package is not
  importable fails with `ModuleNotFoundError: No module named 'tasks'`. Here the package is put on
  the path only while loading (`--code-path`).
- import-torchvision: a torchvision architecture and a `state_dict` checkpoint.
- import-onnx: an existing ONNX classifier (float NCHW in, scores out); train_export/onnx_import.py.

Either way the model is exported to ONNX and TorchScript graphs that need none of its code,
checked for parity, and stored with its labels, input spec and lineage through the same path as
our own exports (store.export_and_store).

`--task detection` (import-pickle, import-torchvision): a detector instead, DETR-style or
torchvision-style; train_export/detection/imports.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from serving.contract import GraphSpec, InputSpec, Lineage, ModelCard, sha256_of

from .classification import export_classifier, serving_wrapper
from .store import library_versions

PARITY_SAMPLES = 64  # random images: an imported model comes without its data


def parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m train_export {command}",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "import-pickle":
        parser.add_argument("--model", type=Path, required=True,
                            help="the torch.save(model) file")
        parser.add_argument("--code-path", type=Path, action="append", default=[],
                            help="a folder from which the model's package is importable (repeat "
                            "for several); needed only here, never by the service")
    elif command == "import-onnx":
        parser.add_argument("--model", type=Path, required=True,
                            help="the .onnx file: float input (N, C, H, W), normalized; output "
                            "(N, classes), logits or probabilities")
        parser.add_argument("--output", help="the graph output with the class scores "
                            "(default: its first output)")
        parser.add_argument("--outputs-are", choices=["auto", "logits", "probabilities"],
                            default="auto", help="auto: probabilities when every row of a test "
                            "inference is non-negative and sums to 1")
        parser.add_argument("--features-output", help="a graph output with penultimate "
                            "features, for drift detection (default: the class scores)")
    else:
        parser.add_argument("--architecture", required=True,
                            help="a torchvision.models classifier, e.g. resnet18; with --task "
                            "detection a torchvision.models.detection architecture, e.g. "
                            "fasterrcnn_mobilenet_v3_large_320_fpn")
        parser.add_argument("--checkpoint", type=Path, required=True,
                            help="its state_dict (also accepted: a dict holding it under "
                            "'state_dict' or 'model'; a 'module.' prefix is removed)")
    if command != "import-onnx":
        detection_options(parser, command)
    parser.add_argument("--labels", type=Path, required=True,
                        help="class names, one per line, in the model's output order")
    parser.add_argument("--name", required=True, help="model name in the BentoML store")
    parser.add_argument("--spec", type=Path,
                        help="a JSON or YAML file with any of the options below (input_size, "
                        "color_mode, mean, std, polarity); options given here win")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--color-mode", choices=["L", "RGB"])
    parser.add_argument("--mean", type=float, nargs="+")
    parser.add_argument("--std", type=float, nargs="+")
    parser.add_argument("--polarity", choices=["natural", "light_on_dark", "dark_on_light"],
                        help="what transparent pixels become: black for light_on_dark (ink on "
                        "a dark background), white otherwise")
    parser.add_argument("--parity-tolerance", type=float, default=1e-4,
                        help="max |p_original - p_exported| accepted on the parity images")
    args = parser.parse_args(argv)
    args.command = command
    if command != "import-onnx" and args.task == "classification":
        given = [flag for flag, value in (
            ("--outputs", getattr(args, "outputs", "auto") != "auto"), ("--fill", args.fill),
            ("--parity-threshold", args.parity_threshold), ("--data", args.data)) if value]
        if given:
            parser.error(f"{', '.join(given)}: only with --task detection")
    return args


def detection_options(parser: argparse.ArgumentParser, command: str) -> None:
    """--task detection and the options only a detector takes."""
    parser.add_argument("--task", choices=["classification", "detection"],
                        default="classification",
                        help="detection: the model is a detector (docs/detection.md, 'Bring your "
                        "own detector')")
    group = parser.add_argument_group("--task detection")
    if command == "import-pickle":
        group.add_argument("--outputs", choices=["auto", "detr", "torchvision"], default="auto",
                           help="what the model answers: detr (logits (N, Q, classes + 1) and "
                           "pred_boxes (N, Q, 4), normalized cx, cy, w, h) or torchvision (one "
                           "dict per image: boxes in input pixels, scores, labels); auto: "
                           "whichever a test batch shows. --model may also be a Hugging Face "
                           "save_pretrained folder")
    group.add_argument("--fill", type=int, nargs=3, metavar=("R", "G", "B"),
                       help="the letterbox's padding colour (default: the mean colour, which "
                       "normalizes to 0, as DETR and torchvision pad their batches)")
    group.add_argument("--parity-threshold", type=float,
                       help="the confidence threshold parity is checked at (default: the one "
                       "that keeps about 10 of the model's own detections per parity image)")
    group.add_argument("--data", type=Path,
                       help="a folder of images (any depth, e.g. an ImageFolder): their "
                       "features become the drift reference; without it the model is served "
                       "with no drift reference")


def input_spec(args: argparse.Namespace, known: dict[str, Any] | None = None) -> InputSpec:
    """Options, over the --spec file, over what the model itself says (`known`: an ONNX input's
    size and colour mode), over ImageNet's RGB defaults."""
    import yaml

    values = {"color_mode": "RGB", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "polarity": "natural", **(known or {})}
    if args.spec is not None:
        values.update(yaml.safe_load(args.spec.read_text()) or {})  # YAML reads JSON too
    values.update({k: getattr(args, k) for k in ("input_size", "color_mode", "mean", "std",
                                                 "polarity") if getattr(args, k) is not None})
    if "input_size" not in values:
        raise SystemExit("give the model's input size: --input-size HEIGHT WIDTH (or input_size "
                         "in --spec)")
    height, width = values["input_size"]
    channels: Literal[1, 3] = 1 if values["color_mode"] == "L" else 3
    if len(values["mean"]) != channels or len(values["std"]) != channels:
        raise SystemExit(f"mean and std need {channels} values for color mode "
                         f"{values['color_mode']}")
    return InputSpec(height=height, width=width, channels=channels,
                     color_mode=values["color_mode"], resize="bilinear",
                     polarity=values["polarity"], mean=tuple(values["mean"]),
                     std=tuple(values["std"]))


@contextmanager
def importable(code_paths: list[Path]) -> Iterator[None]:
    """The user's packages on sys.path for as long as the pickle is being loaded."""
    added = [str(p.resolve()) for p in code_paths]
    sys.path[:0] = added
    try:
        yield
    finally:
        for path in added:
            sys.path.remove(path)


def load_pickled(path: Path, code_paths: list[Path]) -> nn.Module:
    with importable(code_paths):
        try:
            # weights_only=False: a whole pickled model is code; load only files you trust.
            model = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:
            missing = cast(str, exc.name)  # always set when an import finds no module
            raise SystemExit(
                f"{path} needs the module {missing!r} to load: pass --code-path DIR, where DIR "
                f"is the folder that contains the package {missing.split('.')[0]!r}"
            ) from None
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{path} holds a {type(model).__name__}, not a torch.nn.Module: for a "
                         "state_dict use the torchvision import")
    return model.eval()


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict: the file itself, or a dict holding it under 'state_dict' or
    'model'; a DataParallel 'module.' prefix removed."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_torchvision(architecture: str, checkpoint: Path, classes: int) -> nn.Module:
    from .models import build_model

    model = build_model(architecture, classes, in_channels=3)
    state = read_state_dict(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SystemExit(f"{checkpoint} does not fit {architecture} with {classes} classes (one "
                         f"per line of --labels):\n{exc}") from None
    return model.eval()


def import_model(args: argparse.Namespace) -> str:
    if args.task == "detection":
        from .detection.imports import import_detector

        return import_detector(args)
    started = time.perf_counter()
    labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
    spec = input_spec(args)
    if args.command == "import-pickle":
        model = load_pickled(args.model, args.code_path)
        source = Lineage(source="torch.save(model)", file=args.model.name,
                         file_sha256=sha256_of(args.model))
        architecture = f"{type(model).__module__}.{type(model).__qualname__}"
    else:
        model = load_torchvision(args.architecture, args.checkpoint, len(labels))
        source = Lineage(source="torchvision state_dict", file=args.checkpoint.name,
                         file_sha256=sha256_of(args.checkpoint))
        architecture = args.architecture
    sample = np.random.default_rng(0).integers(0, 256, (PARITY_SAMPLES, *spec.shape), np.uint8)
    wrapper = serving_wrapper(model, spec, sample[:8])
    if wrapper.head.out_features != len(labels):
        raise SystemExit(f"the model has {wrapper.head.out_features} outputs and {args.labels} "
                         f"has {len(labels)} labels: they must match, in output order")
    card = ModelCard(
        name=args.name,
        architecture=architecture,
        labels=labels,
        input=spec,
        graph=GraphSpec(feature_dim=wrapper.feature_dim),
        lineage=source.model_copy(update={"parity_data": f"{PARITY_SAMPLES} random images",
                                          "versions": library_versions()}),
    )
    stored = export_classifier(wrapper, sample, card, args.parity_tolerance, store_labels={
        "task": "image-classification", "source": args.command.removeprefix("import-")})
    parity = stored.card.parity
    assert parity is not None  # export_and_store always measures it
    print(json.dumps({"tag": stored.tag, "parity": parity.model_dump(),
                      "seconds": round(time.perf_counter() - started, 1)}))
    return stored.tag
