"""The model card: the one contract between `train_export` (writes it) and serving (reads it).

Everything serving needs to turn an upload into an answer lives in `card.json` inside the model's
store entry, beside the graph. Serving reads nothing else, so a model exported anywhere, by any of
the import paths, serves without its training code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CARD_FILE = "card.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
REFERENCE_FILE = "reference_features.npy"
CARD_FORMAT_VERSION = 1


class DamagedModel(RuntimeError):
    """A store entry whose files are missing or differ from what its card recorded."""


class InputSpec(BaseModel):
    """What the graph's `pixels` input expects. Normalization is baked into the graph."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    color_mode: Literal["L", "RGB"]
    resize: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    # light_on_dark: ink is bright on a dark background (the digits, MNIST); transparent pixels
    # are composited onto the background colour this implies.
    polarity: Literal["light_on_dark", "dark_on_light", "natural"] = "natural"
    # Recorded for reference only: the graph applies them itself.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # How an upload becomes the input: stretched to it (a classifier), or letterboxed (a
    # detector: resized keeping its aspect ratio, centered on a `fill`-coloured frame, so that
    # boxes map back to the upload exactly).
    fit: Literal["stretch", "letterbox"] = "stretch"
    fill: tuple[int, ...] | None = None  # per channel, 0-255; letterbox only

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


class GraphSpec(BaseModel):
    """The graph's input and output names. A classifier answers `probabilities` (N, K); a
    detector `boxes` (N, A, 4) and `scores` (N, A, K); both `features` (N, feature_dim). The
    batch axis is dynamic unless `batch_size` fixes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_name: str = "pixels"
    probabilities_name: str = "probabilities"
    boxes_name: str = "boxes"
    scores_name: str = "scores"
    features_name: str = "features"
    feature_dim: int = Field(gt=0)
    opset: int | None = None
    # The one batch size the graph takes, where it was exported for a fixed one (torchvision's
    # detectors: 1): serving/runtime.py runs a batch in pieces of that size. None (any batch) is
    # left out of card.json, so cards of dynamic-batch graphs read as before.
    batch_size: int | None = Field(default=None, gt=0, exclude_if=lambda value: value is None)


class Parity(BaseModel):
    """Max |p_eager - p_runtime| over held-out inputs; `tolerance` is what export enforced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int
    tolerance: float
    onnxruntime_max_abs_diff: float | None = None
    torchscript_max_abs_diff: float | None = None


class DetectionParity(BaseModel):
    """Detections of the served graph against the source model's own, both after
    post-processing at the same thresholds, on held-out images: the same detections (count and
    class), boxes within `box_tolerance_px` and scores within `score_tolerance`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int  # images compared
    detections: int  # detections the source model made on them
    confidence_threshold: float
    box_tolerance_px: float
    score_tolerance: float
    max_box_diff_px: float
    max_score_diff: float
    reference: str  # what the graph was compared with, e.g. "torch eager"


class DetectionSpec(BaseModel):
    """How a detector's dense outputs become detections (serving/detection.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box_format: Literal["xyxy"] = "xyxy"  # x1, y1, x2, y2 in the input frame's pixels
    # Every (location, class) above the threshold is a candidate (FCOS, CenterNet); or only each
    # location's best class (DETR's post-processing).
    multi_label: bool = True
    # Per-class NMS in serving; False where the model's own post-processing has none (DETR).
    nms: bool = True


