"""Retries for the answers that mean "not now": 429 (a worker's concurrency limit) and 503 (the
batcher cannot keep its latency bound). Exponential backoff with jitter, so that clients refused
together do not come back together. Everything else, a 4xx for bad input included, is raised.

One policy for both ways this package calls the service: BentoML's client (which raises
`BentoMLException`) and plain httpx (`httpx.HTTPStatusError`, for what BentoML's client cannot
send, such as /detect's threshold fields)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import bentoml
import httpx
from bentoml.exceptions import BentoMLException

T = TypeVar("T")
RETRYABLE = frozenset({429, 503})


def status_of(exc: BentoMLException | httpx.HTTPStatusError) -> int:
    """The HTTP status a refusal carries, whichever client raised it."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    return exc.error_code.value if exc.error_code else 500


def call_with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 6,
    first_delay_s: float = 0.25,
    max_delay_s: float = 4.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    for attempt in range(attempts):
        try:
            return call()
        except (BentoMLException, httpx.HTTPStatusError) as exc:
            if status_of(exc) not in RETRYABLE or attempt == attempts - 1:
                raise
            delay = min(max_delay_s, first_delay_s * 2**attempt)
            sleep(random.uniform(delay / 2, delay))
    raise AssertionError("unreachable: the last attempt returns or raises")


class RetryingClient:
    """`bentoml.SyncHTTPClient` for this service; `api_key` is sent as `Authorization: Bearer`."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60,
                 attempts: int = 6) -> None:
        self._client = bentoml.SyncHTTPClient(url, token=api_key, timeout=timeout_s)
        self.attempts = attempts

    def classify(self, images: Sequence[Path]) -> list[dict[str, Any]]:
        return call_with_retries(lambda: self._client.classify(images=list(images)),
                                 attempts=self.attempts)

    def classify_tensor(self, pixels: Any) -> list[dict[str, Any]]:
        return call_with_retries(lambda: self._client.classify_tensor(pixels=pixels),
                                 attempts=self.attempts)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RetryingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
