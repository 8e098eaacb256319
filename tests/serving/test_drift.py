"""serving.drift: the numpy kernel MMD agrees with TorchDrift's KernelMMDDriftDetector; the
window is bounded and keeps the newest features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchdrift

from serving import drift
from serving.drift import DriftMonitor, kernel_mmd, lower_median

PERMUTATIONS = 1000


def samples(seed: int, shift: float, n: int = 150, m: int = 300, d: int = 16):
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(m, d)).astype(np.float32)
    window = rng.normal(size=(n, d)).astype(np.float32)
    window[:, : d // 2] += shift  # half the features move
    return window, reference


def torchdrift_mmd(window: np.ndarray, reference: np.ndarray, kernel) -> tuple[float, float]:
    detector = torchdrift.detectors.KernelMMDDriftDetector(
        return_p_value=True, n_perm=PERMUTATIONS, kernel=kernel)
    detector.fit(torch.from_numpy(reference))
    torch.manual_seed(0)
    statistic, p_value = detector.predict_shift_from_features(
        detector.base_outputs, torch.from_numpy(window), compute_score=True,
        compute_p_value=True)
    return float(statistic), float(p_value)


KERNELS = {
    "gaussian": torchdrift.detectors.mmd.GaussianKernel(),
    "exponential": torchdrift.detectors.mmd.ExpKernel(),
    "rational_quadratic": torchdrift.detectors.mmd.RationalQuadraticKernel(),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("seed, shift", [(0, 0.0), (1, 0.0), (2, 0.3), (3, 1.0)])
def test_statistic_and_decision_agree_with_torchdrift(kernel, seed, shift) -> None:
    window, reference = samples(seed, shift)
    expected_statistic, expected_p = torchdrift_mmd(window, reference, KERNELS[kernel])
    statistic, p_value = kernel_mmd(window, reference, PERMUTATIONS, kernel,
                                    np.random.default_rng(seed))
    assert statistic == pytest.approx(expected_statistic, rel=1e-3, abs=1e-6)
    # p-values are Monte Carlo estimates: same decision at 0.01, and close.
    assert (p_value < 0.01) == (expected_p < 0.01), (p_value, expected_p)
    assert abs(p_value - expected_p) < 0.06, (p_value, expected_p)
    if shift >= 0.3:
        assert p_value < 0.01
    if shift == 0.0:
        assert p_value > 0.01


def test_the_bandwidth_is_torch_median() -> None:
    values = np.array([[0.0, 3.0], [1.0, 2.0]])
    assert lower_median(values) == float(torch.tensor(values).median()) == 1.0


def test_the_window_keeps_the_newest_features() -> None:
    reference = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    monitor = DriftMonitor("m:v1", reference, window_size=30, min_samples=20, interval_s=3600,
                           permutations=100, threshold=0.01)
    for start in range(0, 100, 7):  # 100 rows in uneven batches, wrapping the ring buffer
        rows = np.arange(start, min(start + 7, 100), dtype=np.float32)
        monitor.observe(np.repeat(rows[:, None], 4, axis=1))
    assert sorted(monitor.window[:, 0].astype(int)) == list(range(70, 100))
    assert monitor.state().observed == 100
    state = monitor.test_now()
    assert state.window_size == 30 and state.observed_at_test == 100 and state.drift is True


def test_the_test_runs_blas_on_its_own_thread_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenBLAS's pool runs at the worker's normal priority: the test must not use it
    (serving/drift.py, one_blas_thread), and the limit ends with the test."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    limits = threadpool_limits(limits=2, user_api="blas")  # a pool to hold back, on any machine
    before = blas_threads()
    assert before and 1 not in before, "numpy's BLAS, on 2 threads"
    during: list[list[int]] = []

    def recording_mmd(*args: object, **kwargs: object) -> tuple[float, float]:
        during.append(blas_threads())
        return kernel_mmd(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(drift, "kernel_mmd", recording_mmd)
    reference = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    monitor = DriftMonitor("m:v1", reference, window_size=30, min_samples=20, interval_s=3600,
                           permutations=100, threshold=0.01)
    monitor.observe(reference[:30])
    try:
        monitor.test_now()
        assert during == [[1] * len(before)]
        assert blas_threads() == before
    finally:
        limits.restore_original_limits()
