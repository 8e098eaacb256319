"""Client -> token bucket: per-client rate limits on the model endpoints (`rate_limit.enabled`,
off by default).

A client is known by the first of `rate_limit.client_key` its request has: its API key (the
bearer token), its X-Client-ID, or its remote address. Each client has a bucket of `burst`
tokens that refills at `requests_per_s`; a request takes one, and a request that finds none is
refused with 429 `rate_limited` and a Retry-After of the seconds until the bucket holds one
again, rounded up. Only the API routes are limited: health, metrics, the docs and the job routes
that poll a result are not. An ASGI middleware outside serving/admission.py (so a limited client
holds none of a worker's `limits.max_concurrency` and its refusal is not reshaped there) and
inside the request log (so refusals are logged with their code).

Across workers. BentoML runs N worker processes (`workers`) that share nothing, and a client's
connections land on any of them. Each worker enforces requests_per_s / N with a bucket of
burst / N (at least one token), as BentoML itself divides `traffic.max_concurrency`. The shares
add up to the configured limit, so in any T seconds a client gets at most burst + requests_per_s
x T answers (more only when burst < N: each worker still lets one request through), however its
requests spread. The error is one-sided: a client whose requests reach the workers unevenly is
refused earlier than its rate, down to 1/N of it when all of them reach one worker (a single
keep-alive connection). Exact sharing (a SQLite file in /dev/shm, a lock across processes) would
cost every request a cross-process lock on the event loop; docs/caching-and-rate-limits.md says
how to get the full rate on one connection.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .admission import refuse
from .asgi import ASGIApp, Receive, Scope, Send, bearer_token, header
from .settings import ClientKey, RateLimitSettings, SharedSettings


class TokenBuckets:
    """One bucket per client: `burst` tokens at most, `rate` tokens a second; the least
    recently seen client's bucket is dropped past `max_clients` (it then starts again full: a
    full bucket loses nothing by being dropped, and the least recently seen is the likeliest to
    be full). One event loop per worker: no lock."""

    def __init__(self, rate: float, burst: float, max_clients: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Take a token from `client`'s bucket: 0.0 when there was one (the request goes on),
        else the seconds until there will be one (nothing is taken)."""
        now = self.clock()
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def client_of(scope: Scope, keys: Sequence[ClientKey]) -> tuple[str, str]:
    """The request's client by the first of `keys` it has: (bucket key, how to name it in a
    refusal). Secrets and long headers are kept as digests."""
    for key in keys:
        if key == "api_key":
            if token := bearer_token(scope):
                return f"api_key:{_digest(token)}", "this API key"
        elif key == "client_id":
            client_id = header(scope, b"x-client-id").strip()
            if client_id:
                return f"client_id:{_digest(client_id)}", f"X-Client-ID {client_id[:64]!r}"
        elif key == "remote_address":
            peer = scope.get("client")
            if peer:
                return f"remote_address:{peer[0]}", f"address {peer[0]}"
    return "anonymous", f"a client without {' or '.join(keys)}"


def _digest(value: str) -> str:
    return hashlib.blake2b(value.encode("latin-1"), digest_size=16).hexdigest()


class RateLimit:
    def __init__(self, app: ASGIApp, *, settings: RateLimitSettings, routes: Iterable[str],
                 workers: int, key: str = "rate_limit") -> None:
        self.app = app
        self.settings = settings
        self.routes = frozenset(routes)
        self.workers = workers
        self.key = key  # where the settings live in configuration.yaml, for messages
        self.buckets = TokenBuckets(settings.requests_per_s / workers,
                                    max(settings.burst / workers, 1.0), settings.max_clients)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" \
                or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        client, named = client_of(scope, self.settings.client_key)
        wait = self.buckets.take(client)
        if wait == 0.0:
            return await self.app(scope, receive, send)
        seconds = max(1, math.ceil(wait))
        limit = self.settings
        await refuse(send, "rate_limited",
                     f"{named} is over its rate limit of {limit.requests_per_s:g} requests/s "
                     f"with bursts of {limit.burst} ({self.key}.requests_per_s and .burst; each "
                     f"of the {self.workers} workers allows a share); retry after {seconds} s",
                     [(b"retry-after", str(seconds).encode())])


def worker_count(config: dict[str, Any]) -> int:
    """The worker processes BentoML starts for a service config (`workers`: a number, or
    cpu_count: the cores BentoML sees, its own count)."""
    workers = config.get("workers") or 1
    if workers == "cpu_count":
        from bentoml._internal.resource import system_resources  # as BentoML counts them

        return max(1, int(system_resources()["cpu"]))
    return max(1, int(workers))


def install_rate_limit(service: Any, settings: SharedSettings, routes: Iterable[str]) -> None:
    """Add the RateLimit middleware to `service` (a bentoml.Service) when it is enabled; call it
    where it goes in the middleware order (serving/wiring.py)."""
    if settings.rate_limit.enabled:
        service.add_asgi_middleware(RateLimit, settings=settings.rate_limit, routes=routes,
                                    workers=worker_count(service.config),
                                    key=settings.where.key("rate_limit"))
