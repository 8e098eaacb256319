"""The service's own Prometheus metrics, next to BentoML's at /metrics.

Created on first use, in a worker: prometheus_client picks single- or multi-process mode when it is
imported, and only in a worker is PROMETHEUS_MULTIPROC_DIR sure to be set (service.py is also
imported by the `bentoml serve` parent and by `bentoml build`). A metric created in single-process
mode would never reach /metrics, which sums the workers' files. (BentoML's own `bentoml.metrics`
does the same deferral but is deprecated in 1.4 in favour of prometheus_client.)

Every metric about answers carries `model`, the tag that produced them, so that variants and a
shadow can be compared side by side.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "image_classifier"
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Milliseconds to seconds: from one small image on a GPU to a large batch on a busy CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@functools.cache
def labelled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once per metric and values. prometheus_client checks,
    converts and looks the values up under a lock on every call, several times in every
    request (this service never removes a labelled series, so a child stays valid)."""
    return metric.labels(*values)


@functools.cache
def rejected_requests() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "rejected_requests",
        "Requests refused before or instead of a prediction, by reason (the `error` code of "
        "the answer) and HTTP status.",
        labelnames=["reason", "status"],
        namespace=NAMESPACE,
    )


@functools.cache
def model_info() -> Gauge:
    from prometheus_client import Gauge

    return Gauge(
        "model_info",
        "1 for each model this service loaded: role `variant` (answers, with its `weight`) or "
        "`shadow` (compared, never answers).",
        labelnames=["model", "role", "weight"],
        namespace=NAMESPACE,
        multiprocess_mode="max",
    )


@functools.cache
def worker_connections() -> Gauge:
    from prometheus_client import Gauge

    return Gauge(
        "worker_connections",
        "Active connections each worker holds (serving/balance.py): a request under way, or one "
        "answered in the last 2 s; one series per worker process.",
        labelnames=["service"],
        namespace=NAMESPACE,
        multiprocess_mode="liveall",
    )


@functools.cache
def connections_rebalanced() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "connections_rebalanced",
        "Answers sent with `Connection: close` by a worker that held more than its share of "
        "the service's active connections (serving/balance.py), so that the client reconnects.",
        labelnames=["service"],
        namespace=NAMESPACE,
    )


@functools.cache
def admission_gate() -> Gauge:
    from prometheus_client import Gauge

    return Gauge(
        "admission_gate",
        "Requests at each worker's gate (serving/admission.py), summed over live workers, per "
        "limits section: `waiting` for their turn (body unread), `in_flight` past it, and "
        "`limit`, what the measured pace lets past it (limits.target_wait_ms).",
        labelnames=["limits", "state"],
        namespace=NAMESPACE,
        multiprocess_mode="livesum",
    )


@functools.cache
def fast_lane_answers() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "fast_lane_answers",
        "Requests the fast lane answered (serving/fast_lane.py), by route and how: `alone` "
        "(the model was idle: run at once, counted as a batch of one in "
        "bentoml_service_adaptive_batch_size) or `batched` (handed to BentoML's batcher).",
        labelnames=["route", "how"],
        namespace=NAMESPACE,
    )


@functools.cache
def lone_calls() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "lone_calls",
        "Runtime calls of a request alone in its worker made on the session for calls alone, "
        "no other worker's runtime being busy (serving/cores.py; model.lone_request_threads), "
        "by model.",
        labelnames=["model"],
        namespace=NAMESPACE,
    )


@functools.cache
def routed_requests() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "routed_requests",
        "Requests routed to each variant (once per request, however many images it has).",
        labelnames=["model"],
        namespace=NAMESPACE,
    )


@functools.cache
def predictions() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "predictions",
        "Images answered, by model and predicted class.",
        labelnames=["model", "label"],
        namespace=NAMESPACE,
    )


@functools.cache
def confidence() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "confidence",
        "Probability of the predicted class, per image.",
        labelnames=["model"],
        namespace=NAMESPACE,
        buckets=CONFIDENCE_BUCKETS,
    )


@functools.cache
def detections() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "detections",
        "Objects detected, by model and class.",
        labelnames=["model", "label"],
        namespace=NAMESPACE,
    )


