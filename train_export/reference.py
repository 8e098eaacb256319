"""Reference features for drift detection: the exported graph's own features output on a sample
of the training images, computed by ONNX Runtime so that they are exactly what serving computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import REFERENCE_FILE, DriftReference

from .graph import run_graph

# Enough for a stable median bandwidth and a sensitive test; serving subsamples it
# (drift.reference_size) to bound the cost of each test.
REFERENCE_SAMPLES = 1000


@dataclass(frozen=True)
class ReferenceSample:
    """Training images whose features become a graph's drift reference (a store.ReferenceWriter):
    up to REFERENCE_SAMPLES of `pixels`, drawn with `seed`, through the graph output `output`."""

    pixels: np.ndarray  # uint8 (N, H, W, C)
    seed: int
    output: str  # the graph's features output (classification.FEATURES_NAME for a classifier)
    source: str = "training split"

    def __call__(self, graph: Path, directory: Path) -> tuple[Path, DriftReference]:
        rng = np.random.default_rng(self.seed)
        sample = self.pixels[rng.permutation(len(self.pixels))[:REFERENCE_SAMPLES]]
        features = run_graph(graph, self.output, sample).astype(np.float32)
        path = Path(directory) / REFERENCE_FILE
        np.save(path, features)
        return path, DriftReference(samples=len(features), source=f"{self.source}, "
                                    f"{len(features)} images drawn with seed {self.seed}")
