"""Bring your own detector: `python -m train_export import-pickle --task detection` (a model
saved with `torch.save(model)`, or a Hugging Face `save_pretrained` folder) and
`import-torchvision --task detection` (a torchvision detection architecture and a state_dict).

load -> the serving wrapper (wrappers.py: DETR-style or torchvision-style answers to the card's
boxes/scores/features) -> the model's own detections on the parity images, with its own
post-processing -> ONNX (a dynamic batch axis for DETR-style models; batch 1 for
torchvision-style ones, whose detectors loop over images in Python) -> parity of the served path
against those detections (parity.DetectionParityCheck) -> the store entry
(store.export_and_store): graph, card, drift reference where `--data` gives images.

The served path in the parity check is serving's own: its decode (serving/detection.py), its
runtime (serving/runtime.py, which runs a batch-1 graph a row at a time) and its
post-processing, as the card tells it (serving/boxes.py).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn

from serving.boxes import Letterbox, letterbox, to_image_pixels
from serving.contract import (
    REFERENCE_FILE,
    DetectionParity,
    DetectionSpec,
    DriftReference,
    GraphSpec,
    InputSpec,
    Lineage,
    ModelCard,
    sha256_of,
)
from serving.detection import Detection
from serving.errors import RejectedInput
from serving.runtime import OnnxRuntime
from serving.settings import DetectionSettings

from ..export import torch_graph
from ..graph import INPUT_NAME
from ..reference import REFERENCE_SAMPLES
from ..store import Exported, export_and_store, library_versions
from .evaluate import Detections
from .parity import DetectFunction, DetectionParityCheck
from .scenes import heldout_scenes
from .wrappers import (
    OUTPUT_NAMES,
    CalledModel,
    DetrStyle,
    OutputFormat,
    TorchvisionStyle,
    answer_format,
    detections_per_image,
    detr_outputs,
    takes_pixel_values,
)

# Parity images: composed digit scenes (train_export/detection/scenes.py), 64-512 pixels a side,
# aspect ratios from 1:2 to 2:1, so that every letterbox geometry is met. An imported model comes
# without its data; any images serve to compare two computations of the same model.
PARITY_IMAGES = 32
# Without --parity-threshold, parity is checked at the threshold that keeps about this many of
# the model's own detections per parity image: a randomly initialised model scores every class
# about equally, and a fixed threshold could leave nothing to compare.
PARITY_DETECTIONS_PER_IMAGE = 10
# Serving's cap on max_detections (serving/settings.py): parity compares up to this many.
MAX_DETECTIONS = 1000
# A torchvision-style model that does not say how many detections it keeps.
DEFAULT_DETECTIONS = 100
# The opset of the TorchScript-based exporter used for torchvision-style models.
FIXED_BATCH_OPSET = 17
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Source:
    """A loaded detector and what is known about it before it is wrapped."""

    model: CalledModel
    answers: OutputFormat
    architecture: str
    lineage: Lineage
    store_source: str  # the store entry's `source` label
    known: dict[str, Any]  # input-spec values the model itself fixes (torchvision's transform)
    # torchvision's architectures normalize inside (their transform, with the spec's mean/std)
    normalizes_inside: bool = False
    backbone: nn.Module | None = None
    detections: int | None = None  # torchvision-style: detections kept per image
    versions: dict[str, str] | None = None  # libraries beyond store.library_versions


def import_detector(args: argparse.Namespace) -> str:
    """The whole import, from the parsed command line (train_export/imports.py); prints a JSON
    summary and returns the new tag."""
    from ..imports import input_spec

    started = time.perf_counter()
    labels = read_labels(args.labels)
    if args.command == "import-torchvision":
        labels = without_background(labels)
        source = load_torchvision_source(args, len(labels))
        spec = letterbox_spec(input_spec(args, source.known), args.fill)
    else:
        spec = letterbox_spec(input_spec(args), args.fill)
        source = load_pickle_source(args, spec)
        if source.answers == "torchvision":
            labels = without_background(labels)
    wrapper = serving_wrapper(source, spec, labels)
    images = [scene.image for scene in heldout_scenes(PARITY_IMAGES)]
    frames, geometries = zip(*(frame_of(image, spec) for image in images))
    own = OwnDetections.compute(source, wrapper, np.stack(frames), list(geometries))
    threshold = (args.parity_threshold if args.parity_threshold is not None
                 else own.threshold_keeping(PARITY_DETECTIONS_PER_IMAGE))
    reference = own.at(threshold)
    if not any(len(d.scores) for d in reference):
        raise SystemExit(f"the model detects nothing above {threshold} on the {len(images)} "
                         "parity images: parity would compare nothing; give a lower "
                         "--parity-threshold")
    # torchvision-style models loop over a batch's images in Python: their graph takes one.
    batch_size = 1 if source.answers == "torchvision" else None
    example = torch.from_numpy(np.stack(frames[:1 if batch_size else 2]))
    graph = (fixed_batch_graph(wrapper, example) if batch_size
             else torch_graph(wrapper, example, OUTPUT_NAMES))
    with torch.no_grad():
        feature_dim = int(wrapper(example)[2].shape[1])
    card = ModelCard(
        name=args.name, task="detection", architecture=source.architecture, labels=labels,
        input=spec,
        graph=GraphSpec(feature_dim=feature_dim, batch_size=batch_size,
                        opset=FIXED_BATCH_OPSET if batch_size else None),
        # DETR's rule, and what torchvision's own post-processing left: every row is one
        # detection of one class, already suppressed.
        detection=DetectionSpec(multi_label=False, nms=False),
        lineage=source.lineage.model_copy(update={
            "parity_data": f"{len(images)} digit scenes composed by "
                           "train_export/detection/scenes.py",
            "data_dir": str(args.data.resolve()) if args.data else None,
            "versions": {**library_versions(), **(source.versions or {})}}),
    )
    parity = DetectionParityCheck(
        images, reference, served_detections(card), threshold,
        f"the source model in torch with its own post-processing ({own.post_processing})",
        score_tolerance=args.parity_tolerance)
    stored = export_and_store(
        graph, card, parity,
        {"task": "object-detection", "source": source.store_source, "outputs": source.answers},
        reference=FolderReference(args.data, card) if args.data else None)
    checked = stored.card.parity
    assert isinstance(checked, DetectionParity)  # export_and_store ran the check
    print(json.dumps({"tag": stored.tag, "outputs": source.answers, "batch_size": batch_size,
                      "parity": checked.model_dump(),
                      "drift_reference": stored.card.drift_reference is not None,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return stored.tag


def read_labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def without_background(labels: list[str]) -> list[str]:
    """torchvision's labels count from 1, 0 being the background; its own category lists name
    it first (`__background__`), and such a list is taken as it is."""
    return labels[1:] if labels[:1] == ["__background__"] else labels


# --- loading -------------------------------------------------------------------------------------

def load_pickle_source(args: argparse.Namespace, spec: InputSpec) -> Source:
    """A torch.save(model) file (its package on the path while loading: --code-path), or a
    Hugging Face save_pretrained folder."""
    from ..imports import load_pickled

    versions = None
    if args.model.is_dir():
        model = load_hugging_face(args.model)
        lineage = Lineage(source="Hugging Face save_pretrained", file=args.model.name,
                          file_sha256=folder_sha256(args.model))
        store_source = "hugging-face"
    else:
        model = load_pickled(args.model, args.code_path)
        lineage = Lineage(source="torch.save(model)", file=args.model.name,
                          file_sha256=sha256_of(args.model))
        store_source = "pickle"
    if type(model).__module__.startswith("transformers."):
        import transformers

        versions = {"transformers": transformers.__version__}
    called = CalledModel(model, keyword=takes_pixel_values(model))
    answers = check_answers(called, args.outputs, spec)
    return Source(called, answers, f"{type(model).__module__}.{type(model).__qualname__}",
                  lineage, store_source, known={}, backbone=backbone_of(model),
                  detections=detections_per_image(model), versions=versions)


def load_hugging_face(folder: Path) -> nn.Module:
    """A `save_pretrained` folder (config.json and the weights), read locally, never fetched."""
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} is a folder without config.json: --model takes a "
                         "torch.save(model) file or a Hugging Face save_pretrained folder")
    from transformers import AutoModelForObjectDetection

    model: nn.Module = AutoModelForObjectDetection.from_pretrained(folder, local_files_only=True)
    return model.eval()


def folder_sha256(folder: Path) -> str:
    """One SHA-256 over a folder's files, by relative path and content."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256_of(path).encode())
    return digest.hexdigest()


