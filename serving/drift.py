"""Online data drift: are today's inputs still like the training data?

Each served model that was exported with reference features (penultimate-layer features of a
sample of its training images, `card.drift_reference`) gets a DriftMonitor. The request path only
copies each answered batch's features into a bounded window (a ring buffer); a daemon thread,
at the lowest CPU priority, periodically runs a kernel MMD two-sample test of the window against
the reference and publishes the statistic, the p-value and a drift flag (p < threshold) as
gauges and through POST /drift.

The test is TorchDrift's `KernelMMDDriftDetector` (Gretton et al., JMLR 2012) in numpy, so that
serving stays torch-free: Gaussian kernel exp(-d^2 / (2 l^2)) with l the (lower) median of all
pairwise distances of the pooled samples, the statistic
    sum K_xx / (n(n-1)) + sum K_yy / (m(m-1)) - 2 sum K_xy / (nm)      (diagonals included),
and the p-value as the share of random relabellings of the pooled samples whose statistic is
larger. tests/serving/test_drift.py checks it against TorchDrift on the same data. The
permutations are done as one matrix product (K @ indicator columns) instead of TorchDrift's
loop of permuted copies: the same statistics, without allocating a matrix per permutation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from . import metrics

logger = logging.getLogger("bentoml.image_classifier.drift")

KERNELS = ("gaussian", "exponential", "rational_quadratic")


def pairwise_distances(pooled: np.ndarray) -> np.ndarray:
    squares = (pooled * pooled).sum(axis=1)
    d2 = squares[:, None] + squares[None, :] - 2.0 * (pooled @ pooled.T)
    distances: np.ndarray = np.sqrt(np.maximum(d2, 0.0))
    return distances


def lower_median(values: np.ndarray) -> float:
    """torch.median's median: the lower of the two middle values of an even count."""
    flat = values.ravel()
    return float(np.partition(flat, (flat.size - 1) // 2)[(flat.size - 1) // 2])


def kernel_matrix(distances: np.ndarray, kernel: str = "gaussian") -> np.ndarray:
    """TorchDrift's unnormalized kernels, with the median-distance lengthscale."""
    scale = lower_median(distances)
    if kernel == "gaussian":
        return np.exp((-0.5 / scale**2) * distances**2)
    if kernel == "exponential":
        return np.exp((-1.0 / scale) * distances)
    if kernel == "rational_quadratic":  # alpha = 1
        return 1.0 / (1.0 + distances**2 / (2.0 * scale**2))
    raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")


def mmd_from_sums(xx: np.ndarray, xy: np.ndarray, yy: np.ndarray, n: int, m: int
                  ) -> np.ndarray:
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def kernel_mmd(x: np.ndarray, y: np.ndarray, permutations: int = 1000,
               kernel: str = "gaussian", rng: np.random.Generator | None = None,
               ) -> tuple[float, float]:
    """(MMD statistic, permutation p-value) of samples x (n, d) and y (m, d)."""
    n, m = len(x), len(y)
    pooled = np.concatenate([x, y]).astype(np.float64)
    k = kernel_matrix(pairwise_distances(pooled), kernel)
    total = k.sum()
    row_sums = k.sum(axis=1)

    def statistic(in_x: np.ndarray) -> np.ndarray:  # in_x: (n+m, P) indicator columns, n ones each
        k_in_x = k @ in_x
        xx = (in_x * k_in_x).sum(axis=0)
        xy = (in_x * row_sums[:, None]).sum(axis=0) - xx
        yy = total - 2.0 * xy - xx
        return mmd_from_sums(xx, xy, yy, n, m)

    observed = np.zeros((n + m, 1))
    observed[:n] = 1.0
    mmd = float(statistic(observed)[0])
    rng = rng or np.random.default_rng()
    larger = 0
    for start in range(0, permutations, 250):  # bounded memory: (n+m) x 250 at a time
        count = min(250, permutations - start)
        order = rng.permuted(np.tile(np.arange(n + m), (count, 1)), axis=1)
        in_x = np.zeros((n + m, count))
        np.put_along_axis(in_x, order[:, :n].T, 1.0, axis=0)
        larger += int((statistic(in_x) > mmd).sum())
    return mmd, larger / permutations


@dataclass(frozen=True)
class DriftState:
    model: str
    window_size: int
    window_capacity: int
    reference_size: int
    observed: int              # images seen by this worker since start
    observed_at_test: int      # ... when the last test ran
    statistic: float | None
    p_value: float | None
    threshold: float
    drift: bool | None         # None until a test has run
    last_computed: float | None  # unix time
    worker_pid: int


# Tests take turns: a monitor's thread and POST /drift {test_now}, and the monitors of a worker's
# models, whose tests each set the process's BLAS limit and restore what they found (one that
# overlapped another would restore the limit the other set).
ONE_TEST_AT_A_TIME = threading.Lock()


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """numpy's BLAS (OpenBLAS) on the calling thread alone, for the test's matrix products.
    Why: OpenBLAS splits a product over a pool of threads it made when numpy was loaded, at the
    worker's normal priority, so the test's lowest priority (`DriftMonitor._run`) held for its
    own thread only, and each test took every core from the serving threads for as long as it
    ran. On one thread it takes what that priority leaves. threadpoolctl (scikit-learn's) finds
    the loaded BLAS and sets its threads; process-wide while the test runs, which costs the
    request path nothing (its arrays are far too small for BLAS to split)."""
    from threadpoolctl import threadpool_limits

    limits: contextlib.AbstractContextManager[object] = threadpool_limits(limits=1,
                                                                           user_api="blas")
    return limits


class DriftMonitor:
    def __init__(self, model: str, reference: np.ndarray, window_size: int, min_samples: int,
                 interval_s: float, permutations: int, threshold: float) -> None:
        self.model = model
        self.reference = reference.astype(np.float32)
        self.window = np.zeros((window_size, reference.shape[1]), np.float32)
        self.min_samples = min_samples
        self.interval_s = interval_s
        self.permutations = permutations
        self.threshold = threshold
        self._lock = threading.Lock()
        self._next = self._filled = self._observed = 0
        self._state = self._snapshot(None, None, None, 0)
        self._rng = np.random.default_rng()
        threading.Thread(target=self._run, name=f"drift-{model}", daemon=True).start()
        metrics.drift_reference_size().labels(model).set(len(reference))

    def observe(self, features: np.ndarray) -> None:
        """On the request path: copy a batch's features into the ring buffer; O(batch)."""
        features = features[-len(self.window):]
        with self._lock:
            end = self._next + len(features)
            if end <= len(self.window):
                self.window[self._next:end] = features
            else:
                split = len(self.window) - self._next
                self.window[self._next:] = features[:split]
                self.window[:end - len(self.window)] = features[split:]
            self._next = end % len(self.window)
            self._filled = min(len(self.window), self._filled + len(features))
            self._observed += len(features)

    def state(self) -> DriftState:
        """The last test's result, with the count of images seen up to now."""
        return replace(self._state, observed=self._observed)

    def test_now(self) -> DriftState:
        """Run the test on the current window (also what the thread does every interval)."""
        with self._lock:
            sample = self.window[:self._filled].copy()
            observed = self._observed
        if len(sample) < self.min_samples:
            return self._state
        with ONE_TEST_AT_A_TIME, one_blas_thread():
            statistic, p_value = kernel_mmd(sample, self.reference, self.permutations,
                                            rng=self._rng)
        state = self._snapshot(statistic, p_value, time.time(), observed, len(sample))
        self._state = state
        self._publish(state)
        return state

    def _snapshot(self, statistic: float | None, p_value: float | None, computed: float | None,
                  observed_at_test: int, size: int = 0) -> DriftState:
        return DriftState(
            model=self.model, window_size=size, window_capacity=len(self.window),
            reference_size=len(self.reference), observed=self._observed,
            observed_at_test=observed_at_test, statistic=statistic, p_value=p_value,
            threshold=self.threshold,
            drift=None if p_value is None else bool(p_value < self.threshold),
            last_computed=computed, worker_pid=os.getpid())

    def _publish(self, state: DriftState) -> None:
        labels = (self.model,)
        nan = float("nan")  # before the first test: no value yet
        metrics.drift_statistic().labels(*labels).set(
            nan if state.statistic is None else state.statistic)
        metrics.drift_p_value().labels(*labels).set(nan if state.p_value is None else state.p_value)
        metrics.drift_detected().labels(*labels).set(1 if state.drift else 0)
        metrics.drift_window_size().labels(*labels).set(state.window_size)
        metrics.drift_last_computed().labels(*labels).set(
            nan if state.last_computed is None else state.last_computed)
        if state.drift:
            logger.warning("drift: model %s, MMD %.4g, p-value %.4f < %g over the last %d images",
                           self.model, state.statistic, state.p_value, self.threshold,
                           state.window_size)

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        while True:
            time.sleep(self.interval_s)
            if self._observed == self._state.observed_at_test:
                continue  # no new images since the last test: the same answer again
            try:
                self.test_now()
            except Exception:  # the monitor must never take the service down
                logger.exception("drift test for %s failed", self.model)
