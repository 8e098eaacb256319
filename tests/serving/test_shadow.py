"""serving.shadow: a candidate model compared in a process of its own, with a fake runtime that
the shadow's process loads. Results come back to the worker's metrics, counted per served model;
`fraction` samples images; a busy shadow drops copies and counts them; a failing shadow model
does not stop the shadow; a crashed shadow process costs drops, logged once, never an error on
the request path; the process runs at the lowest priority and exits with its worker; the real
tasks' comparisons and answers cross to it."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import psutil
import pytest

from serving.classification import Classification, to_predictions
from serving.contract import DetectionSpec, GraphSpec, InputSpec
from serving.detection import Detection, ImageContext, Thresholds
from serving.schemas import DetectedObject, DetectionResult
from serving.settings import DetectionSettings
from serving.shadow import Copy, Shadow, task_agreement

CLASSES = 10
WAIT_S = 30  # for the shadow's process to get through what it was given (a loaded CI machine)
SPAWN = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parents[2]
SPEC = InputSpec(height=64, width=64, channels=3, color_mode="RGB", mean=(0.5,) * 3,
                 std=(0.25,) * 3, fit="letterbox", fill=(114, 114, 114))


class FakeRuntime:
    """Stands in for OnnxRuntime, in the shadow's process. Each image is one pixel holding the
    class the shadow model answers. `entered`: set when a batch reaches the model; `hold`:
    every batch waits for it; `failures`: that many first batches raise; `exit_code`: the
    first batch ends the process with it (a crash)."""

    def __init__(self, entered: Any = None, hold: Any = None, failures: int = 0,
                 exit_code: int | None = None, load_error: bool = False) -> None:
        if load_error:
            raise FileNotFoundError("model.onnx is not there")
        self.entered, self.hold = entered, hold
        self.failures = failures
        self.exit_code = exit_code

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if self.entered is not None:
            self.entered.set()
        if self.hold is not None:
            self.hold.wait(WAIT_S)
        if self.exit_code is not None:
            os._exit(self.exit_code)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the shadow model failed")
        classes = pixels[:, 0].astype(int)
        return {"probabilities": np.eye(CLASSES, dtype=np.float32)[classes],
                "features": np.zeros((len(pixels), 4), dtype=np.float32)}


def same_class(outputs: Mapping[str, np.ndarray], served: Sequence[Any],
               contexts: Sequence[Any]) -> np.ndarray:
    """A classifier's agreement: the shadow's top class is the class served."""
    return np.asarray(outputs["probabilities"].argmax(axis=1) == np.asarray(served))


def offer(candidate: Shadow, shadow_classes: Sequence[int], served: Sequence[int],
          models: Sequence[str]) -> None:
    """An answered batch: images the shadow will read as `shadow_classes`, served as `served`
    by `models`."""
    pixels = np.asarray(shadow_classes, dtype=np.uint8)[:, np.newaxis]
    candidate.offer(pixels, served, models, contexts=[None] * len(served))


def metric(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(f"image_classifier_{name}", labels) or 0.0


def compared(tag: str, model: str, agree: str | None = None) -> float:
    """Images of `model`'s answers the shadow `tag` compared (that agreed, or not; or all)."""
    if agree is None:
        return compared(tag, model, "true") + compared(tag, model, "false")
    return metric("shadow_comparisons_total", model=model, shadow=tag, agree=agree)


def dropped(tag: str) -> float:
    return metric("shadow_dropped_total", shadow=tag)


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for the shadow's process (bounded): `what` must come true."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: still not so after {WAIT_S} s"
        time.sleep(0.01)


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    """A shadow tag of this test's own: its metric series start at 0."""
    return f"shadow-{request.node.name}:v1"