def check_answers(called: CalledModel, outputs: str, spec: InputSpec) -> OutputFormat:
    """The model's answer format on a test batch: DETR-style or torchvision-style, as detected
    or as --outputs says; anything else is refused with what is understood."""
    with torch.no_grad():
        answer = called(torch.zeros(2, 3, spec.height, spec.width))
    found = answer_format(answer)
    wanted = None if outputs == "auto" else outputs
    if found is None or (wanted is not None and found != wanted):
        raise SystemExit(
            f"the model answered {describe(answer)}; a detector must answer DETR-style (logits "
            "(N, Q, classes + 1) with a last 'no object' class, and pred_boxes (N, Q, 4) as "
            "normalized cx, cy, w, h; in a dict or as attributes) or torchvision-style (a list "
            "of dicts with boxes in input pixels, scores and labels)"
            + (f", as --outputs {wanted} says" if wanted else ""))
    return found


def describe(answer: Any) -> str:
    if isinstance(answer, torch.Tensor):
        return f"a tensor {tuple(answer.shape)}"
    if isinstance(answer, dict):
        return f"a dict with {sorted(answer)}"
    if isinstance(answer, list | tuple):
        items = f" {type(answer[0]).__name__}" if answer else ""
        return f"a {type(answer).__name__} of {len(answer)}{items}"
    return f"a {type(answer).__name__}"


