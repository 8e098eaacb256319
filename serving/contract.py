"""The model card: the one contract between `train_export` (writes it) and serving (reads it).

Everything serving needs to turn an upload into an answer lives in `card.json` inside the model's
store entry, beside the graph. Serving reads nothing else, so a model exported anywhere, by any of
the import paths, serves without its training code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_name: str = "pixels"
    probabilities_name: str = "probabilities"
    features_name: str = "features"
    feature_dim: int = Field(gt=0)
    opset: int | None = None


class Parity(BaseModel):
    """Max |p_eager - p_runtime| over held-out inputs; `tolerance` is what export enforced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int
    tolerance: float
    onnxruntime_max_abs_diff: float | None = None
    torchscript_max_abs_diff: float | None = None


class DriftReference(BaseModel):
    """Features (the graph's `features` output) of a sample of the training images: what
    online drift detection compares recent inputs with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = REFERENCE_FILE
    samples: int = Field(gt=0)
    source: str


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: int = CARD_FORMAT_VERSION
    name: str
    architecture: str
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    graph: GraphSpec
    parity: Parity | None = None
    accuracy: dict[str, float] = Field(default_factory=dict)
    # label -> accuracy on that class's held-out images (where labelled data exists)
    class_accuracy: dict[str, float] = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    drift_reference: DriftReference | None = None
    lineage: dict = Field(default_factory=dict)
    # file name -> sha256 of every artifact in the entry (the card itself excluded)
    files: dict[str, str] = Field(default_factory=dict)

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
               "and export it again), or point image_classifier.model.tag at a healthy version.")
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
