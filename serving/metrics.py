"""The service's own Prometheus metrics, next to BentoML's at /metrics.

Created on first use, while a worker answers a request: prometheus_client picks single- or
multi-process mode when it is imported, and only in a worker is PROMETHEUS_MULTIPROC_DIR sure to be
set (service.py is also imported by the `bentoml serve` parent and by `bentoml build`). A counter
created in single-process mode would never reach /metrics, which sums the workers' files.
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
