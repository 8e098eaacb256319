"""`python -m train_export import-pickle`: a model saved whole with `torch.save(model)`.

Such a file holds a reference to its class (`tasks.detection.model.Net`), not the class: loading
it anywhere that package is not importable fails with `ModuleNotFoundError: No module named
'tasks'`. Here the package is put on the path only while loading (`--code-path`), and the model
is exported to ONNX and TorchScript graphs that need none of it, then stored like our own exports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving.contract import GraphSpec, InputSpec, ModelCard, Parity, sha256_of

from .export import ServingWrapper, check_head_split, export_all
from .models import split_head
from .store import library_versions, save_to_store

PARITY_SAMPLES = 64  # random images: a pickled model comes without its data


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train_export import-pickle",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the torch.save(model) file")
    parser.add_argument("--code-path", type=Path, action="append", default=[],
                        help="a folder from which the model's package is importable (repeat "
                        "for several); needed only here, never by the service")
    parser.add_argument("--labels", type=Path, required=True,
                        help="class names, one per line, in the model's output order")
    parser.add_argument("--name", required=True, help="model name in the BentoML store")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        required=True)
    parser.add_argument("--color-mode", choices=["L", "RGB"], default="RGB")
    parser.add_argument("--mean", type=float, nargs="+", default=[0.485, 0.456, 0.406])
    parser.add_argument("--std", type=float, nargs="+", default=[0.229, 0.224, 0.225])
    parser.add_argument("--polarity", choices=["natural", "light_on_dark", "dark_on_light"],
                        default="natural",
                        help="what transparent pixels become: black for light_on_dark (ink on "
                        "a dark background), white otherwise")
    parser.add_argument("--parity-tolerance", type=float, default=1e-4)
    return parser.parse_args(argv)


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
            raise SystemExit(
                f"{path} needs the module {exc.name!r} to load: pass --code-path DIR, where DIR "
                f"is the folder that contains the package {exc.name.split('.')[0]!r}"
            ) from None
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{path} holds a {type(model).__name__}, not a torch.nn.Module: for a "
                         "state_dict use the torchvision import")
    return model.eval()


def import_pickle(args: argparse.Namespace) -> str:
    started = time.perf_counter()
    labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
    channels = 1 if args.color_mode == "L" else 3
    if len(args.mean) != channels or len(args.std) != channels:
        raise SystemExit(f"--mean and --std need {channels} values for --color-mode "
                         f"{args.color_mode}")
    spec = InputSpec(height=args.input_size[0], width=args.input_size[1], channels=channels,
                     color_mode=args.color_mode, resize="bilinear", polarity=args.polarity,
                     mean=tuple(args.mean), std=tuple(args.std))
    model = load_pickled(args.model, args.code_path)
    sample = np.random.default_rng(0).integers(0, 256, (PARITY_SAMPLES, *spec.shape), np.uint8)
    backbone, head = split_head(model)
    if head.out_features != len(labels):
        raise SystemExit(f"the model has {head.out_features} outputs and {args.labels} has "
                         f"{len(labels)} labels: they must match, in output order")
    wrapper = ServingWrapper(backbone, head, spec.mean, spec.std).eval()
    check_head_split(model, wrapper, torch.from_numpy(sample[:8]))
    with torch.no_grad():
        _, features = wrapper(torch.from_numpy(sample[:1]))
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, parity = export_all(wrapper, sample, Path(tmp), args.parity_tolerance)
        card = ModelCard(
            name=args.name,
            architecture=f"{type(model).__module__}.{type(model).__qualname__}",
            labels=labels,
            input=spec,
            graph=GraphSpec(feature_dim=int(features.shape[1])),
            parity=Parity(**vars(parity)),
            lineage={"source": "torch.save(model)", "file": args.model.name,
                     "file_sha256": sha256_of(args.model),
                     "parity_data": f"{PARITY_SAMPLES} random images",
                     "versions": library_versions()},
        )
        tag = save_to_store(card, artifacts, store_labels={
            "task": "image-classification", "source": "pickled-model"})
    print(json.dumps({"tag": tag, "parity": vars(parity),
                      "seconds": round(time.perf_counter() - started, 1)}))
    return tag
