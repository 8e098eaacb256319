"""Batch -> runtime -> answers: the path every adaptive batch takes, whatever the task.

One batch holds images from many requests, each routed to a variant. The predictor runs each
variant's rows through its runtime in one call, feeds the features to that variant's drift window,
lets the task turn outputs into answers, records them in /metrics, and offers the batch to the
shadow. The task (serving/classification.py, ...) supplies what differs: the outputs it reads, the
post-processing, its metrics and how a shadow's answer is compared.

Rows the result cache answered (serving/cache.py) come through the batcher too, with their answer:
they are not run, so the drift windows and the shadow see real inferences only; /metrics counts
them with the others (answers per class, confidence, processing time), since they are answers
given. New answers are stored in the cache.

Plain Python over plain objects: unit-testable with a fake runtime, no server needed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from .cache import CachedAnswer, CacheSlot
from .calibration import run_in_pieces
from .contract import GraphSpec, InputSpec
from .drift import DriftMonitor
from .errors import RejectedInput
from .shadow import Shadow

logger = logging.getLogger("bentoml.image_classifier")


@dataclass(frozen=True, slots=True)
class Item:
    """One image, preprocessed to the model's input, and what its answer needs."""

    array: np.ndarray
    received_at: float  # time.perf_counter() when the server received it
    variant: int  # index of the served model that answers it
    context: Any = None  # per image, for the task's post-processing (a detector's letterbox)
    cached: CachedAnswer | None = None  # the result cache's answer: not run (array: NO_PIXELS)
    cache_slot: CacheSlot | None = None  # where its answer is stored once it has one


NO_PIXELS = np.empty(0, np.uint8)  # the array of an Item the cache answers


@dataclass(frozen=True, slots=True)
class JobFile:
    """One upload of an asynchronous job: decoded later, in the job, not while it is parsed."""

    name: str
    data: bytes
    variant: int
    options: Any = None  # per request, for the task (a detector's thresholds)


class Runtime(Protocol):
    output_names: list[str]

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]: ...


class Task(Protocol):
    """What a task module supplies to the shared batch path."""

    name: str
    # The per-request options the task takes (a detector's thresholds), or None.
    options_model: type[BaseModel] | None
    # Its outputs in the Open Inference Protocol: (name, datatype, shape) each.
    tensor_outputs: list[tuple[str, str, tuple[int, ...]]]

    def options(self, fields: Mapping[str, Any]) -> Any:
        """A request's option fields -> the task's options for it (RejectedInput if invalid)."""

    def output_names(self, graph: GraphSpec) -> list[str]:
        """The graph outputs the task reads (the features among them)."""

    def decode(self, image: Any, spec: InputSpec, max_pixels: int | None, options: Any = None
               ) -> tuple[np.ndarray, Any]:
        """An upload (bytes or an opened image) and its request's options -> the graph's input
        pixels, and what post-processing will need for this image."""

    def tensor_context(self, spec: InputSpec, options: Any = None) -> Any:
        """The same for a row of a JSON tensor, which is already at the graph's input size."""

    def postprocess(self, outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                    contexts: Sequence[Any], models: Sequence[str],
                    processing_ms: Sequence[float]) -> list[Any]:
        """A batch's outputs -> one answer per image."""

    def record(self, answers: Sequence[Any], seconds: Sequence[float]) -> None:
        """The answers in /metrics."""

    def tensors(self, outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                answers: Sequence[Any], contexts: Sequence[Any]) -> list[dict[str, Any]]:
        """Per image, the task's protocol outputs by name (and the answering model's tag under
        "model"): what `tensor_outputs` declares."""

    def agreement(self, shadow_outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                  served: Sequence[Any], contexts: Sequence[Any]) -> np.ndarray:
        """Per image: did a shadow model's outputs agree with the answer served?"""


# Held while a worker's models run: service code runs one call at a time in a worker, whether
# it comes from BentoML's batcher thread, a job, or the fast lane in the event loop
# (serving/fast_lane.py), as BentoML's own one-thread limiter kept it before there was a lane.
# The drift windows, the shadow's queue and the runtimes' arenas assume it. Re-entrant: the fast
# lane holds it around a service method that takes it again.
RUNNING = threading.RLock()


