"""The limit a server can approach: the same ONNX graph in ONNX Runtime in-process (no HTTP),
with the thread settings the service uses; and what decoding an upload costs alone.

For a detector also the per-image work the server does around the runtime, in the same process
layout: decode + letterbox of the upload before, score threshold, per-class NMS, top-k and
mapping the boxes back after (serving/detection.py, the service's own code). Its small graph
leaves that work a large share of an answer, so a ceiling without it is one no server reaches."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from serving.contract import ONNX_FILE, ModelCard
from serving.detection import Detection
from serving.preprocess import decode_image
from serving.runtime import OnnxRuntime
from serving.settings import DetectionSettings

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def timed_rate(step, items_per_step: int, seconds: float) -> float:
    """Items per second of `step` over at least `seconds` (after one warm-up call)."""
    step()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        step()
        count += 1
    return count * items_per_step / elapsed


def open_runtime(model_dir: Path, providers: list[str], threads: int
                 ) -> tuple[ModelCard, OnnxRuntime]:
    """The graph as the service opens it, reading the outputs its task reads; its threads
    spinning, ONNX Runtime's default, the runtime's best alone (the served layout has one
    thread per process, where spinning changes nothing)."""
    card = ModelCard.read(model_dir)
    names = Detection.output_names(card.graph) if card.task == "detection" else None
    return card, OnnxRuntime(model_dir / ONNX_FILE, card.input, card.graph, providers, threads,
                             spin=True, output_names=names)


def runtime_throughput(model_dir: Path, providers: list[str], threads: int, seconds: float,
                       batch_sizes=BATCH_SIZES) -> dict[int, float]:
    card, runtime = open_runtime(model_dir, providers, threads)
    rng = np.random.default_rng(0)
    rates = {}
    for batch in batch_sizes:
        pixels = rng.integers(0, 256, (batch, *card.input.shape), dtype=np.uint8)
        rates[batch] = timed_rate(partial(runtime.run, pixels), batch, seconds)
    return rates


# Batch sizes that change from one call to the next, after each power of two up to 16 was met.
SHAPE_CHANGES = (3, 5, 6, 7, 3, 5, 6, 7, 4, 8, 4, 8, 16, 1, 16)


def shape_change_ms(model_dir: Path, providers: list[str], threads: int
                    ) -> list[tuple[int, float]]:
    """(batch size, milliseconds) of one runtime's calls, in SHAPE_CHANGES' order, not settled
    (serving/runtime.py, settle_batch_shapes): on a GPU, what ONNX Runtime's CUDA provider pays
    to build its convolution plans again at each change of shape; on a CPU, about the rows'
    own cost."""
    card, runtime = open_runtime(model_dir, providers, threads)
    for rows in (1, 2, 4, 8, 16):
        runtime.run(np.zeros((rows, *card.input.shape), np.uint8))
    timed = []
    for rows in SHAPE_CHANGES:
        pixels = np.zeros((rows, *card.input.shape), np.uint8)
        started = time.perf_counter()
        runtime.run(pixels)
        timed.append((rows, (time.perf_counter() - started) * 1000))
    return timed


def detector_pipeline_throughput(model_dir: Path, providers: list[str], threads: int,
                                 seconds: float, upload: bytes, detection: dict[str, Any],
                                 batch_sizes=BATCH_SIZES) -> dict[int, float]:
    """Uploads/s through what the detector's server does per batch but HTTP: decode + letterbox
    each upload, one runtime call, post-processing per image (thresholds `detection`)."""
    card, runtime = open_runtime(model_dir, providers, threads)
    task = detector_task(card, detection)

    def step(batch: int) -> None:
        decoded = [task.decode(upload, card.input, None) for _ in range(batch)]
        outputs = runtime.outputs(np.stack([pixels for pixels, _ in decoded]))
        task.postprocess(outputs, card.graph, [context for _, context in decoded],
                         ["bench"] * batch, [0.0] * batch)

    return {batch: timed_rate(partial(step, batch), batch, seconds) for batch in batch_sizes}


def _call(args: tuple[Callable[..., dict[int, float]], tuple]) -> dict[int, float]:
    function, arguments = args
    return function(*arguments)


def in_processes(function: Callable[..., dict[int, float]], arguments: tuple, processes: int
                 ) -> dict[int, float]:
    """`function(*arguments)` in `processes` processes side by side, as the service's workers
    run: their rates by batch size, summed."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_call, [(function, arguments)] * processes))
    return {b: sum(r[b] for r in results) for b in results[0]}


def parallel_runtime_throughput(model_dir: Path, providers: list[str], processes: int,
                                threads: int, seconds: float,
                                batch_sizes=BATCH_SIZES) -> dict[int, float]:
    """`processes` runtimes side by side, as the service's workers run: summed images/s."""
    return in_processes(runtime_throughput,
                        (model_dir, providers, threads, seconds, batch_sizes), processes)


def parallel_detector_pipeline_throughput(model_dir: Path, providers: list[str], processes: int,
                                          threads: int, seconds: float, upload: bytes,
                                          detection: dict[str, Any],
                                          batch_sizes=BATCH_SIZES) -> dict[int, float]:
    """detector_pipeline_throughput in the served layout: summed uploads/s."""
    return in_processes(detector_pipeline_throughput,
                        (model_dir, providers, threads, seconds, upload, detection,
                         batch_sizes), processes)


def detector_task(card: ModelCard, detection: dict[str, Any]) -> Detection:
    if card.detection is None:
        raise ValueError(f"{card.name} is not a detector")
    return Detection(card.labels, card.detection, DetectionSettings(**detection))


def decode_cost_ms(model_dir: Path, images: dict[str, Path], seconds: float) -> dict[str, float]:
    """Milliseconds to decode + preprocess one upload, per format, on one core: resized to the
    input for a classifier, letterboxed (the geometry kept) for a detector."""
    card = ModelCard.read(model_dir)
    spec = card.input
    costs = {}
    for fmt, path in images.items():
        data = path.read_bytes()
        if card.task == "detection":
            decode = partial(detector_task(card, {}).decode, data, spec, None)
        else:
            decode = partial(decode_image, data, spec)
        costs[fmt] = 1000.0 / timed_rate(decode, 1, seconds)
    return costs


def detector_stages(model_dir: Path, providers: list[str], upload: bytes,
                    detection: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One image on one core, stage by stage: decode + letterbox, runtime (batch 1),
    post-processing; and what the post-processing found in the upload."""
    card, runtime = open_runtime(model_dir, providers, 1)
    task = detector_task(card, detection)
    pixels, context = task.decode(upload, card.input, None)
    outputs = runtime.outputs(pixels[np.newaxis])

    def post() -> list:
        return task.postprocess(outputs, card.graph, [context], ["bench"], [0.0])

    answer = post()[0]
    return {
        "decode_ms": 1000.0 / timed_rate(partial(task.decode, upload, card.input, None), 1,
                                         seconds),
        "runtime_ms": 1000.0 / timed_rate(partial(runtime.run, pixels[np.newaxis]), 1, seconds),
        "postprocess_ms": 1000.0 / timed_rate(post, 1, seconds),
        "detections": [{"label": d.label, "score": round(d.score, 3), "box": d.box}
                       for d in answer.detections],
    }
