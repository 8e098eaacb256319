"""`python -m train_export --task detection`: train the default detector on composed digit scenes,
evaluate it with COCOeval through the served path, export it, check parity and store it as
`digits-detector:<version>`.

train (train.py) -> COCO mAP on held-out scenes (evaluate.py) -> ONNX with a dynamic batch axis
(export.torch_graph) -> parity of the stored graph's detections with the eager model's
(parity.py) -> the store entry (store.export_and_store): graph, card, drift reference.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from serving.contract import (
    ClassAP,
    DetectionParity,
    DetectionSpec,
    DetectorTraining,
    GraphSpec,
    InputSpec,
    Lineage,
    ModelCard,
)

from ..export import torch_graph
from ..reference import ReferenceSample
from ..store import Exported, Stored, export_and_store, library_versions
from .evaluate import Thresholds, coco_map, detect, eager_runner, onnx_runner
from .model import to_frame
from .parity import DetectFunction, DetectionParityCheck
from .scenes import TRAIN_STREAM, compose_scenes, split_sources
from .train import DetectorConfig, TrainedDetector, train_detector

DEFAULT_NAME = "digits-detector"
OUTPUT_NAMES = ("boxes", "scores", "features")
# Parity on the first held-out scenes: enough to meet every scene size and digit count.
PARITY_SCENES = 64
# The threshold parity is checked at: below the service's default (0.5), so that the comparison
# covers the low-scoring detections too.
PARITY_THRESHOLD = 0.3
DATASET = "digit scenes composed from sklearn.datasets.load_digits"


def parse_args(argv: list[str]) -> tuple[DetectorConfig, str, Path | None]:
    defaults = DetectorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m train_export --task detection",
        description="Train the default digit detector on scenes composed from scikit-learn's "
        "embedded digits, evaluate it with pycocotools' COCOeval on held-out scenes (digits "
        "never seen in training), export ONNX, check parity and save it to the BentoML model "
        "store.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=["detection"], default="detection")
    parser.add_argument("--name", default=DEFAULT_NAME, help="model name in the BentoML store")
    for name, help_text in (("train_scenes", "scenes composed for training"),
                            ("epochs", "passes over them"), ("heldout_scenes",
                            "held-out scenes COCOeval scores"), ("seed", "random seed"),
                            ("batch_size", "training batch size"),
                            ("learning_rate", "peak learning rate (AdamW, one-cycle)")):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=help_text)
    parser.add_argument("--examples-dir", type=Path, default=Path("examples"),
                        help="where sample scenes go; '' to write none")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(DetectorConfig)
                 if hasattr(args, f.name)}
    examples = args.examples_dir if str(args.examples_dir) not in ("", ".") else None
    return replace(defaults, **overrides), args.name, examples


def input_spec(trained: TrainedDetector) -> InputSpec:
    spec = trained.input
    return InputSpec(height=spec.size, width=spec.size, channels=3 if spec.channels == 3 else 1,
                     color_mode="RGB" if spec.channels == 3 else "L", resize="bilinear",
                     polarity="natural", mean=spec.mean, std=spec.std, fit="letterbox",
                     fill=spec.fill)


def served_detect(trained: TrainedDetector) -> Callable[[Exported], DetectFunction]:
    """The stored graph's detect function: letterbox, ONNX Runtime, serving's post-processing."""

    def for_export(exported: Exported) -> DetectFunction:
        session = ort.InferenceSession(str(exported.graph), providers=["CPUExecutionProvider"])
        run = onnx_runner(session)
        return lambda images, threshold: detect(run, images, trained.input,
                                                Thresholds(confidence_threshold=threshold))

    return for_export


def training_frames(config: DetectorConfig, trained: TrainedDetector, count: int) -> np.ndarray:
    """Letterboxed training scenes: what the drift reference's features are computed on."""
    split = split_sources(config.seed, config.heldout_fraction)
    scenes = compose_scenes(count, config.seed + 1, TRAIN_STREAM, split.train_ids, config.rules)
    return np.stack([to_frame(scene.image, trained.input)[0] for scene in scenes])


def train_and_export_detector(config: DetectorConfig, name: str = DEFAULT_NAME,
                              examples_dir: Path | None = None) -> Stored:
    started = time.perf_counter()
    trained = train_detector(config)
    images = [scene.image for scene in trained.heldout]
    eager = eager_runner(trained.wrapper)
    coco = coco_map(trained.heldout, detect(eager, images, trained.input), trained.labels)
    parity_images = images[:PARITY_SCENES]
    reference = detect(eager, parity_images, trained.input,
                       Thresholds(confidence_threshold=PARITY_THRESHOLD))
    spec = input_spec(trained)
    example = torch.from_numpy(np.stack([to_frame(im, trained.input)[0] for im in images[:2]]))
    graph = torch_graph(trained.wrapper, example, OUTPUT_NAMES)
    card = ModelCard(
        name=name, task="detection", architecture="digit_detector (anchor-free, stride 4)",
        labels=trained.labels, input=spec,
        graph=GraphSpec(feature_dim=int(trained.wrapper.detector.feature_dim)),
        detection=DetectionSpec(multi_label=True, nms=True),
        accuracy={"map_50": coco["map_50"], "map_50_95": coco["map_50_95"]},
        class_ap={label: ClassAP(**ap) for label, ap in coco["per_class"].items()},
        training=DetectorTraining(
            seed=config.seed, input_size=config.input_size, train_scenes=config.train_scenes,
            epochs=config.epochs, batch_size=config.batch_size,
            learning_rate=config.learning_rate, heldout_fraction=config.heldout_fraction,
            heldout_scenes=config.heldout_scenes, train_seconds=round(trained.train_seconds, 1),
            settings=json.loads(json.dumps(config.to_record(), default=str))),
        lineage=Lineage(dataset=DATASET, train_samples=config.train_scenes,
                        holdout_samples=len(trained.heldout),
                        parity_data=f"{len(parity_images)} held-out scenes",
                        versions=library_versions()),
    )
    parity = DetectionParityCheck(parity_images, reference, served_detect(trained),
                                  PARITY_THRESHOLD, "torch eager, same post-processing")
    reference_sample = ReferenceSample(training_frames(config, trained, 1000), config.seed,
                                       "features", source="training scenes")
    stored = export_and_store(graph, card, parity,
                              {"task": "object-detection", "architecture": "digit_detector",
                               "dataset": "digit-scenes"}, reference=reference_sample)
    if examples_dir is not None:
        write_example_scenes(trained, Path(examples_dir))
    checked = stored.card.parity
    assert isinstance(checked, DetectionParity)  # export_and_store ran the check above
    print(f"held-out mAP@0.5: {coco['map_50']:.4f}, mAP@[.5:.95]: {coco['map_50_95']:.4f} "
          f"({coco['images']} scenes, {coco['digits']} digits) | parity max box diff "
          f"{checked.max_box_diff_px:.2e} px, score {checked.max_score_diff:.2e} | trained in "
          f"{trained.train_seconds:.0f}s | saved {stored.tag} in "
          f"{time.perf_counter() - started:.1f}s")
    return stored


def write_example_scenes(trained: TrainedDetector, directory: Path, count: int = 4) -> list[Path]:
    """A few held-out scenes for users to try (`scene_<n>.png|jpg`), several digits each."""
    directory.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in trained.heldout if len(s.boxes) >= 3][:count]
    written = []
    for i, scene in enumerate(chosen):
        path = directory / f"scene_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(scene.image).save(path, quality=95)
        written.append(path)
    return written