class Predictor:
    """The served models of one deployment, in variant order, and the task that reads them."""

    def __init__(self, task: Task, graph: GraphSpec, runtimes: Sequence[Runtime],
                 tags: Sequence[str], monitors: Sequence[DriftMonitor | None] | None = None,
                 shadow: Shadow | None = None,
                 piece_sizes: Sequence[int | None] | None = None
                 ) -> None:
        """`piece_sizes`: per runtime, the most images one call takes (a larger batch runs in
        pieces; serving/calibration.py); None: a whole batch per call."""
        self.task = task
        self.graph = graph
        self.runtimes = list(runtimes)
        self.piece_sizes: list[int | None] = list(piece_sizes) if piece_sizes is not None \
            else [None] * len(self.runtimes)
        self.tags = list(tags)
        self.monitors = list(monitors) if monitors is not None else [None] * len(self.runtimes)
        self.shadow = shadow
        self.failing = False  # the last batch raised in the runtime: readiness says so

    def predict(self, batch: Sequence[Item]) -> list[Any]:
        """One adaptive batch (images from many requests) -> one answer per image, in order."""
        return self._answer(batch)[0]

    def predict_tensors(self, batch: Sequence[Item]) -> list[dict[str, Any]]:
        """The same batch path, answered as the task's tensors per image (the Open Inference
        Protocol's outputs: serving/inference_protocol.py). Its items are never cached: the
        outputs of every row are needed."""
        answers, outputs = self._answer(batch)
        return self.task.tensors(outputs, self.graph, answers, [item.context for item in batch])

    def _answer(self, batch: Sequence[Item]) -> tuple[list[Any], dict[str, np.ndarray]]:
        """Answers in batch order, and the outputs of the rows that were run."""
        with RUNNING:
            fresh = [item for item in batch if item.cached is None]
            outputs, answers, seconds = self._infer(fresh) if fresh else ({}, [], [])
            if len(fresh) < len(batch):
                answers, seconds = with_cached(batch, answers, seconds)
            self.task.record(answers, seconds)
            return answers, outputs

    def _infer(self, batch: Sequence[Item]
               ) -> tuple[dict[str, np.ndarray], list[Any], list[float]]:
        """Rows to run -> their outputs, answers (stored in the cache where it is on) and
        seconds since each was received."""
        pixels = np.stack([item.array for item in batch])
        variants = np.fromiter((item.variant for item in batch), np.intp, len(batch))
        outputs = self._run_variants(pixels, variants)
        done = time.perf_counter()
        tags = [self.tags[i] for i in variants]
        seconds = [done - item.received_at for item in batch]
        contexts = [item.context for item in batch]
        answers = self.task.postprocess(outputs, self.graph, contexts, tags,
                                        [s * 1000.0 for s in seconds])
        for item, answer in zip(batch, answers):
            if item.cache_slot is not None:
                item.cache_slot.store(answer)
        if self.shadow is not None:
            self.shadow.offer(pixels, answers, tags, contexts)
        return outputs, answers, seconds

    def predict_files(self, files: Sequence[JobFile], spec: InputSpec, max_pixels: int,
                      batch_size: int) -> list[Any | RejectedInput]:
        """An asynchronous job: per file its answer, or the reason it was refused, in order;
        decoded and run `batch_size` files at a time."""
        results: list[Any | RejectedInput] = []
        for start in range(0, len(files), batch_size):
            results += self._predict_decoded(files[start:start + batch_size], spec, max_pixels)
        return results

    def _predict_decoded(self, files: Sequence[JobFile], spec: InputSpec, max_pixels: int
                         ) -> list[Any | RejectedInput]:
        results: list[Any | RejectedInput] = []
        items: list[Item] = []
        for upload in files:
            try:
                array, context = self.task.decode(upload.data, spec, max_pixels, upload.options)
            except RejectedInput as exc:
                results.append(exc)
                continue
            items.append(Item(array, time.perf_counter(), upload.variant, context))
            results.append(None)
        answers = iter(self.predict(items) if items else [])
        return [next(answers) if result is None else result for result in results]

    def check_ready(self, spec: InputSpec) -> bool:
        """Ready: every runtime is loaded and, after a batch failed in a runtime, a probe batch
        of one blank image succeeds again (a lost GPU, a broken session: not ready)."""
        if not self.runtimes:
            return False
        if self.failing:
            try:
                for runtime in self.runtimes:
                    runtime.run(np.zeros((1, *spec.shape), dtype=np.uint8))
            except Exception:  # any runtime failure means: do not send traffic here
                logger.exception("readiness probe failed")
                return False
            self.failing = False
        return True

    def _run_variants(self, pixels: np.ndarray, variants: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of every row from its variant (one call per variant in the batch)."""
        if len(self.runtimes) == 1 or (variants == variants[0]).all():  # common: no copies
            return self._run(int(variants[0]), pixels)
        merged: dict[str, np.ndarray] = {}
        for index in np.unique(variants):
            rows = np.flatnonzero(variants == index)
            for name, values in self._run(int(index), pixels[rows]).items():
                if name not in merged:
                    merged[name] = np.empty((len(pixels), *values.shape[1:]), values.dtype)
                merged[name][rows] = values
        return merged

    def _run(self, variant: int, pixels: np.ndarray) -> dict[str, np.ndarray]:
        runtime = self.runtimes[variant]
        try:
            piece = self.piece_sizes[variant]
            rows = runtime.run(pixels) if piece is None or len(pixels) <= piece else \
                run_in_pieces(runtime.run, pixels, piece)
            outputs = dict(zip(runtime.output_names, rows))
        except Exception:
            self.failing = True
            raise
        self.failing = False
        monitor = self.monitors[variant]
        if monitor is not None:
            monitor.observe(outputs[self.graph.features_name])
        return outputs


def with_cached(batch: Sequence[Item], answers: Sequence[Any], seconds: Sequence[float]
                ) -> tuple[list[Any], list[float]]:
    """The answers of the rows that were run (in order), with the cache's answers in their
    places; each cached answer's processing time is its own, from receipt to now."""
    done = time.perf_counter()
    computed = iter(zip(answers, seconds))
    merged: list[Any] = []
    elapsed: list[float] = []
    for item in batch:
        if item.cached is None:
            answer, spent = next(computed)
        else:
            spent = done - item.received_at
            answer = item.cached.answer(spent * 1000.0)
        merged.append(answer)
        elapsed.append(spent)
    return merged, elapsed
