"""Shadow: a candidate model sees a copy of the traffic; its answers are compared, never returned.

Off the served models' CPU: the candidate runs in a process of its own, one per worker, started
with 'spawn' (a fork would copy the worker's ONNX Runtime threads mid-state). That process loads
the model, then lowers its CPU priority (nice 19 and, on Linux, SCHED_IDLE: it gets the cores
the served models leave idle) and runs a one-thread ONNX Runtime session. In a thread it would
share the worker's GIL, which a low-priority thread holds while the scheduler keeps it waiting.

On the request path only bookkeeping: the batch just answered (its pixels, answers and per-image
contexts) joins the copies that a thread of the worker gathers for a few milliseconds, then
pickles (compactly: Copy.__reduce__) and sends together. At most `queue_batches` copies gather,
and at most `queue_batches` wait for the shadow (a copy keeps its place until the shadow starts
on it); a copy with no room is dropped and counted, never waited for, so the shadow can neither
hold up answers nor grow memory. The shadow's process infers and compares
(the task's agreement, which needs the dense outputs) and sends back per image whether it
agreed, a few times a second; a thread of the worker records that in /metrics and the log, so
the metrics live where BentoML collects them.

If the shadow's process dies, the served traffic goes on: its unanswered images and every later
copy are counted as dropped, and the worker logs it once. The process exits with its worker:
daemonic, and the pipe it reads closes when the worker dies, even when it is killed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeAlias

import numpy as np
from pydantic import BaseModel

from . import metrics
from .contract import GraphSpec

# Under BentoML's logger: its handlers put INFO lines in the server's log.
logger = logging.getLogger("bentoml.image_classifier.shadow")
# A summary line after the first batch, then per this many images compared, per worker.
LOG_EVERY_IMAGES = 1000
# How often the worker's threads check that its shadow's process is alive when it has nothing to
# say (the process itself exits on the end of its pipe when its worker dies).
POLL_S = 1.0
# The worker sends copies together: its thread waits this long after a first copy for more (or
# until `queue_batches` are gathered), then pickles and sends them at once. A message per copy
# costs the worker two to four times as much CPU per copy.
GATHER_S = 0.02
# The shadow's process sends its results together, at most this often: a few messages a second
# for the worker's thread to record, however many batches it compares.
SEND_EVERY_S = 0.1


# The task's comparison: the shadow's outputs for some images, the answers served for them and
# the images' contexts -> per image, whether the shadow agreed (a classifier: the same top class).
# It runs in the shadow's process, so it must pickle (a module-level function, or a partial).
Agreement = Callable[[Mapping[str, np.ndarray], Sequence[Any], Sequence[Any]], np.ndarray]


class ShadowRuntime(Protocol):
    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]: ...


class Comparing(Protocol):
    """What a task offers the shadow (serving/predictor.py's Task has it)."""

    def agreement(self, shadow_outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                  served: Sequence[Any], contexts: Sequence[Any]) -> np.ndarray: ...


def task_agreement(task: Comparing, graph: GraphSpec) -> Agreement:
    """A task's comparison for the shadow's `graph`, in a form that pickles."""
    return functools.partial(_compare_with_task, task, graph)


def _compare_with_task(task: Comparing, graph: GraphSpec, outputs: Mapping[str, np.ndarray],
                       served: Sequence[Any], contexts: Sequence[Any]) -> np.ndarray:
    return task.agreement(outputs, graph, served, contexts)


@dataclass(frozen=True, slots=True)
class Copy:
    """Worker -> shadow: an answered batch, numbered so that its result finds its models."""

    number: int
    pixels: np.ndarray
    served: tuple[Any, ...]  # the answers that were served for these images
    contexts: tuple[Any, ...]  # what the task kept per image (a detector's letterbox)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled compactly, as the worker pickles every copy it sends: the pixels as bytes,
        pydantic answers as their fields (a third of the time of pickling the objects)."""
        pixels = self.pixels
        return (_copy_from, (self.number, pixels.tobytes(), pixels.shape, pixels.dtype.str,
                             *_plain_answers(self.served), self.contexts))


def _plain_answers(served: tuple[Any, ...]) -> tuple[type[BaseModel] | None, tuple[Any, ...]]:
    kind = type(served[0]) if served else None
    if kind is None or not issubclass(kind, BaseModel) or \
            any(type(answer) is not kind for answer in served):
        return None, served
    return kind, tuple(answer.model_dump() for answer in served)


def _copy_from(number: int, data: bytes, shape: tuple[int, ...], dtype: str,
               kind: type[BaseModel] | None, served: tuple[Any, ...], contexts: tuple[Any, ...]
               ) -> Copy:
    pixels = np.frombuffer(data, dtype=dtype).reshape(shape)
    if kind is not None:
        served = tuple(kind.model_validate(answer) for answer in served)
    return Copy(number, pixels, served, contexts)


class Compared(NamedTuple):
    """Shadow -> worker: per image of copy `number`, whether the shadow agreed."""

    number: int
    seconds: float  # the shadow model's inference
    agree: list[bool]


class Failed(NamedTuple):
    """Shadow -> worker: copy `number` raised (-1: the model did not load)."""

    number: int
    error: str  # the traceback, for the worker's log


@dataclass(frozen=True, slots=True)
class Ready:
    """Shadow -> worker: the model is loaded."""


# Shadow -> worker.
Results: TypeAlias = "multiprocessing.queues.Queue[Ready | Failed | list[Compared | Failed]]"


class Shadow:
    """The worker's side: samples and offers copies, and records what the shadow answers.

    `load` builds the shadow's runtime and `agreement` compares; both run in the shadow's
    process, so both must pickle. Returns once the model is loaded there (a model that does not
    load stops the worker's start, as a served model would)."""

    def __init__(self, load: Callable[[], ShadowRuntime], tag: str, fraction: float,
                 queue_batches: int, agreement: Agreement, seed: int | None = None) -> None:
        self.tag = tag
        self.fraction = fraction
        self._sample = np.random.default_rng(seed)
        self.queue_batches = queue_batches
        self._lock = threading.Lock()
        self._gathered = threading.Condition(self._lock)  # copies in the outbox
        self._outbox: list[Copy] = []  # offered, not sent yet
        self._pending: dict[int, tuple[str, ...]] = {}  # copy number -> its images' models
        self._numbers = 0
        self._stopped = False  # the process exited, or close(): every copy is dropped
        self._closing = False
        self._compared = self._agreed = 0
        metrics.shadow_dropped().labels(tag).inc(0)  # the series exists (at 0) from the start
        context = multiprocessing.get_context("spawn")
        # A sent copy holds a place until the shadow starts on it: at most `queue_batches` wait
        # in the pipe and the shadow's process.
        self._places = context.BoundedSemaphore(queue_batches)
        receiver, self._copies = context.Pipe(duplex=False)
        self._results: Results = context.Queue()
        self._process = context.Process(
            target=run_shadow, name=f"shadow {tag}", daemon=True,
            args=(load, agreement, receiver, self._places, self._results))
        self._process.start()
        receiver.close()  # the process has its own: a send to a dead one fails, never waits
        self._wait_until_loaded()
        self._threads = [threading.Thread(target=self._send, name="shadow copies", daemon=True),
                         threading.Thread(target=self._collect, name="shadow results",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def offer(self, pixels: np.ndarray, served: Sequence[Any], served_models: Sequence[str],
              contexts: Sequence[Any]) -> None:
        """Called on the request path: O(batch) bookkeeping, never a wait. The caller must not
        change `pixels` afterwards: a thread of the shadow sends it later."""
        if self.fraction < 1.0:
            rows = np.flatnonzero(self._sample.random(len(pixels)) < self.fraction)
            if len(rows) == 0:
                return
            picked = rows.tolist()
            pixels = pixels[rows]
            served = [served[i] for i in picked]
            served_models = [served_models[i] for i in picked]
            contexts = [contexts[i] for i in picked]
        with self._lock:
            if self._stopped or len(self._outbox) >= self.queue_batches:  # dropped, not queued
                self._drop(len(pixels))
                return
            number = self._numbers
            self._numbers += 1
            self._pending[number] = tuple(served_models)
            self._outbox.append(Copy(number, pixels, tuple(served), tuple(contexts)))
            if len(self._outbox) in (1, self.queue_batches):  # the sender's cue
                self._gathered.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the shadow's process (a worker's exit does it without this)."""
        with self._lock:
            self._closing = self._stopped = True
            self._gathered.notify()
        self._process.terminate()
        self._process.join(timeout_s)
        for thread in self._threads:
            thread.join(timeout_s)
        self._copies.close()
        self._results.close()

    def _drop(self, images: int) -> None:
        metrics.shadow_dropped().labels(self.tag).inc(images)

    def _next_result(self) -> Any:
        """The shadow process's next message; None once the process has exited without one."""
        while True:
            try:
                return self._results.get(timeout=POLL_S)
            except queue.Empty:
                if not self._process.is_alive():
                    return None

    def _wait_until_loaded(self) -> None:
        while True:
            message = self._next_result()
            if message is None:
                raise RuntimeError(f"the process of shadow model {self.tag} exited with code "
                                   f"{self._process.exitcode} while it loaded")
            if isinstance(message, Ready):
                logger.info("shadow %s loaded in process %s", self.tag, self._process.pid)
                return
            if isinstance(message, Failed):
                raise RuntimeError(f"shadow model {self.tag} did not load:\n{message.error}")

    def _send(self) -> None:
        """The worker's thread that sends the offered copies, several at a time."""
        while True:
            with self._lock:
                while not self._outbox and not self._stopped:
                    self._gathered.wait()
                deadline = time.monotonic() + GATHER_S
                while (len(self._outbox) < self.queue_batches and not self._stopped
                       and (left := deadline - time.monotonic()) > 0):
                    self._gathered.wait(left)
                if self._stopped:  # what is pending is counted as dropped (_lost)
                    return
                copies, self._outbox = self._outbox, []
                placed = []
                for copy in copies:
                    if self._places.acquire(False):
                        placed.append(copy)
                    elif self._pending.pop(copy.number, None) is not None:  # enough waiting
                        self._drop(len(copy.pixels))
            if not placed:
                continue
            try:
                self._copies.send(placed)  # waits while the pipe is full, never on a request
            except (OSError, ValueError):  # the process is gone: the collector counts it
                return

    def _collect(self) -> None:
        """The worker's thread that records the shadow's results, until its process exits."""
        while True:
            try:
                message = self._next_result()
            except (EOFError, OSError, ValueError):  # closed
                return
            if message is None:
                self._lost()
                return
            try:
                self._record(message)
            except Exception:  # a bookkeeping failure must never reach the served traffic
                logger.exception("recording a result of shadow %s failed", self.tag)

    def _record(self, message: list[Compared | Failed]) -> None:
        """Results of several copies: per served model, how many images agreed or not (Ready
        and a load's Failed were taken by _wait_until_loaded before this runs)."""
        with self._lock:
            models = [self._pending.pop(result.number, ()) for result in message]
        counts: Counter[tuple[str, bool]] = Counter()
        seconds = metrics.shadow_seconds().labels(self.tag)
        for result, served_models in zip(message, models):
            if isinstance(result, Failed):
                logger.error("shadow model %s failed on a batch of %d:\n%s", self.tag,
                             len(served_models), result.error)
                continue
            seconds.observe(result.seconds)
            counts.update(zip(served_models, result.agree))
        comparisons = metrics.shadow_comparisons()
        for (model, agreed), images in counts.items():
            comparisons.labels(model, self.tag, "true" if agreed else "false").inc(images)
        for model in {model for model, _ in counts}:  # both series exist once a model is seen
            comparisons.labels(model, self.tag, "true").inc(0)
            comparisons.labels(model, self.tag, "false").inc(0)
        if counts:
            self._log_summary(counts.total(), sum(n for (_, agreed), n in counts.items()
                                                  if agreed))

    def _lost(self) -> None:
        """The process exited: what it had not answered, and every later copy, is dropped."""
        with self._lock:
            self._stopped = True
            if self._closing:
                return
            unanswered = sum(len(models) for models in self._pending.values())
            self._pending.clear()
            self._outbox.clear()
            self._gathered.notify()  # the sender stops
            self._drop(unanswered)
        logger.error(
            "the process of shadow model %s (pid %s) exited with code %s: its %d unanswered "
            "images and every later copy are counted as dropped "
            "(image_classifier_shadow_dropped_total); the served answers are not affected, and "
            "the worker's next start starts a new shadow", self.tag, self._process.pid,
            self._process.exitcode, unanswered)

    def _log_summary(self, compared: int, agreed: int) -> None:
        first = self._compared == 0
        before = self._compared // LOG_EVERY_IMAGES
        self._compared += compared
        self._agreed += agreed
        if first or self._compared // LOG_EVERY_IMAGES > before:
            logger.info("shadow %s agreed with the served answer on %d of %d images (%.2f%%)",
                        self.tag, self._agreed, self._compared,
                        100.0 * self._agreed / self._compared)


def run_shadow(load: Callable[[], ShadowRuntime], agreement: Agreement, copies: Connection,
               places: Any, results: Results) -> None:
    """The shadow's process: load the model (at normal priority: the worker's start waits for
    it, even on a busy CPU), then at the lowest priority compare every copy it gets until the
    worker is gone (its end of the pipe closes, even when it is killed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the worker, which stops this
    try:
        runtime = load()
    except Exception:
        results.put(Failed(-1, traceback.format_exc()))
        return
    lower_priority()
    results.put(Ready())
    outbox: list[Compared | Failed] = []
    send_at = 0.0
    while True:
        if not copies.poll(max(0.0, send_at - time.monotonic()) if outbox else None):
            results.put(outbox)  # nothing new by the time these are due: send them
            outbox = []
            continue
        try:
            received: list[Copy] = copies.recv()
        except EOFError:  # the worker is gone
            os._exit(0)
        for copy in received:
            places.release()  # being compared: no longer waiting
            if not outbox:
                send_at = time.monotonic() + SEND_EVERY_S
            outbox.append(compare(runtime, agreement, copy))
        if time.monotonic() >= send_at:  # busy: send without waiting for a pause
            results.put(outbox)
            outbox = []


def compare(runtime: ShadowRuntime, agreement: Agreement, copy: Copy) -> Compared | Failed:
    started = time.perf_counter()
    try:
        outputs = runtime.outputs(copy.pixels)
        seconds = time.perf_counter() - started
        agree = np.asarray(agreement(outputs, copy.served, copy.contexts), dtype=bool).tolist()
    except Exception:  # a shadow failure is reported, never raised into the served traffic
        return Failed(copy.number, traceback.format_exc())
    return Compared(copy.number, seconds, agree)


def lower_priority() -> None:
    """Every thread of this process (and those it starts later) at nice 19, and SCHED_IDLE on
    Linux: it runs when the served models leave a core idle."""
    tasks = Path("/proc/self/task")  # Linux: per thread; elsewhere the process (0) will do
    for thread in [int(task.name) for task in tasks.iterdir()] if tasks.is_dir() else [0]:
        # Not a POSIX system, or not allowed: normal priority, still a process of its own.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, thread, 19)
        if hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
