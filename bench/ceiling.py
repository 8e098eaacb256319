"""The limit a server can approach: the same ONNX graph in ONNX Runtime in-process (no HTTP),
with the thread settings the service uses; and what decoding an upload costs alone."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np

from serving.contract import ONNX_FILE, ModelCard
from serving.preprocess import decode_image
from serving.runtime import OnnxRuntime

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def timed_rate(step, items_per_step: int, seconds: float) -> float:
    """Items per second of `step` over at least `seconds` (after one warm-up call)."""
    step()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        step()
        count += 1
    return count * items_per_step / elapsed


def runtime_throughput(model_dir: Path, providers: list[str], threads: int, seconds: float,
                       batch_sizes=BATCH_SIZES) -> dict[int, float]:
    card = ModelCard.read(model_dir)
    runtime = OnnxRuntime(model_dir / ONNX_FILE, card.input, card.graph, providers, threads)
    rng = np.random.default_rng(0)
    rates = {}
    for batch in batch_sizes:
        pixels = rng.integers(0, 256, (batch, *card.input.shape), dtype=np.uint8)
        rates[batch] = timed_rate(partial(runtime.run, pixels), batch, seconds)
    return rates


def _one_process(args: tuple) -> dict[int, float]:
    model_dir, providers, threads, seconds, batch_sizes = args
    return runtime_throughput(model_dir, providers, threads, seconds, batch_sizes)


def parallel_runtime_throughput(model_dir: Path, providers: list[str], processes: int,
                                threads: int, seconds: float,
                                batch_sizes=BATCH_SIZES) -> dict[int, float]:
    """`processes` runtimes side by side, as the service's workers run: summed images/s."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = [(model_dir, providers, threads, seconds, batch_sizes)] * processes
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_one_process, jobs))
    return {b: sum(r[b] for r in results) for b in batch_sizes}


def decode_cost_ms(model_dir: Path, images: dict[str, Path], seconds: float) -> dict[str, float]:
    """Milliseconds to decode + preprocess one upload, per format, on one core."""
    spec = ModelCard.read(model_dir).input
    costs = {}
    for fmt, path in images.items():
        data = path.read_bytes()
        costs[fmt] = 1000.0 / timed_rate(partial(decode_image, data, spec), 1, seconds)
    return costs
