"""The one way into the BentoML model store, for our training, every import path and every
precision variant: the serving graph saved where ONNX Runtime loads it and checked in full
(graph.save_onnx), its parity with the model it was made from measured, its drift reference
computed, and its card written beside the files. Every save is a new version; `name:latest`
points to it.

Nothing here knows a task's output names or how its parity is measured: a path passes its graph,
its card and a parity check (train_export/classification.py has the classifier's).
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import bentoml
import onnx

from serving.contract import (
    ONNX_FILE,
    DetectionParity,
    DriftReference,
    ModelCard,
    Parity,
    sha256_of,
)

from .graph import save_onnx


class ParityError(ValueError):
    """The exported files do not compute what the model they were made from computes."""


@dataclass(frozen=True)
class Exported:
    """An export's files in its working folder, before they are stored: the ONNX graph first."""

    files: tuple[Path, ...]

    @property
    def graph(self) -> Path:
        return self.files[0]

    @property
    def directory(self) -> Path:
        return self.graph.parent

    def file(self, name: str) -> Path | None:
        """The file called `name` (e.g. the TorchScript copy), if this export wrote one."""
        return next((f for f in self.files if f.name == name), None)


class ParityCheck(Protocol):
    """Measures how closely the exported files compute what the source model computes, on inputs
    of the path's choosing, and raises ParityError beyond its tolerance. A classifier compares
    probabilities (classification.ProbabilityParity); a detector compares its detections after
    post-processing."""

    def __call__(self, exported: Exported) -> Parity | DetectionParity: ...


class ReferenceWriter(Protocol):
    """Writes the drift reference of `graph` (its features on training images) into `directory`
    (reference.ReferenceSample)."""

    def __call__(self, graph: Path, directory: Path) -> tuple[Path, DriftReference]: ...


@dataclass(frozen=True)
class Stored:
    tag: str
    card: ModelCard  # as stored: parity, drift reference and file hashes filled in


def export_and_store(
    graph: onnx.ModelProto,
    card: ModelCard,
    parity: ParityCheck,
    store_labels: dict[str, str],
    *,
    other_files: Callable[[Path], list[Path]] | None = None,
    reference: ReferenceWriter | None = None,
) -> Stored:
    """Save, check, measure and store a serving graph as a new version of `card.name`.

    Args:
        graph: the serving graph (uint8 pixels in, the task's outputs), from torch
            (export.torch_graph) or built with onnx; its IR version is lowered where ORT needs it.
        card: everything the path knows about the model; `parity`, `drift_reference` and
            `files` are filled in here.
        parity: measures the written files against the source model; raises ParityError beyond
            its tolerance. Its figures go into the card.
        store_labels: the entry's BentoML labels (task, source, ...).
        other_files: writes files for other runtimes (TorchScript) into the folder it is given
            and returns them; they are passed to `parity` with the graph.
        reference: writes the drift reference; None where the path has no training images.

    Returns:
        The new entry's tag and its card.
    """
    with tempfile.TemporaryDirectory() as tmp:
        files = save_onnx(graph, Path(tmp) / ONNX_FILE)
        if other_files is not None:
            files += other_files(Path(tmp))
        exported = Exported(tuple(files))
        card = card.model_copy(update={"parity": parity(exported)})
        return save_to_store(card, exported, store_labels, reference)


def save_to_store(card: ModelCard, exported: Exported, store_labels: dict[str, str],
                  reference: ReferenceWriter | None = None) -> Stored:
    """Copy the exported files, and the drift reference written beside them, into a new store
    entry with `card` (file hashes and drift reference filled in)."""
    files = list(exported.files)
    if reference is not None:
        reference_file, drift_reference = reference(exported.graph, exported.directory)
        files.append(reference_file)
        card = card.model_copy(update={"drift_reference": drift_reference})
    card = card.model_copy(update={"files": {f.name: sha256_of(f) for f in files}})
    with bentoml.models.create(
        card.name,
        labels=store_labels,
        metadata=store_metadata(card),
        module="image_classifier.onnx",
    ) as entry:
        for file in files:
            shutil.copy2(file, Path(entry.path) / file.name)
        card.write(Path(entry.path))
    return Stored(str(entry.tag), card)


def store_metadata(card: ModelCard) -> dict[str, Any]:
    """The card's headline figures, for `bentoml models get` and the store's listings."""
    metadata = {
        "architecture": card.architecture,
        "input_shape": list(card.input.shape),
        "num_classes": len(card.labels),
        **{f"accuracy_{k}": v for k, v in card.accuracy.items()},
    }
    if card.parity is not None:  # an ONNX import has no TorchScript: that figure is left out
        figures = card.parity.model_dump(exclude={"samples", "tolerance"}, exclude_none=True)
        metadata.update({f"parity_{name}": value for name, value in figures.items()})
    if card.lineage.data_sha256 is not None:
        metadata["data_sha256"] = card.lineage.data_sha256
    return metadata


def library_versions() -> dict[str, str]:
    import numpy
    import onnxruntime
    import sklearn
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "bentoml": bentoml.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }
