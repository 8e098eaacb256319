"""Rate limits: the token bucket on an injected clock (burst, refill, Retry-After, forgotten
clients), who a client is, and the middleware over raw ASGI calls: 429 `rate_limited` with
Retry-After on API routes only, counted by reason, each worker enforcing its 1/N share."""

from __future__ import annotations

from typing import Any

import prometheus_client
import pytest

from serving.rate_limit import (
    RateLimit,
    TokenBuckets,
    client_of,
    install_rate_limit,
    worker_count,
)
from serving.settings import (
    ClassifierSettings,
    ConfigurationError,
    RateLimitSettings,
    parse_settings,
)
from tests.helpers import http_scope, run_asgi


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def buckets(rate: float, burst: float, max_clients: int = 100) -> tuple[TokenBuckets, Clock]:
    clock = Clock()
    return TokenBuckets(rate, burst, max_clients, clock), clock


def test_a_full_bucket_lets_a_burst_through_then_refuses() -> None:
    limiter, _ = buckets(rate=2.0, burst=3)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5), "one token at 2/s: half a second away"


def test_the_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    limiter, clock = buckets(rate=2.0, burst=3)
    for _ in range(3):
        limiter.take("a")
    clock.now += 0.25  # half a token
    assert limiter.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take("a") == 0.0
    clock.now += 3600  # idle for an hour: full again, no more than full
    assert [limiter.take("a") for _ in range(4)][:3] == [0.0] * 3
    assert limiter.take("a") > 0


def test_a_refused_request_takes_nothing() -> None:
    limiter, clock = buckets(rate=1.0, burst=1)
    limiter.take("a")
    for _ in range(50):  # hammering while empty does not push the next token away
        assert limiter.take("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.take("a") == 0.0


def test_over_a_window_a_client_gets_burst_plus_rate_times_time() -> None:
    limiter, clock = buckets(rate=5.0, burst=4)
    allowed = 0
    for _ in range(1000):  # a request every 10 ms for 10 s
        allowed += limiter.take("a") == 0.0
        clock.now += 0.01
    # The last request comes at 9.99 s: up to one token short of burst + rate x 10 s.
    assert 4 + 5 * 10 - 1 <= allowed <= 4 + 5 * 10, allowed


def test_clients_have_buckets_of_their_own() -> None:
    limiter, _ = buckets(rate=1.0, burst=1)
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    assert limiter.take("b") == 0.0, "another client is not refused for the first one's use"


def test_past_max_clients_the_least_recently_seen_is_forgotten() -> None:
    limiter, _ = buckets(rate=1.0, burst=1, max_clients=2)
    limiter.take("a")
    limiter.take("b")
    limiter.take("a")  # a is now the most recently seen
    limiter.take("c")
    assert len(limiter) == 2
    assert limiter.take("b") == 0.0, "b was forgotten: it starts again with a full bucket"
    assert limiter.take("c") > 0, "c is remembered: still empty"


# --- who a client is ---------------------------------------------------------------------------

def scope(headers: dict[str, str] | None = None, path: str = "/classify",
          method: str = "POST", peer: str = "10.0.0.7") -> dict[str, Any]:
    return {**http_scope(path, method, headers), "client": (peer, 50000)}


KEY = "k" * 32


def test_the_first_key_the_request_has_names_its_client() -> None:
    order: list[Any] = ["api_key", "client_id", "remote_address"]
    both = scope({"Authorization": f"Bearer {KEY}", "X-Client-ID": "app-1"})
    assert client_of(both, order)[1] == "this API key"
    assert KEY not in client_of(both, order)[0], "the key is kept as a digest"
    assert client_of(scope({"X-Client-ID": "app-1"}), order)[1] == "X-Client-ID 'app-1'"
    assert client_of(scope(), order) == ("remote_address:10.0.0.7", "address 10.0.0.7")
    assert client_of(both, ["client_id", "api_key"])[1] == "X-Client-ID 'app-1'"
    assert client_of(scope({"Authorization": "Basic abc"}), ["api_key"])[0] == "anonymous"


def test_two_api_keys_are_two_clients() -> None:
    first = client_of(scope({"Authorization": f"Bearer {KEY}"}), ["api_key"])[0]
    second = client_of(scope({"Authorization": f"Bearer {KEY}x"}), ["api_key"])[0]
    assert first != second


# --- the middleware ------------------------------------------------------------------------------

async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"[]"})


def limited(workers: int = 1, **settings: Any) -> tuple[RateLimit, Clock]:
    config = RateLimitSettings(enabled=True, **{"requests_per_s": 1.0, "burst": 2, **settings})
    middleware = RateLimit(ok_app, settings=config, routes=["/classify", "/classify_tensor"],
                           workers=workers, key="services.ImageClassifier.image_classifier."
                           "rate_limit")
    clock = Clock()
    middleware.buckets.clock = clock
    return middleware, clock


def rejected(reason: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(
        "image_classifier_rejected_requests_total", {"reason": reason, "status": "429"}) or 0.0


def test_over_its_rate_a_client_gets_429_with_retry_after_and_the_error_body() -> None:
    middleware, _ = limited(requests_per_s=0.4, burst=2)
    before = rejected("rate_limited")
    statuses = [run_asgi(middleware, scope({"X-Client-ID": "greedy"})).status for _ in range(2)]
    assert statuses == [200, 200]
    answer = run_asgi(middleware, scope({"X-Client-ID": "greedy"}))
    assert answer.status == 429
    assert answer.headers["retry-after"] == "3", "1 token at 0.4/s: 2.5 s, rounded up"
    body = answer.json()
    assert body["error"] == "rate_limited" and set(body) == {"error", "detail"}
    assert "X-Client-ID 'greedy'" in body["detail"] and "rate_limit.requests_per_s" in \
        body["detail"]
    assert rejected("rate_limited") == before + 1, "counted in /metrics by reason"
    assert run_asgi(middleware, scope({"X-Client-ID": "polite"})).status == 200


def test_only_api_routes_are_limited() -> None:
    middleware, _ = limited(burst=1)
    run_asgi(middleware, scope())
    assert run_asgi(middleware, scope()).status == 429
    for path, method in (("/metrics", "GET"), ("/livez", "GET"), ("/readyz", "GET"),
                         ("/docs.json", "GET"), ("/", "GET"),
                         ("/classify_batch/status", "GET")):
        assert run_asgi(middleware, scope(path=path, method=method)).status == 200, path
    assert run_asgi(middleware, scope(method="OPTIONS")).status == 200, "CORS preflights pass"


def test_each_worker_enforces_its_share_of_rate_and_burst() -> None:
    middleware, clock = limited(workers=4, requests_per_s=8.0, burst=8)
    assert middleware.buckets.rate == 2.0 and middleware.buckets.burst == 2.0
    assert [run_asgi(middleware, scope()).status for _ in range(3)] == [200, 200, 429]
    clock.now += 0.5  # one token at this worker's 2/s
    assert run_asgi(middleware, scope()).status == 200


def test_a_burst_smaller_than_the_workers_still_lets_one_request_through_per_worker() -> None:
    middleware, _ = limited(workers=4, requests_per_s=1.0, burst=2)
    assert middleware.buckets.burst == 1.0
    assert run_asgi(middleware, scope()).status == 200


def test_the_worker_count_is_bentomls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_count({"workers": 3}) == 3
    assert worker_count({}) == 1
    import bentoml._internal.resource as resource

    monkeypatch.setattr(resource, "system_resources", lambda: {"cpu": 3.0})
    assert worker_count({"workers": "cpu_count"}) == 3  # the cores BentoML counts


class FakeService:
    def __init__(self, workers: Any) -> None:
        self.config = {"workers": workers}
        self.middlewares: list[tuple[Any, dict[str, Any]]] = []

    def add_asgi_middleware(self, cls: Any, **options: Any) -> None:
        self.middlewares.append((cls, options))


def test_installed_only_when_enabled_with_the_services_worker_count() -> None:
    off = FakeService(2)
    install_rate_limit(off, ClassifierSettings(), ["/classify"])
    assert off.middlewares == []
    on = FakeService(2)
    settings = parse_settings({"services": {"ImageClassifier": {"image_classifier": {
        "rate_limit": {"enabled": True, "requests_per_s": 5, "burst": 10}}}}})
    install_rate_limit(on, settings, ["/classify"])
    [(cls, options)] = on.middlewares
    assert cls is RateLimit and options["workers"] == 2
    assert options["key"] == "services.ImageClassifier.image_classifier.rate_limit"


def test_settings_are_off_by_default_and_refuse_unknown_client_keys() -> None:
    assert RateLimitSettings().enabled is False
    for wrong in ({"client_key": ["ip"]}, {"client_key": []},
                  {"client_key": ["client_id", "client_id"]}, {"requests_per_s": 0},
                  {"burst": 0}):
        with pytest.raises(ConfigurationError, match="rate_limit"):
            parse_settings({"services": {"ImageClassifier": {"image_classifier": {
                "rate_limit": wrong}}}})