class ClassAP(BaseModel):
    """A detector's COCO average precision for one class, on held-out images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ap_50: float
    ap_50_95: float


class DriftReference(BaseModel):
    """Features (the graph's `features` output) of a sample of the training images: what
    online drift detection compares recent inputs with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = REFERENCE_FILE
    samples: int = Field(gt=0)
    source: str


_T = TypeVar("_T")
# A field each path fills as far as it knows: left out of card.json and /model_info while unset,
# so that each path's record reads as it wrote it.
IfKnown = Annotated[_T | None, Field(exclude_if=lambda value: value is None)]


class PrecisionComparison(BaseModel):
    """A precision variant against the fp32 graph it came from, on the same held-out images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    holdout_images: int
    fp32_accuracy: float
    accuracy: float
    accuracy_delta: float
    top1_agreement: float  # share of images whose top class is the fp32 graph's
    max_abs_diff: float  # of the probabilities
    mean_abs_diff: float
    calibration_images: IfKnown[int] = None  # int8 only: images its activation ranges came from


class Lineage(BaseModel):
    """Where a stored model came from: its data, or the file it was imported from, and the
    libraries that made it. Shown by /model_info."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Our own training: the data it was trained and held out on.
    dataset: IfKnown[str] = None  # "sklearn.datasets.load_digits" or "image folder"
    data_dir: IfKnown[str] = None  # the image folder, resolved
    data_sha256: IfKnown[str] = None
    skipped_files: IfKnown[list[str]] = None  # folder files that are not images, relative to it
    train_samples: IfKnown[int] = None
    holdout_samples: IfKnown[int] = None
    # An import: the file it came from, and what its parity was measured on.
    source: IfKnown[str] = None  # "torch.save(model)", "torchvision state_dict" or "onnx"
    file: IfKnown[str] = None
    file_sha256: IfKnown[str] = None
    parity_data: IfKnown[str] = None
    # import-onnx: how the original graph was wired between our input and outputs.
    original_input: IfKnown[str] = None
    original_outputs: IfKnown[list[str]] = None
    scores_output: IfKnown[str] = None
    scores_were: IfKnown[Literal["logits", "probabilities"]] = None
    features_output: IfKnown[str] = None
    producer: IfKnown[str] = None
    # A precision variant (`python -m train_export quantize`) and the model it came from.
    precision: IfKnown[Literal["fp16", "int8"]] = None
    derived_from: IfKnown[str] = None
    vs_fp32: IfKnown[PrecisionComparison] = None
    # library -> version, of the process that exported the model
    versions: IfKnown[dict[str, str]] = None


class Training(BaseModel):
    """The settings our own training ran with (train_export.config.TrainConfig, as recorded) and
    its duration. Imported models have none: the card's `training` is then None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    architecture: str
    input_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    augment: bool
    seed: int  # with holdout_fraction: what the training/held-out split is rebuilt from
    data_dir: str | None
    color_mode: Literal["L", "RGB"] | None
    holdout_fraction: float
    parity_tolerance: float
    examples_dir: str | None
    examples_per_format: int
    train_seconds: float


class DetectorTraining(BaseModel):
    """The settings the default detector's training ran with (train_export.detection's
    DetectorConfig: the headline ones typed, every one in `settings`) and its duration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["detection"] = "detection"
    seed: int  # with heldout_fraction: which source digits were held out
    input_size: int
    train_scenes: int
    epochs: int
    batch_size: int
    learning_rate: float
    heldout_fraction: float
    heldout_scenes: int
    train_seconds: float
    settings: dict[str, Any]  # every DetectorConfig value, scene rules included


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: int = CARD_FORMAT_VERSION
    name: str
    task: Literal["classification", "detection"] = "classification"
    architecture: str
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    graph: GraphSpec
    detection: DetectionSpec | None = None  # a detector's post-processing
    parity: Parity | DetectionParity | None = None
    # A classifier: {"holdout": accuracy}; a detector: COCO {"map_50": ..., "map_50_95": ...}.
    accuracy: dict[str, float] = Field(default_factory=dict)
    # label -> accuracy on that class's held-out images (where labelled data exists)
    class_accuracy: dict[str, float] = Field(default_factory=dict)
    # label -> a detector's average precision on held-out images
    class_ap: dict[str, ClassAP] = Field(default_factory=dict)
    # Our training's settings: the classifier's (TrainConfig) or the detector's (DetectorConfig).
    training: Training | DetectorTraining | None = None
    drift_reference: DriftReference | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    # file name -> sha256 of every artifact in the entry (the card itself excluded)
    files: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fits_its_task(self) -> ModelCard:
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError("a classifier needs at least 2 labels")
        if self.task == "detection" and (self.detection is None or self.input.fit != "letterbox"):
            raise ValueError("a detector's card needs `detection` (its post-processing) and a "
                             "letterboxed input (input.fit: letterbox)")
        return self

    @field_validator("training", mode="before")
    @classmethod
    def _no_training_record(cls, value: object) -> object:
        """Cards written before `training` was typed hold {} for an imported model."""
        return value or None

    def write(self, directory: Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    def verify(self, directory: Path, tag: str) -> None:
        """Every file the card lists is present, and the graph serving loads matches its hash.

        Only the ONNX files and the drift reference are hashed: they are what serving reads, and
        hashing the TorchScript copy too would only slow every worker's start.
        """
        directory = Path(directory)
        fix = (f"Re-export the model (`python -m train_export`, or `bentoml models delete {tag}` "
               "and export it again), or point the service's model.tag at a healthy version.")
        for name, expected in self.files.items():
            path = directory / name
            if not path.is_file():
                raise DamagedModel(f"model {tag}: {path} is missing. {fix}")
            if (name.startswith(ONNX_FILE) or name == REFERENCE_FILE) and \
                    sha256_of(path) != expected:
                raise DamagedModel(
                    f"model {tag}: {path} does not match the SHA-256 in its card "
                    f"(expected {expected[:16]}...): the store entry is damaged. {fix}")

    @classmethod
    def read(cls, directory: Path) -> ModelCard:
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this store entry was not written by train_export. "
                "Re-export the model with `python -m train_export` (or `make train`)."
            )
        return cls.model_validate(json.loads(path.read_text()))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
