"""How many images one runtime call takes: measured once per worker at start.

The batcher may hand the predictor 64 images at once, but a CPU runtime is often fastest per
image at 4 to 16 (docs/benchmarks.md's ceiling tables: mobilenet_v3_small at 224x224, 833 img/s
at batch 8 against 636 at 64, with two processes of one thread), and ONNX Runtime's memory
arena keeps the largest batch's activations for the life of the worker. So the predictor runs a
batch in pieces of the size that served best here, on this machine's cores or GPU, with this
model (batching.runtime_batch_size: auto), or of a configured size: run_in_pieces, which the
runtime also uses for a graph exported for one fixed batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

# Sizes within this factor of the best rate count as equally good; the smallest of them is kept
# (less memory, a shorter wait behind a call). Why 10%: timings this short, taken while the other
# workers start, vary by 5-10%, and where the rate is flat the noise chose. resnet18's calls of
# 1 to 8 images answer 59-61 images/s on 2 cores, and 5% kept 1, 2, 4 or 8 from one start to
# the next: an 8-image call holds 25 MB more of ONNX Runtime's arena than a 1-image one, per
# worker, for its life.
TOLERANCE = 1.10
# No larger size is tried once one call takes this long: the worker is starting, and bigger
# pieces would make a lone request wait behind a long call.
MAX_CALL_S = 0.1
# Calls timed per size (the best one counts: the first at a new size allocates, the others
# include the machine's noise).
REPEATS = 2


def call_seconds(run: Callable[[np.ndarray], object], blank: np.ndarray) -> float:
    """The best of REPEATS timed calls on a batch of blank images."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        run(blank)
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def best_batch_size(run: Callable[[np.ndarray], object], shape: tuple[int, ...],
                    largest: int,
                    timed: Callable[[Callable[[np.ndarray], object], np.ndarray], float]
                    = call_seconds) -> int:
    """The smallest power of two up to `largest` whose images per second are within TOLERANCE
    of the best measured (sizes are tried upwards until a call takes MAX_CALL_S). `timed`: how
    a call is timed (call_seconds)."""
    rates: dict[int, float] = {}
    size = 1
    while size <= largest:
        seconds = timed(run, np.zeros((size, *shape), np.uint8))
        rates[size] = size / seconds
        if seconds > MAX_CALL_S:
            break
        size *= 2
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate * TOLERANCE >= best)


def run_in_pieces(run: Callable[[np.ndarray], tuple[np.ndarray, ...]], pixels: np.ndarray,
                  size: int, pad: bool = False) -> tuple[np.ndarray, ...]:
    """`run`'s outputs for every row, `size` rows per call (`pad`: the last call filled up to
    `size` with blank rows, for a graph that takes no other batch size), stacked again."""
    pieces = []
    for start in range(0, len(pixels), size):
        piece = pixels[start:start + size]
        rows = len(piece)
        if pad and rows < size:
            piece = np.concatenate([piece, np.zeros((size - rows, *piece.shape[1:]),
                                                    piece.dtype)])
        pieces.append(tuple(output[:rows] for output in run(piece)))
    return tuple(np.concatenate(outputs) for outputs in zip(*pieces))