@pytest.fixture
def shadow(tag: str) -> Iterator[Callable[..., Shadow]]:
    """Starts shadows with FakeRuntime(**runtime) in their process; stops them after the test."""
    started: list[Shadow] = []

    def start(fraction: float = 1.0, queue_batches: int = 4,
              agreement: Callable[..., np.ndarray] = same_class,
              load: Callable[[], Any] | None = None, **runtime: Any) -> Shadow:
        candidate = Shadow(load or functools.partial(FakeRuntime, **runtime), tag=tag,
                           fraction=fraction, queue_batches=queue_batches,
                           agreement=agreement, seed=0)
        started.append(candidate)
        return candidate

    yield start
    for candidate in started:
        candidate.close()


def test_agreement_comes_back_counted_per_served_model(tag: str, shadow) -> None:
    candidate = shadow()
    # The shadow answers 1, 2, 3, 4; "a" served 1, 2 (agree twice), "b" served 0, 4 (once).
    offer(candidate, [1, 2, 3, 4], [1, 2, 0, 4], ["a", "a", "b", "b"])
    eventually(lambda: compared(tag, "a") + compared(tag, "b") == 4, "the batch is compared")
    counts = {(m, a): compared(tag, m, a) for m in "ab" for a in ("true", "false")}
    assert counts == {("a", "true"): 2, ("a", "false"): 0, ("b", "true"): 1, ("b", "false"): 1}
    assert metric("shadow_inference_seconds_count", shadow=tag) == 1
    assert dropped(tag) == 0


def test_fraction_copies_that_share_of_the_images(tag: str, shadow) -> None:
    classes = np.arange(1000) % CLASSES
    chosen = np.random.default_rng(0).random(1000) < 0.3  # the same seed as the Shadow's
    # Served as the shadow reads them where sampled, otherwise not: any other image compared,
    # or an image paired with another's answer, would count as a disagreement.
    served = np.where(chosen, classes, (classes + 1) % CLASSES)
    offer(shadow(fraction=0.3), classes.tolist(), served.tolist(), ["m"] * 1000)
    eventually(lambda: compared(tag, "m") == chosen.sum(), "the sampled images are compared")
    assert compared(tag, "m", "false") == 0, "the shadow saw other images than the sampled ones"
    assert 200 < chosen.sum() < 400


def test_a_busy_shadow_drops_copies_and_counts_them(tag: str, shadow) -> None:
    entered, hold = SPAWN.Event(), SPAWN.Event()
    candidate = shadow(queue_batches=1, entered=entered, hold=hold)
    offer(candidate, [1, 2], [1, 2], ["m", "m"])
    assert entered.wait(WAIT_S), "the first copy never reached the shadow model"
    offer(candidate, [3], [3], ["m"])  # waits for the shadow (1 batch)
    offer(candidate, [4, 5, 6], [4, 5, 6], ["m"] * 3)  # no room: dropped, never waited for
    eventually(lambda: dropped(tag) == 3, "the copy with no room is dropped")
    hold.set()
    eventually(lambda: compared(tag, "m") == 3, "the two kept copies are compared")
    assert dropped(tag) == 3


def test_a_failing_shadow_model_does_not_stop_the_shadow(tag: str, shadow,
                                                         shadow_log: list[str]) -> None:
    candidate = shadow(failures=1)
    offer(candidate, [1], [1], ["m"])  # raises in the shadow's process
    offer(candidate, [2, 3], [2, 3], ["m", "m"])
    eventually(lambda: compared(tag, "m") == 2, "the batch after the failure is compared")
    failures = [line for line in shadow_log if f"shadow model {tag} failed" in line]
    assert len(failures) == 1 and "the shadow model failed" in failures[0], shadow_log


