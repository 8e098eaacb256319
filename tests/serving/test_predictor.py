"""Predictor: the batch path over fake runtimes (no server, no model): answers in batch order from
each image's variant, features to that variant's drift window, jobs with refusals in place, and
readiness after a runtime failure."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from serving.classification import Classification
from serving.contract import GraphSpec, InputSpec
from serving.predictor import Item, JobFile, Predictor

SPEC = InputSpec(height=4, width=4, channels=1, color_mode="L", mean=(0.5,), std=(0.25,))
GRAPH = GraphSpec(feature_dim=2)
LABELS = ["a", "b", "c"]


class FakeRuntime:
    """A 'model' whose answer is fixed per runtime: probability 1 for `winner`; features are
    each image's mean pixel, so a test can tell which images reached which runtime."""

    output_names = [GRAPH.probabilities_name, GRAPH.features_name]

    def __init__(self, winner: int) -> None:
        self.winner = winner
        self.batches: list[int] = []
        self.broken = False

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.broken:
            raise RuntimeError("CUDA failure: device lost")
        self.batches.append(len(pixels))
        probabilities = np.zeros((len(pixels), len(LABELS)), np.float32)
        probabilities[:, self.winner] = 1.0
        mean = pixels.reshape(len(pixels), -1).mean(axis=1, dtype=np.float32)
        return probabilities, np.stack([mean, mean], axis=1)


class RecordingMonitor:
    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def observe(self, features: np.ndarray) -> None:
        self.seen.append(features)


def items(variants: Sequence[int]) -> list[Item]:
    """One image per variant index; image i is filled with the value i."""
    return [Item(np.full(SPEC.shape, i, np.uint8), time.perf_counter(), v)
            for i, v in enumerate(variants)]


def predictor(runtimes: list[FakeRuntime], monitors: list | None = None) -> Predictor:
    return Predictor(Classification(LABELS, top_k=2), GRAPH, runtimes,
                     [f"m:v{i}" for i in range(len(runtimes))], monitors)


def test_each_image_is_answered_by_its_variant_in_batch_order() -> None:
    runtimes = [FakeRuntime(winner=0), FakeRuntime(winner=2)]
    answers = predictor(runtimes).predict(items([0, 1, 1, 0, 1]))
    assert [a.label for a in answers] == ["a", "c", "c", "a", "c"]
    assert [a.model for a in answers] == ["m:v0", "m:v1", "m:v1", "m:v0", "m:v1"]
    assert runtimes[0].batches == [2] and runtimes[1].batches == [3], "one call per variant"
    assert all(a.processing_ms >= 0 and len(a.top_k) == 2 for a in answers)


def test_a_batch_of_one_variant_is_one_runtime_call() -> None:
    runtimes = [FakeRuntime(winner=1), FakeRuntime(winner=2)]
    predictor(runtimes).predict(items([1, 1, 1]))
    assert runtimes[0].batches == [] and runtimes[1].batches == [3]


def test_features_go_to_the_drift_window_of_the_variant_that_ran_them() -> None:
    monitors = [RecordingMonitor(), RecordingMonitor()]
    predictor([FakeRuntime(0), FakeRuntime(1)], monitors).predict(items([0, 1, 0, 1]))
    # Image i is filled with i: variant 0 saw images 0 and 2, variant 1 images 1 and 3.
    assert np.concatenate(monitors[0].seen)[:, 0].tolist() == [0.0, 2.0]
    assert np.concatenate(monitors[1].seen)[:, 0].tolist() == [1.0, 3.0]


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (10, 6), value).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_job_answers_every_file_in_order_with_refusals_in_place() -> None:
    runtime = FakeRuntime(winner=1)
    files = [JobFile("a.png", png(10), 0), JobFile("broken.png", b"not an image", 0),
             JobFile("c.png", png(30), 0), JobFile("empty.png", b"", 0),
             JobFile("e.png", png(50), 0)]
    results = predictor([runtime]).predict_files(files, SPEC, max_pixels=1000, batch_size=2)
    assert [getattr(r, "label", None) for r in results] == ["b", None, "b", None, "b"]
    assert [getattr(r, "code", None) for r in results] == [
        None, "invalid_image", None, "invalid_image", None]
    assert runtime.batches == [1, 1, 1], "batch_size files at a time, refusals left out"


def test_a_job_image_over_the_pixel_limit_is_refused_alone() -> None:
    results = predictor([FakeRuntime(0)]).predict_files(
        [JobFile("big.png", png(1), 0), JobFile("ok.png", png(2), 0)], SPEC, max_pixels=59,
        batch_size=8)
    assert [getattr(r, "code", None) for r in results] == ["image_too_large", "image_too_large"]
    results = predictor([FakeRuntime(0)]).predict_files(
        [JobFile("ok.png", png(2), 0)], SPEC, max_pixels=60, batch_size=8)
    assert results[0].label == "a"


def test_readiness_follows_the_runtime() -> None:
    runtime = FakeRuntime(winner=0)
    served = predictor([runtime])
    assert served.check_ready(SPEC)
    runtime.broken = True
    with pytest.raises(RuntimeError):
        served.predict(items([0]))
    assert not served.check_ready(SPEC), "a runtime that fails must make the worker not ready"
    runtime.broken = False
    assert served.check_ready(SPEC), "a probe that succeeds makes it ready again"
    assert not predictor([]).check_ready(SPEC), "no model loaded: not ready"


def test_a_batch_runs_in_pieces_of_the_runtime_batch_size_in_order() -> None:
    runtime = FakeRuntime(winner=1)
    monitor = RecordingMonitor()
    served = Predictor(Classification(LABELS, top_k=2), GRAPH, [runtime], ["m:v0"], [monitor],
                       piece_sizes=[4])
    answers = served.predict(items([0] * 10))
    assert runtime.batches == [4, 4, 2]
    assert len(answers) == 10 and all(a.label == "b" for a in answers)
    # Rows come back in order: image i's feature is its fill value i.
    assert monitor.seen[0][:, 0].tolist() == list(range(10))


def test_without_a_piece_size_a_batch_is_one_call() -> None:
    runtime = FakeRuntime(winner=0)
    predictor([runtime]).predict(items([0] * 10))
    assert runtime.batches == [10]
