"""The runtime batch size chosen at start: the smallest power of two within 10% of the best rate,
sizes tried upwards until one call is too long. Timed by a fake clock (cost per call by size)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.calibration import MAX_CALL_S, best_batch_size, call_seconds


def timed_by(cost: dict[int, float]):
    tried: list[int] = []

    def timed(_run, blank: np.ndarray) -> float:
        tried.append(len(blank))
        return cost[len(blank)]
    return timed, tried


def run(_pixels: np.ndarray) -> None:
    return None


def test_the_size_with_the_best_rate_is_kept() -> None:
    # images/s: 100, 200, 400, 500, 450: best at 8.
    timed, tried = timed_by({1: 0.01, 2: 0.01, 4: 0.01, 8: 0.016, 16: 16 / 450})
    assert best_batch_size(run, (4, 4, 1), 16, timed) == 8
    assert tried == [1, 2, 4, 8, 16]


def test_the_smallest_size_within_tolerance_of_the_best_is_kept() -> None:
    # images/s: 1000, 1800, 1850, 1990: 4 is within 10% of 8's rate, 2 is not.
    timed, _ = timed_by({1: 0.001, 2: 2 / 1800, 4: 4 / 1850, 8: 8 / 1990})
    assert best_batch_size(run, (4, 4, 1), 8, timed) == 4


def test_no_size_above_the_batchers_largest_is_tried() -> None:
    timed, tried = timed_by({1: 0.01, 2: 0.01, 4: 0.01, 8: 0.01})
    assert best_batch_size(run, (4, 4, 1), 6, timed) == 4
    assert tried == [1, 2, 4]


def test_growing_stops_after_a_call_longer_than_the_limit() -> None:
    # images/s rise with size, but the call at 4 is already too long to try 8.
    timed, tried = timed_by({1: MAX_CALL_S * 0.5, 2: MAX_CALL_S * 0.6, 4: MAX_CALL_S * 1.05,
                             8: MAX_CALL_S * 1.5})
    assert best_batch_size(run, (4, 4, 1), 64, timed) == 4
    assert tried == [1, 2, 4]


def test_call_seconds_times_real_calls_on_blank_images() -> None:
    shapes: list[tuple[int, ...]] = []

    def record(pixels: np.ndarray) -> None:
        shapes.append(pixels.shape)
    assert call_seconds(record, np.zeros((3, 4, 4, 1), np.uint8)) > 0
    assert shapes and all(shape == (3, 4, 4, 1) for shape in shapes)


@pytest.mark.parametrize("largest", [1, 2])
def test_a_tiny_largest_size_is_respected(largest: int) -> None:
    timed, _ = timed_by({1: 0.01, 2: 0.001})
    assert best_batch_size(run, (4, 4, 1), largest, timed) == largest
