"""The service's own Prometheus metrics, next to BentoML's at /metrics.

Created on first use, in the worker process: prometheus_client picks its multiprocess mode when it
is imported, and BentoML sets PROMETHEUS_MULTIPROC_DIR in a worker only after service.py has been
imported. Imported earlier, the counters would live in one process and never reach /metrics.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter

NAMESPACE = "image_classifier"


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