def test_a_crashed_shadow_process_counts_drops_and_is_logged_once(tag: str, shadow,
                                                                   shadow_log: list[str]
                                                                   ) -> None:
    candidate = shadow(exit_code=3)
    offer(candidate, [1, 2], [1, 2], ["m", "m"])  # the process dies on this batch
    eventually(lambda: dropped(tag) == 2, "the images the process never answered are dropped")
    for _ in range(5):  # later copies: dropped on the request path, nothing raised
        offer(candidate, [4, 5, 6], [4, 5, 6], ["m"] * 3)
    assert dropped(tag) == 2 + 15 and compared(tag, "m") == 0
    exits = [line for line in shadow_log if "exited with code 3" in line]
    assert len(exits) == 1, f"the crash was logged {len(exits)} times: {shadow_log}"


def test_a_model_that_does_not_load_stops_the_start(shadow) -> None:
    with pytest.raises(RuntimeError, match="did not load(.|\n)*model.onnx is not there"):
        shadow(load_error=True)


def test_the_shadow_process_runs_at_the_lowest_priority(shadow) -> None:
    candidate = shadow()
    assert candidate.pid is not None and candidate.pid != os.getpid()
    for thread in psutil.Process(candidate.pid).threads():
        assert psutil.Process(thread.id).nice() == 19, f"thread {thread.id} at normal priority"
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(thread.id) == os.SCHED_IDLE


# A worker that starts a shadow, prints its process's PID, and waits to be killed.
WORKER = textwrap.dedent("""
    import functools, time
    from serving.shadow import Shadow
    from tests.serving.test_shadow import FakeRuntime, same_class
    shadow = Shadow(functools.partial(FakeRuntime), "shadow-orphan:v1", 1.0, 4, same_class)
    print(shadow.pid, flush=True)
    time.sleep(600)
""")


def test_the_shadow_process_exits_when_its_worker_is_killed() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert worker.stdout is not None
        child = psutil.Process(int(worker.stdout.readline()))
        worker.kill()  # no atexit, no terminate of daemonic children: the child sees its pipe end
        worker.wait()
        try:
            child.wait(timeout=WAIT_S)
        except psutil.TimeoutExpired:
            child.kill()
            pytest.fail(f"the shadow process outlived its worker by {WAIT_S} s")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_the_classifier_comparison_runs_in_the_shadow_process(tag: str, shadow) -> None:
    graph = GraphSpec(feature_dim=4)
    task = Classification([str(i) for i in range(CLASSES)], top_k=3)
    candidate = shadow(agreement=task_agreement(task, graph))
    served = to_predictions(np.eye(CLASSES, dtype=np.float32)[[1, 2, 5]], task.labels, 3,
                            ["m"] * 3, [1.0] * 3)
    candidate.offer(np.array([[1], [2], [3]], dtype=np.uint8), served, ["m"] * 3, [None] * 3)
    eventually(lambda: compared(tag, "m") == 3, "the batch is compared")
    assert compared(tag, "m", "true") == 2


def test_the_detector_comparison_and_answers_pickle() -> None:
    """What the detector's shadow sends to its process: its comparison, answers, contexts."""
    graph = GraphSpec(feature_dim=4)
    task = Detection(["cat", "dog"], DetectionSpec(), DetectionSettings())
    served = DetectionResult(detections=[DetectedObject(label="cat", class_id=0, score=0.9,
                                                        box=[0, 0, 32, 32])],
                             width=64, height=64, model="m:1", processing_ms=1.0)
    context = ImageContext(task.tensor_context(SPEC).letterbox, Thresholds(0.5, 0.5, 10))
    outputs = {"boxes": np.array([[[0, 0, 32, 32]]], np.float32),
               "scores": np.array([[[0.8, 0.1]]], np.float32)}
    pixels = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(1, 64, 64, 3)
    agreement, copy = pickle.loads(pickle.dumps(
        (task_agreement(task, graph), Copy(7, pixels, (served,), (context,)))))
    assert (copy.number, copy.served, copy.contexts) == (7, (served,), (context,))
    assert np.array_equal(copy.pixels, pixels)
    assert agreement(outputs, copy.served, copy.contexts).tolist() == [True]


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
