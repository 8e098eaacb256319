"""Request -> variant: which of the served models answers a request.

A request with a routing key (the first of `rollout.sticky_headers` it carries) is hashed onto the
weights, so the same key always lands on the same variant in every worker and every replica;
a request without one is routed at random by weight. The choice is made once per request, when
its first image (or its tensor) is parsed, and kept on the request for the others.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any, Protocol

_STATE_KEY = "image_classifier_variant"


class HasScope(Protocol):
    """A Starlette request, as far as routing needs one."""

    @property
    def scope(self) -> Any: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def unit_interval(key: str) -> float:
    """A key's stable point in [0, 1): not Python's hash(), which differs between processes."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Router:
    def __init__(self, weights: Sequence[float], sticky_headers: Sequence[str]) -> None:
        total = float(sum(weights))
        # Cumulative shares; a variant of weight 0 owns an empty interval and is never chosen.
        self._bounds = [bound / total for bound in accumulate(weights)][:-1]
        self._headers = [h.lower() for h in sticky_headers]
        self.single = len(weights) == 1

    def routing_key(self, headers: Mapping[str, str]) -> str | None:
        for name in self._headers:
            value = headers.get(name)
            if value:
                return value
        return None

    def choose(self, key: str | None) -> int:
        """The index of the variant for this key (random by weight when there is none)."""
        if self.single:
            return 0
        point = unit_interval(key) if key is not None else random.random()
        return bisect.bisect_right(self._bounds, point)

    def for_request(self, request: HasScope) -> int:
        """The variant of a Starlette request, chosen on first call and kept on the request."""
        state = request.scope.setdefault("state", {})
        if _STATE_KEY not in state:
            state[_STATE_KEY] = self.choose(self.routing_key(request.headers))
        index: int = state[_STATE_KEY]
        return index