def backbone_of(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else None


def load_torchvision_source(args: argparse.Namespace, classes: int) -> Source:
    """A torchvision detection architecture (weights=None, weights_backbone=None: nothing is
    downloaded) with the checkpoint's weights; its classes are the labels plus the background."""
    import torchvision
    from torchvision.models import detection

    from ..imports import read_state_dict

    known = set(torchvision.models.list_models(module=detection))
    if args.architecture not in known:
        raise SystemExit(f"{args.architecture} is not a torchvision detection architecture; "
                         f"these are: {', '.join(sorted(known))}")
    extra = {}
    if args.mean is not None:
        extra["image_mean"] = args.mean
    if args.std is not None:
        extra["image_std"] = args.std
    model = torchvision.models.get_model(args.architecture, weights=None, weights_backbone=None,
                                         num_classes=classes + 1, **extra)
    try:
        model.load_state_dict(read_state_dict(args.checkpoint))
    except RuntimeError as exc:
        raise SystemExit(f"{args.checkpoint} does not fit {args.architecture} with {classes} "
                         f"classes (one per line of --labels, the background not counted):\n"
                         f"{exc}") from None
    model.eval()
    transform = model.transform
    # The model resizes and normalizes inside (its transform, kept in the graph): the frame it
    # is given is the letterboxed upload, and at the size it resizes to, that resize does nothing.
    size = transform.fixed_size or (transform.min_size[-1], transform.min_size[-1])
    known_spec = {"input_size": list(size), "mean": list(transform.image_mean),
                  "std": list(transform.image_std)}
    return Source(CalledModel(model, keyword=False, as_list=True), "torchvision",
                  args.architecture,
                  Lineage(source="torchvision state_dict", file=args.checkpoint.name,
                          file_sha256=sha256_of(args.checkpoint)),
                  "torchvision", known_spec, normalizes_inside=True, backbone=model.backbone,
                  detections=detections_per_image(model))


# --- the serving wrapper and its input -----------------------------------------------------------

def letterbox_spec(spec: InputSpec, fill: Sequence[int] | None) -> InputSpec:
    """A classifier's input spec, letterboxed: padded with `fill`, by default the mean colour,
    which normalizes to 0, what DETR's and torchvision's own batching pad with."""
    if spec.channels != 3:
        raise SystemExit("--task detection takes RGB models (--color-mode RGB): the forward takes "
                         "(N, 3, H, W)")
    fill = tuple(fill) if fill is not None else tuple(round(255 * m) for m in spec.mean)
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise SystemExit("--fill takes 3 values from 0 to 255 (R G B)")
    return spec.model_copy(update={"fit": "letterbox", "fill": fill})


def serving_wrapper(source: Source, spec: InputSpec, labels: list[str]
                    ) -> DetrStyle | TorchvisionStyle:
    """The model between uint8 frames and the card's outputs, checked against the labels."""
    if source.answers == "detr":
        wrapper = DetrStyle(source.model, spec.height, spec.width, spec.mean, spec.std)
        with torch.no_grad():
            logits = detr_outputs(source.model(torch.zeros(1, 3, spec.height, spec.width)))
        assert logits is not None  # check_answers saw a DETR-style answer
        classes = logits[0].shape[-1] - 1
        if classes != len(labels):
            raise SystemExit(f"the model scores {classes} classes (and 'no object') and "
                             f"--labels has {len(labels)}: one label per class, in the "
                             "model's order, 'no object' not listed")
        return wrapper.eval()
    mean, std = spec.mean, spec.std
    if source.normalizes_inside:  # the graph gives the model x / 255
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return TorchvisionStyle(source.model, mean, std, len(labels),
                            source.detections or DEFAULT_DETECTIONS, source.backbone).eval()


def frame_of(image: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Letterbox]:
    """An RGB image -> its letterboxed frame, as serving's decode makes it."""
    assert spec.fill is not None  # letterbox_spec set it
    return letterbox(Image.fromarray(image), spec.height, spec.width, spec.fill)


def fixed_batch_graph(wrapper: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """A torchvision-style wrapper as ONNX, for the batch size of `example` (1).

    torch.export (export.torch_graph) cannot export torchvision's detectors: their NMS guards
    on how many boxes there are (`boxes.numel() == 0`), a value only known at run time. The
    TorchScript-based exporter traces one path through the model instead, the way torchvision
    tests its own ONNX export, and that path loops over the batch's images: the graph takes
    exactly as many as it was traced with.
    """
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(wrapper, (example,), path, dynamo=False,
                          opset_version=FIXED_BATCH_OPSET, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES))
        return onnx.load(str(path))


# --- the model's own detections ------------------------------------------------------------------

@dataclass
class OwnDetections:
    """The source model's answers on the parity frames, and its own post-processing of them at
    any threshold, mapped to each image's pixels."""

    answers: list[Any]  # per image: DETR (logits, pred_boxes), or torchvision's dict
    geometries: list[Letterbox]
    frame_size: tuple[int, int]  # height, width
    post_processing: str
    post_process: Callable[[OwnDetections, float], list[Detections]]

    @classmethod
    def compute(cls, source: Source, wrapper: DetrStyle | TorchvisionStyle, frames: np.ndarray,
                geometries: list[Letterbox]) -> OwnDetections:
        """Runs the source model, one image at a time, on what the graph gives it: the same
        float input (the wrapper's own normalization)."""
        pixels = wrapper.pixels
        answers = []
        with torch.no_grad():
            for frame in frames:
                answer = source.model(pixels(torch.from_numpy(frame[None])))
                if source.answers == "detr":
                    outputs = detr_outputs(answer)
                    assert outputs is not None
                    answers.append(outputs)
                else:
                    answers.append(answer[0])
        size = (frames.shape[1], frames.shape[2])
        if source.answers == "detr":
            return cls(answers, geometries, size, "transformers' DetrImageProcessor."
                       "post_process_object_detection", detr_post_processing)
        return cls(answers, geometries, size, "its own answer, post-processed inside its "
                   "forward, above the threshold", torchvision_post_processing)

    def at(self, threshold: float) -> list[Detections]:
        return self.post_process(self, threshold)

    def threshold_keeping(self, per_image: int) -> float:
        """A threshold (4 decimals) that keeps about `per_image` detections per image."""
        scores = np.sort(np.concatenate([d.scores for d in self.at(0.0)]))[::-1]
        wanted = per_image * len(self.answers)
        if len(scores) <= wanted:
            return 0.0
        return math.floor(float(scores[wanted]) * 1e4) / 1e4


def detr_post_processing(own: OwnDetections, threshold: float) -> list[Detections]:
    """DETR's post-processing, as Hugging Face ships it: softmax, the best class but 'no
    object' per query, boxes scaled to the frame, scores above the threshold."""
    from transformers import DetrImageProcessor

    processor = DetrImageProcessor()  # built from its defaults: nothing is fetched
    results = []
    for (logits, boxes), geometry in zip(own.answers, own.geometries):
        found = processor.post_process_object_detection(
            SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=threshold,
            target_sizes=[own.frame_size])[0]
        results.append(in_image_pixels(found["boxes"], found["scores"], found["labels"],
                                       geometry))
    return results


def torchvision_post_processing(own: OwnDetections, threshold: float) -> list[Detections]:
    """torchvision's detectors post-process in their forward: their answer, above the
    threshold, label l as class l - 1 (0 is the background)."""
    results = []
    for answer, geometry in zip(own.answers, own.geometries):
        keep = answer["scores"] > threshold
        results.append(in_image_pixels(answer["boxes"][keep], answer["scores"][keep],
                                       answer["labels"][keep] - 1, geometry))
    return results


def in_image_pixels(boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor,
                    geometry: Letterbox) -> Detections:
    return Detections(to_image_pixels(boxes.numpy(), geometry),
                      scores.numpy().astype(np.float32), class_ids.numpy().astype(np.int64))


# --- the served path -----------------------------------------------------------------------------

def served_detections(card: ModelCard) -> Callable[[Exported], DetectFunction]:
    """The stored graph served: serving's decode, runtime and post-processing, as the card
    says, and the answers' boxes (rounded as served) back as Detections."""

    spec = card.detection
    assert spec is not None  # a detector's card

    def for_export(exported: Exported) -> DetectFunction:
        runtime = OnnxRuntime(exported.graph, card.input, card.graph, providers=["cpu"],
                              output_names=Detection.output_names(card.graph))

        def detect(images: Sequence[np.ndarray], threshold: float) -> list[Detections]:
            task = Detection(card.labels, spec, DetectionSettings(
                confidence_threshold=threshold, max_detections=MAX_DETECTIONS))
            results = []
            for start in range(0, len(images), 16):
                batch = images[start:start + 16]
                frames, contexts = zip(*(task.decode(Image.fromarray(image), card.input, None)
                                         for image in batch))
                answers = task.postprocess(runtime.outputs(np.stack(frames)), card.graph,
                                           contexts, [card.name] * len(batch), [0.0] * len(batch))
                results += [Detections(
                    np.array([d.box for d in a.detections], dtype=np.float32).reshape(-1, 4),
                    np.array([d.score for d in a.detections], dtype=np.float32),
                    np.array([d.class_id for d in a.detections], dtype=np.int64))
                    for a in answers]
            return results

        return detect

    return for_export


# --- drift reference -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FolderReference:
    """A store.ReferenceWriter: the served graph's features of the images in a folder (any
    depth; up to REFERENCE_SAMPLES, drawn with seed 0), decoded as serving decodes uploads."""

    folder: Path
    card: ModelCard

    def __call__(self, graph: Path, directory: Path) -> tuple[Path, DriftReference]:
        files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
        assert self.card.detection is not None
        task = Detection(self.card.labels, self.card.detection, DetectionSettings())
        frames: list[np.ndarray] = []
        for path in files:
            if len(frames) == REFERENCE_SAMPLES:
                break
            try:
                frames.append(task.decode(path.read_bytes(), self.card.input, None)[0])
            except RejectedInput:  # not an image after all: left out
                continue
        if not frames:
            raise SystemExit(f"--data {self.folder}: no image could be read there")
        runtime = OnnxRuntime(graph, self.card.input, self.card.graph, providers=["cpu"],
                              output_names=[self.card.graph.features_name])
        pixels = np.stack(frames)
        features = np.concatenate([runtime.run(pixels[i:i + 64])[0]
                                   for i in range(0, len(pixels), 64)]).astype(np.float32)
        path = Path(directory) / REFERENCE_FILE
        np.save(path, features)
        return path, DriftReference(samples=len(features),
                                    source=f"{len(features)} images from {self.folder}")
