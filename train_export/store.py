"""Save an exported model into the BentoML model store: graph, TorchScript, card (labels, input
spec, parity, accuracy, lineage). Every save is a new version; `name:latest` points to it."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import bentoml

from serving.contract import ModelCard, sha256_of


def library_versions() -> dict[str, str]:
    import numpy
    import onnx
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


def save_to_store(card: ModelCard, artifacts: list[Path], store_labels: dict[str, str]) -> str:
    """Copy `artifacts` into a new store entry with `card` (file hashes filled in); return the tag."""
    files = {Path(a).name: sha256_of(Path(a)) for a in artifacts}
    card = card.model_copy(update={"files": files})
    metadata = {
        "architecture": card.architecture,
        "input_shape": list(card.input.shape),
        "num_classes": len(card.labels),
        **{f"accuracy_{k}": v for k, v in card.accuracy.items()},
    }
    if card.parity is not None:  # an ONNX import has no TorchScript: its figure is None
        for runtime in ("onnxruntime", "torchscript"):
            value = getattr(card.parity, f"{runtime}_max_abs_diff")
            if value is not None:
                metadata[f"parity_{runtime}_max_abs_diff"] = value
    if "data_sha256" in card.lineage:
        metadata["data_sha256"] = card.lineage["data_sha256"]
    with bentoml.models.create(
        card.name,
        labels=store_labels,
        metadata=metadata,
        module="image_classifier.onnx",
    ) as entry:
        target = Path(entry.path)
        for artifact in artifacts:
            shutil.copy2(artifact, target / Path(artifact).name)
        card.write(target)
    return str(entry.tag)
