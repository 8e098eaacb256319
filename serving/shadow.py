"""Shadow: a candidate model sees a copy of the traffic; its answers are compared, never returned.

Kept off the request path: the batch that was just answered is handed to one daemon thread
through a short queue. When the thread is still busy the copy is dropped and counted, never
queued behind, so the shadow cannot hold up answers or grow memory. The thread lowers its own
CPU priority (nice 19) before it runs anything, and its ONNX Runtime session runs on that thread
alone (intra_op_threads=1), so on a busy CPU the served models get the cores first.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import metrics
from .runtime import OnnxRuntime

# Under BentoML's logger: its handlers put INFO lines in the server's log.
logger = logging.getLogger("bentoml.image_classifier.shadow")
# A summary line after the first batch, then per this many images compared, per worker.
LOG_EVERY_IMAGES = 1000


# The task's comparison: the shadow's outputs for some images, the answers served for them and
# the images' contexts -> per image, whether the shadow agreed (a classifier: the same top class).
Agreement = Callable[[Mapping[str, np.ndarray], Sequence[Any], Sequence[Any]], np.ndarray]


@dataclass(frozen=True, slots=True)
class Copy:
    pixels: np.ndarray
    served: tuple[Any, ...]  # the answers that were served for these images
    served_models: tuple[str, ...]
    contexts: tuple[Any, ...]  # what the task kept per image (a detector's letterbox)


class Shadow:
    def __init__(self, runtime: OnnxRuntime, tag: str, fraction: float, queue_batches: int,
                 agreement: Agreement, seed: int | None = None) -> None:
        self.runtime = runtime
        self.tag = tag
        self.fraction = fraction
        self.agreement = agreement
        self._queue: queue.Queue[Copy] = queue.Queue(maxsize=queue_batches)
        self._sample = np.random.default_rng(seed)
        self._compared = self._agreed = 0
        metrics.shadow_dropped().labels(tag).inc(0)  # the series exists (at 0) from the start
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, pixels: np.ndarray, served: Sequence[Any], served_models: Sequence[str],
              contexts: Sequence[Any]) -> None:
        """Called on the request path: O(batch) bookkeeping, no inference."""
        rows = np.arange(len(pixels))
        if self.fraction < 1.0:
            rows = rows[self._sample.random(len(pixels)) < self.fraction]
            if len(rows) == 0:
                return
        picked = rows.tolist()
        copy = Copy(pixels[rows], tuple(served[i] for i in picked),
                    tuple(served_models[i] for i in picked), tuple(contexts[i] for i in picked))
        try:
            self._queue.put_nowait(copy)
        except queue.Full:
            metrics.shadow_dropped().labels(self.tag).inc(len(rows))

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        except (AttributeError, OSError):  # not Linux: same priority, still off the request path
            logger.info("shadow thread runs at normal priority")
        while True:
            copy = self._queue.get()
            try:
                self._compare(copy)
            except Exception:  # a shadow failure must never reach the served traffic
                logger.exception("shadow model %s failed on a batch of %d", self.tag,
                                 len(copy.pixels))

    def _compare(self, copy: Copy) -> None:
        started = time.perf_counter()
        outputs = self.runtime.outputs(copy.pixels)
        metrics.shadow_seconds().labels(self.tag).observe(time.perf_counter() - started)
        agree = self.agreement(outputs, copy.served, copy.contexts)
        counter = metrics.shadow_comparisons()
        for model in set(copy.served_models):
            mine = np.fromiter((m == model for m in copy.served_models), bool, len(agree))
            hits = int(agree[mine].sum())
            counter.labels(model, self.tag, "true").inc(hits)
            counter.labels(model, self.tag, "false").inc(int(mine.sum()) - hits)
        self._log_summary(len(agree), int(agree.sum()))

    def _log_summary(self, compared: int, agreed: int) -> None:
        first = self._compared == 0
        before = self._compared // LOG_EVERY_IMAGES
        self._compared += compared
        self._agreed += agreed
        if first or self._compared // LOG_EVERY_IMAGES > before:
            logger.info("shadow %s agreed with the served answer on %d of %d images (%.2f%%)",
                        self.tag, self._agreed, self._compared,
                        100.0 * self._agreed / self._compared)
