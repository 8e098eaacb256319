"""Router: weights, sticky keys, weight-0 variants, the choice kept per request."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from serving.routing import Router, unit_interval


def test_keys_split_by_weight_and_always_land_on_the_same_variant() -> None:
    router = Router([90, 10], ["X-Client-ID"])
    choices = [router.choose(f"user-{i}") for i in range(20_000)]
    assert 0.09 < Counter(choices)[1] / len(choices) < 0.11
    assert choices == [router.choose(f"user-{i}") for i in range(20_000)]


def test_the_key_point_does_not_depend_on_the_process() -> None:
    # blake2b, not hash(): the same on every worker and replica (PYTHONHASHSEED differs).
    assert unit_interval("client-42") == unit_interval("client-42")
    assert abs(unit_interval("client-42") - 0.54288) < 1e-5  # pinned: changing it re-routes users


def test_a_variant_of_weight_zero_is_never_chosen() -> None:
    router = Router([90, 0, 10], [])
    chosen = Counter(router.choose(f"k{i}") for i in range(5000)) + Counter(
        router.choose(None) for _ in range(5000))
    assert set(chosen) == {0, 2}


def test_the_first_header_present_is_the_key() -> None:
    router = Router([1, 1], ["X-Client-ID", "X-Request-ID"])
    assert router.routing_key({"x-request-id": "r1", "x-client-id": "c1"}) == "c1"
    assert router.routing_key({"x-request-id": "r1"}) == "r1"
    assert router.routing_key({}) is None


def test_one_choice_per_request() -> None:
    router = Router([1, 1], ["X-Client-ID"])
    request = SimpleNamespace(scope={}, headers={})
    first = router.for_request(request)
    assert first[1] is True
    assert all(router.for_request(request) == (first[0], False) for _ in range(20))
