"""serving.shadow: a candidate model compared off the request path, with a fake runtime. Agreement
is counted per served model; `fraction` samples images; a busy shadow drops copies and counts
them; a failing shadow model does not stop its thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import prometheus_client
import pytest

from serving.shadow import Shadow

CLASSES = 10
WAIT_S = 30  # for the shadow's thread to get through what it was given (a loaded CI machine)


class FakeRuntime:
    """Stands in for OnnxRuntime. Each image is one pixel holding the class the shadow model
    answers. `hold`: every batch waits for it; `failures`: that many first batches raise."""

    def __init__(self, hold: threading.Event | None = None, failures: int = 0) -> None:
        self.hold = hold
        self.failures = failures
        self.entered = threading.Event()  # set when a batch reaches the model
        self.batches: list[np.ndarray] = []

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(WAIT_S)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the shadow model failed")
        self.batches.append(pixels.copy())
        classes = pixels[:, 0].astype(int)
        return {"probabilities": np.eye(CLASSES, dtype=np.float32)[classes],
                "features": np.zeros((len(pixels), 4), dtype=np.float32)}


def same_class(outputs: Mapping[str, np.ndarray], served: Sequence[Any],
               contexts: Sequence[Any]) -> np.ndarray:
    """A classifier's agreement: the shadow's top class is the class served."""
    return outputs["probabilities"].argmax(axis=1) == np.asarray(served)


def offer(candidate: Shadow, shadow_classes: Sequence[int], served: Sequence[int],
          models: Sequence[str]) -> None:
    """An answered batch: images the shadow will read as `shadow_classes`, served as `served`
    by `models`."""
    pixels = np.asarray(shadow_classes, dtype=np.uint8)[:, np.newaxis]
    candidate.offer(pixels, served, models, contexts=[None] * len(served))


def shadow(runtime: FakeRuntime, tag: str, fraction: float = 1.0, queue_batches: int = 4,
           ) -> Shadow:
    return Shadow(runtime, tag=tag, fraction=fraction, queue_batches=queue_batches,
                  agreement=same_class, seed=0)


def metric(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(f"image_classifier_{name}", labels) or 0.0


def compared(tag: str, model: str, agree: str | None = None) -> float:
    """Images of `model`'s answers the shadow `tag` compared (that agreed, or not; or all)."""
    if agree is None:
        return compared(tag, model, "true") + compared(tag, model, "false")
    return metric("shadow_comparisons_total", model=model, shadow=tag, agree=agree)


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for the shadow's thread (bounded): `what` must come true."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: still not so after {WAIT_S} s"
        time.sleep(0.01)


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    """A shadow tag of this test's own: its metric series start at 0."""
    return f"shadow-{request.node.name}:v1"


def test_agreement_is_counted_per_served_model(tag: str) -> None:
    runtime = FakeRuntime()
    # The shadow answers 1, 2, 3, 4; "a" served 1, 2 (agree twice), "b" served 0, 4 (once).
    offer(shadow(runtime, tag), [1, 2, 3, 4], [1, 2, 0, 4], ["a", "a", "b", "b"])
    eventually(lambda: compared(tag, "a") + compared(tag, "b") == 4, "the batch is compared")
    counts = {(m, a): compared(tag, m, a) for m in "ab" for a in ("true", "false")}
    assert counts == {("a", "true"): 2, ("a", "false"): 0, ("b", "true"): 1, ("b", "false"): 1}
    assert metric("shadow_inference_seconds_count", shadow=tag) == 1


def test_fraction_copies_that_share_of_the_images(tag: str) -> None:
    runtime = FakeRuntime()
    classes = [i % CLASSES for i in range(1000)]
    offer(shadow(runtime, tag, fraction=0.3), classes, classes, ["m"] * 1000)
    chosen = np.random.default_rng(0).random(1000) < 0.3  # the same seed as the Shadow's
    eventually(lambda: compared(tag, "m") == chosen.sum(), "the sampled images are compared")
    (batch,) = runtime.batches
    assert batch[:, 0].tolist() == np.asarray(classes)[chosen].tolist(), \
        "the shadow saw other images than the sampled ones"
    assert 200 < len(batch) < 400, f"{len(batch)} of 1000 images copied at fraction 0.3"
    assert compared(tag, "m", "true") == len(batch), "a sampled image was paired with another"


def test_a_busy_shadow_drops_copies_and_counts_them(tag: str) -> None:
    hold = threading.Event()
    runtime = FakeRuntime(hold=hold)
    candidate = shadow(runtime, tag, queue_batches=1)
    offer(candidate, [1, 2], [1, 2], ["m", "m"])
    assert runtime.entered.wait(WAIT_S), "the first copy never reached the shadow model"
    offer(candidate, [3], [3], ["m"])  # waits in the queue (1 batch)
    offer(candidate, [4, 5, 6], [4, 5, 6], ["m"] * 3)  # the queue is full: dropped
    assert metric("shadow_dropped_total", shadow=tag) == 3
    hold.set()
    eventually(lambda: compared(tag, "m") == 3, "the two kept copies are compared")
    assert [b[:, 0].tolist() for b in runtime.batches] == [[1, 2], [3]]


def test_a_failing_shadow_model_does_not_stop_the_shadow(tag: str,
                                                         shadow_log: list[str]) -> None:
    runtime = FakeRuntime(failures=1)
    candidate = shadow(runtime, tag)
    offer(candidate, [1], [1], ["m"])  # fails in the shadow's thread
    offer(candidate, [2, 3], [2, 3], ["m", "m"])
    eventually(lambda: compared(tag, "m") == 2, "the batch after the failure is compared")
    assert any(f"shadow model {tag} failed" in line for line in shadow_log), shadow_log


@pytest.fixture
def shadow_log() -> Iterator[list[str]]:
    """Messages the shadow logs while the test runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("bentoml.image_classifier.shadow")
    handler = Collect(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
