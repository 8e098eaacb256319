"""`python -m train_export`: train the default digits classifier and save it to the model store.
`python -m train_export --task detection`: the default digit detector instead
(train_export/detection/pipeline.py).

`python -m train_export import-pickle|import-torchvision|import-onnx ...`: store your own model
instead (train_export/imports.py, onnx_import.py). `python -m train_export --data DIR`: train on
your own images. `python -m train_export quantize --model TAG`: store its fp16 and int8 variants
(train_export/precision.py). `--help` after a subcommand lists its options.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .config import TrainConfig

_HELP = {
    "name": "model name in the BentoML store (each run adds a version; name:latest is the newest)",
    "architecture": "'small_cnn' or any torchvision.models classifier, e.g. resnet18 "
    "(built with weights=None; nothing is downloaded)",
    "input_size": "side of the square model input in pixels",
    "epochs": "training epochs; 0 exports the untrained (randomly initialized) model",
    "batch_size": "training batch size",
    "learning_rate": "peak learning rate (AdamW, one-cycle schedule)",
    "weight_decay": "AdamW weight decay",
    "seed": "random seed: the same seed gives the same model",
    "holdout_fraction": "share of the data held out for accuracy and parity",
    "parity_tolerance": "max |p_eager - p_exported| accepted",
    "examples_per_format": "sample images written per format (PNG, JPEG)",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m train_export",
        description="Train a classifier on scikit-learn's embedded 8x8 digits, export ONNX and "
        "TorchScript, check parity and save everything serving needs to the BentoML model store "
        "($BENTOML_HOME/models). To store your own model instead: "
        "python -m train_export import-pickle --help (a torch.save(model) file), "
        "import-torchvision --help (an architecture and a state_dict) or import-onnx --help "
        "(an ONNX classifier). Smaller variants of a stored model: "
        "python -m train_export quantize --help (fp16 and int8).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in fields(TrainConfig):
        if field.name in _HELP:
            flag = "--" + field.name.replace("_", "-")
            kind = type(getattr(defaults, field.name))
            parser.add_argument(flag, type=kind, default=getattr(defaults, field.name),
                                help=_HELP[field.name])
    parser.add_argument("--task", choices=["classification", "detection"],
                        default="classification",
                        help="detection: the default digit detector instead (its options: "
                        "python -m train_export --task detection --help)")
    parser.add_argument("--output-name", dest="name", help="alias of --name")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train without random shifts and rotations")
    parser.add_argument("--data", dest="data_dir", type=Path,
                        help="train on your own images: a folder with one sub-folder per class "
                        "(DIR/cat/1.jpg, DIR/dog/2.png, ...); labels are the folder names")
    parser.add_argument("--color-mode", choices=["L", "RGB"],
                        help="grey or colour input (default: L for small_cnn on the digits, "
                        "RGB otherwise)")
    parser.add_argument("--examples-dir", type=Path, default=defaults.examples_dir,
                        help="where sample images go; '' to write none")
    args = parser.parse_args(argv)
    values = vars(args)
    values.pop("task")
    if not values.get("examples_dir") or str(values["examples_dir"]) in ("", "."):
        values["examples_dir"] = None
    if values["data_dir"] is not None and values["name"] == defaults.name:
        parser.error("--data: give the model its own --name (digits-classifier is the default "
                     "model's name; `make serve` would serve yours instead)")
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ("import-pickle", "import-torchvision", "import-onnx"):
        from .imports import import_model
        from .imports import parse_args as parse_import_args
        from .onnx_import import import_onnx

        args = parse_import_args(argv[0], argv[1:])
        (import_onnx if args.command == "import-onnx" else import_model)(args)
        return
    if _task(argv) == "detection":
        from .detection.pipeline import parse_args as parse_detection_args
        from .detection.pipeline import train_and_export_detector

        config, name, examples_dir = parse_detection_args(argv)
        train_and_export_detector(config, name, examples_dir)
        return
    if argv[:1] == ["quantize"]:
        from .precision import parse_args as parse_quantize_args
        from .precision import quantize

        quantize(parse_quantize_args(argv[1:]))
        return
    from .pipeline import train_and_export  # torch is imported only once the arguments are good

    train_and_export(parse_args(argv))


def _task(argv: list[str]) -> str:
    """The value of --task (classification by default), wherever it is in the arguments."""
    for i, arg in enumerate(argv):
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
    return "classification"


if __name__ == "__main__":
    main()