@functools.cache
def detections_per_image() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "detections_per_image",
        "Objects detected in each image (after thresholds, NMS and max_detections).",
        labelnames=["model"],
        namespace=NAMESPACE,
        buckets=(0, 1, 2, 3, 5, 8, 13, 21, 50, 100, 300, 1000),
    )


@functools.cache
def detection_score() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "detection_score",
        "Score of each detection answered.",
        labelnames=["model"],
        namespace=NAMESPACE,
        buckets=CONFIDENCE_BUCKETS,
    )


@functools.cache
def processing_seconds() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "processing_seconds",
        "Per image, from receiving it to its answer (decode, batching wait, inference).",
        labelnames=["model"],
        namespace=NAMESPACE,
        buckets=LATENCY_BUCKETS,
    )


@functools.cache
def shadow_comparisons() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "shadow_comparisons",
        "Images the shadow model classified, by whether its top class agreed with the answer "
        "that was served (agreement rate = agree=\"true\" / all).",
        labelnames=["model", "shadow", "agree"],
        namespace=NAMESPACE,
    )


@functools.cache
def shadow_seconds() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "shadow_inference_seconds",
        "Time the shadow model took per batch (its own process, off the request path).",
        labelnames=["shadow"],
        namespace=NAMESPACE,
        buckets=LATENCY_BUCKETS,
    )


@functools.cache
def shadow_dropped() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "shadow_dropped",
        "Images not copied to the shadow because it was still busy with earlier ones.",
        labelnames=["shadow"],
        namespace=NAMESPACE,
    )


def _cache_counter(name: str, documentation: str) -> Counter:
    from prometheus_client import Counter

    return Counter(name, documentation, labelnames=["model"], namespace=NAMESPACE)


@functools.cache
def cache_hits() -> Counter:
    return _cache_counter("cache_hits", "Uploads answered from the result cache, without "
                          "decoding or inference (hit ratio = hits / (hits + misses)).")


@functools.cache
def cache_misses() -> Counter:
    return _cache_counter("cache_misses", "Uploads looked up in the result cache and not "
                          "found (then decoded and run, and their answers kept).")


@functools.cache
def cache_evictions() -> Counter:
    return _cache_counter("cache_evictions", "Answers dropped from the result cache, least "
                          "recently used first, to stay within cache.max_entries and "
                          "cache.max_bytes.")


@functools.cache
def image_pixels() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "image_pixels",
        "Size of each uploaded image as sent (width x height, before resizing).",
        namespace=NAMESPACE,
        buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8),
    )


@functools.cache
def upload_bytes() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "upload_bytes",
        "Size of each uploaded image file in bytes.",
        namespace=NAMESPACE,
        buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7),
    )


def _drift_gauge(name: str, documentation: str) -> Gauge:
    from prometheus_client import Gauge

    # Each worker tests the traffic it sees: one series per worker (pid), alive ones only.
    return Gauge(name, documentation, labelnames=["model"], namespace=NAMESPACE,
                 multiprocess_mode="liveall")


@functools.cache
def drift_statistic() -> Gauge:
    return _drift_gauge("drift_statistic", "Kernel MMD between the recent window of features "
                        "and the training reference (larger: further apart).")


@functools.cache
def drift_p_value() -> Gauge:
    return _drift_gauge("drift_p_value", "Permutation p-value of the MMD test: small means the "
                        "recent inputs are unlikely to come from the training distribution.")


@functools.cache
def drift_detected() -> Gauge:
    return _drift_gauge("drift_detected", "1 when the last test's p-value was below "
                        "drift.p_value_threshold.")


@functools.cache
def drift_window_size() -> Gauge:
    return _drift_gauge("drift_window_size", "Images in the window the last test used.")


@functools.cache
def drift_reference_size() -> Gauge:
    return _drift_gauge("drift_reference_size", "Training images in the reference sample.")


@functools.cache
def drift_last_computed() -> Gauge:
    return _drift_gauge("drift_last_computed_timestamp_seconds",
                        "Unix time of the last drift test.")
