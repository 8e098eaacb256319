"""Reference features for drift detection: the exported graph's own `features` output on a sample
of the training images, computed by ONNX Runtime so that they are exactly what serving computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.contract import REFERENCE_FILE, DriftReference

from .export import FEATURES_NAME, run_graph

# Enough for a stable median bandwidth and a sensitive test; serving subsamples it
# (drift.reference_size) to bound the cost of each test.
REFERENCE_SAMPLES = 1000


def write_reference(graph: Path, train_pixels: np.ndarray, directory: Path, seed: int,
                    source: str) -> tuple[Path, DriftReference]:
    rng = np.random.default_rng(seed)
    sample = train_pixels[rng.permutation(len(train_pixels))[:REFERENCE_SAMPLES]]
    features = run_graph(graph, FEATURES_NAME, sample).astype(np.float32)
    path = Path(directory) / REFERENCE_FILE
    np.save(path, features)
    return path, DriftReference(samples=len(features), source=f"{source}, {len(features)} images "
                                f"drawn with seed {seed}")
