"""A detector's parity: the served path's detections against the source model's own, after
post-processing, on the same images.

The served path is the exported graph on ONNX Runtime behind serving's letterbox and
post-processing (serving/boxes.py); the reference is whatever the source model answers with its
own post-processing (our eager wrapper through the same numpy post-processing, or, for an
imported model, its own, e.g. Hugging Face's). Detections are compared in the image's pixels:
paired by class and overlap, each pair's box corners within `box_tolerance_px` and scores within
`score_tolerance`, and none left over. A detection that scores within `score_tolerance` of the
threshold may fall on either side of it in the two runs: it is not required to pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.contract import DetectionParity

from ..store import Exported, ParityError
from .evaluate import Detections

# The detections of each image, by some path, at a confidence threshold.
DetectFunction = Callable[[Sequence[np.ndarray], float], list[Detections]]


@dataclass
class Comparison:
    detections: int = 0
    max_box_diff_px: float = 0.0
    max_score_diff: float = 0.0
    problems: list[str] = field(default_factory=list)


def compare_detections(served: Sequence[Detections], reference: Sequence[Detections],
                       threshold: float, box_tolerance_px: float, score_tolerance: float,
                       ) -> Comparison:
    result = Comparison()
    for index, (mine, theirs) in enumerate(zip(served, reference)):
        result.detections += len(theirs.scores)
        unpaired = set(range(len(mine.scores)))
        for j in np.argsort(-theirs.scores, kind="stable"):
            candidates = [i for i in unpaired if mine.class_ids[i] == theirs.class_ids[j]]
            if candidates:
                distance = [float(np.abs(mine.boxes[i] - theirs.boxes[j]).max())
                            for i in candidates]
                best = candidates[int(np.argmin(distance))]
                if min(distance) <= max(box_tolerance_px * 10, 1.0):  # the same object
                    unpaired.discard(best)
                    result.max_box_diff_px = max(result.max_box_diff_px, min(distance))
                    result.max_score_diff = max(result.max_score_diff,
                                                abs(float(mine.scores[best] - theirs.scores[j])))
                    continue
            if theirs.scores[j] > threshold + score_tolerance:
                result.problems.append(f"image {index}: the reference's class "
                                       f"{int(theirs.class_ids[j])} at {theirs.boxes[j].tolist()} "
                                       f"(score {theirs.scores[j]:.4f}) has no match")
        for i in unpaired:
            if mine.scores[i] > threshold + score_tolerance:
                result.problems.append(f"image {index}: an extra class {int(mine.class_ids[i])} "
                                       f"at {mine.boxes[i].tolist()} (score {mine.scores[i]:.4f})")
    return result


@dataclass(frozen=True)
class DetectionParityCheck:
    """A store.ParityCheck: the stored graph, served, against `reference` detections on
    `images` (uint8 (H, W, C) canvases of their original sizes)."""

    images: Sequence[np.ndarray]
    reference: Sequence[Detections]
    served: Callable[[Exported], DetectFunction]  # the stored graph's served detect function
    threshold: float
    reference_name: str
    box_tolerance_px: float = 0.5
    score_tolerance: float = 1e-4

    def __call__(self, exported: Exported) -> DetectionParity:
        # A little below the threshold: a detection the reference kept at 0.30001 must be
        # found even where the graph scores it 0.29999.
        served = self.served(exported)(self.images, max(0.0, self.threshold - self.score_tolerance))
        comparison = compare_detections(served, self.reference, self.threshold,
                                        self.box_tolerance_px, self.score_tolerance)
        parity = DetectionParity(
            samples=len(self.images), detections=comparison.detections,
            confidence_threshold=self.threshold, box_tolerance_px=self.box_tolerance_px,
            score_tolerance=self.score_tolerance,
            max_box_diff_px=round(comparison.max_box_diff_px, 6),
            max_score_diff=float(f"{comparison.max_score_diff:.3g}"),
            reference=self.reference_name)
        if (comparison.problems or comparison.max_box_diff_px > self.box_tolerance_px
                or comparison.max_score_diff > self.score_tolerance):
            shown = "; ".join(comparison.problems[:5])
            raise ParityError(
                f"detection parity failed against {self.reference_name} on {len(self.images)} "
                f"images: max box difference {comparison.max_box_diff_px:.3g} px (tolerance "
                f"{self.box_tolerance_px}), max score difference {comparison.max_score_diff:.3g} "
                f"(tolerance {self.score_tolerance}); {len(comparison.problems)} unmatched "
                f"detections{': ' + shown if shown else ''}")
        return parity
