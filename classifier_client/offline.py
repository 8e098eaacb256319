"""`offline`: the stored model over a folder in this process, no server: bulk jobs on a machine
with the model store. The card's `task` says which: a classifier's rows or a detector's COCO
results, with serving's own decode, runtime and post-processing, so the output is `folder`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # noqa: F401  (see below)
from tqdm import tqdm

from serving import settings
from serving.classification import to_predictions
from serving.contract import ONNX_FILE, ModelCard
from serving.detection import Detection, ImageContext
from serving.errors import RejectedInput
from serving.preprocess import decode_image
from serving.runtime import OnnxRuntime
from serving.settings import DetectionSettings

from .coco import Answered, check_out, image_ids, write_coco
from .detector import DetectOptions
from .files import Failures, Output, images_in, row

# onnxruntime is imported above, not when a session is built (serving/runtime.py waits for one):
# without the `offline` extra, importing this module fails and __main__ says what to install.

BATCH = 64
PROVIDERS = ("cuda", "cpu")


def run_folder_offline(tag: str, folder: Path, out: Path, *,
                       options: DetectOptions = DetectOptions(), max_pixels: int = 40_000_000,
                       providers: tuple[str, ...] = PROVIDERS) -> tuple[int, int]:
    """The model `tag` from the store over `folder`; (answered, failed)."""
    import bentoml

    stored = bentoml.models.get(tag)
    card = ModelCard.read(Path(stored.path))
    card.verify(Path(stored.path), str(stored.tag))
    if card.task == "detection":
        return detect_folder_offline(stored, card, folder, out, options, max_pixels, providers)
    if options.form():
        raise SystemExit(f"{stored.tag} is a classifier: the threshold options are for detectors")
    return classify_folder_offline(stored, card, folder, out, max_pixels, providers)


def classify_folder_offline(stored: Any, card: ModelCard, folder: Path, out: Path,
                            max_pixels: int, providers: tuple[str, ...]) -> tuple[int, int]:
    # One process that has the machine to itself: every core, spinning (session_options).
    runtime = OnnxRuntime(Path(stored.path_of(ONNX_FILE)), card.input, card.graph,
                          providers=list(providers), intra_op_threads=0, spin=True)
    answered = 0
    with Output(out) as output:
        todo = [p for p in images_in(folder) if str(p) not in output.done]
        for start in tqdm(range(0, len(todo), BATCH), unit="batch"):
            decoded: list[tuple[Path, np.ndarray]] = []
            for path in todo[start:start + BATCH]:
                try:
                    decoded.append((path, decode_image(path, card.input, max_pixels)))
                except RejectedInput as exc:
                    output.fail(path, f"{exc.code}: {exc}")
            if not decoded:
                continue
            probabilities, _ = runtime.run(np.stack([pixels for _, pixels in decoded]))
            answers = to_predictions(probabilities, card.labels, 1,
                                     [str(stored.tag)] * len(decoded), [0.0] * len(decoded))
            for (path, _), answer in zip(decoded, answers):
                output.write(row(path, answer.model_dump()))
                answered += 1
    return answered, output.failures


def detect_folder_offline(stored: Any, card: ModelCard, folder: Path, out: Path,
                          options: DetectOptions, max_pixels: int, providers: tuple[str, ...]
                          ) -> tuple[int, int]:
    """serving.detection's decode (letterbox), the graph's boxes and scores, its thresholds,
    per-class NMS and top-k: the answers ObjectDetector gives, as COCO results."""
    check_out(out)
    assert card.detection is not None  # a detector's card has it (ModelCard checks)
    task = Detection(card.labels, card.detection, configured_defaults())
    try:
        thresholds = task.options(options.form())
    except RejectedInput as exc:
        raise SystemExit(str(exc)) from None
    runtime = OnnxRuntime(Path(stored.path_of(ONNX_FILE)), card.input, card.graph,
                          providers=list(providers), intra_op_threads=0, spin=True,
                          output_names=task.output_names(card.graph))
    paths = images_in(folder)
    ids = image_ids(paths, folder)
    answered: list[Answered] = []
    with Failures(out) as failures:
        for start in tqdm(range(0, len(paths), BATCH), unit="batch"):
            decoded: list[tuple[Path, np.ndarray, ImageContext]] = []
            for path in paths[start:start + BATCH]:
                try:
                    decoded.append((path, *task.decode(path.read_bytes(), card.input,
                                                       max_pixels, thresholds)))
                except RejectedInput as exc:
                    failures.fail(path, f"{exc.code}: {exc}")
                except OSError as exc:
                    failures.fail(path, str(exc))
            if not decoded:
                continue
            outputs = runtime.outputs(np.stack([pixels for _, pixels, _ in decoded]))
            answers = task.postprocess(outputs, card.graph, [c for _, _, c in decoded],
                                       [str(stored.tag)] * len(decoded), [0.0] * len(decoded))
            answered += [Answered(*ids[path], answer.model_dump())
                         for (path, _, _), answer in zip(decoded, answers)]
    write_coco(out, answered, card.labels,
               {"model": str(stored.tag), "folder": str(folder),
                "thresholds": {"confidence_threshold": thresholds.confidence,
                               "iou_threshold": thresholds.iou,
                               "max_detections": thresholds.max_detections}})
    return len(answered), failures.count


def configured_defaults() -> DetectionSettings:
    """The thresholds a server started from this checkout uses when a request sends none: the
    `detection:` section of configuration.yaml (or $BENTOML_CONFIG); serving's built-in
    defaults when there is no such file."""
    if not settings.config_path().is_file():
        return DetectionSettings()
    detector, _ = settings.load(settings.DETECTOR, settings.DetectorSettings)
    detection: DetectionSettings = detector.detection
    return detection
