"""Router: weights, sticky keys, weight-0 variants, the choice kept per request."""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace

from serving.routing import Router, unit_interval
from tests.helpers import python


def test_keys_split_by_weight_and_always_land_on_the_same_variant() -> None:
    router = Router([90, 10], ["X-Client-ID"])
    choices = [router.choose(f"user-{i}") for i in range(20_000)]
    assert 0.09 < Counter(choices)[1] / len(choices) < 0.11
    assert choices == [router.choose(f"user-{i}") for i in range(20_000)]


def point_and_hash_in_a_new_process(key: str, hash_seed: int) -> tuple[float, int]:
    """unit_interval(key) and Python's hash(key), computed in a process of its own."""
    code = ("import json; from serving.routing import unit_interval; "
            f"print(json.dumps([unit_interval({key!r}), hash({key!r})]))")
    result = python("-c", code, env={**os.environ, "PYTHONHASHSEED": str(hash_seed)}, timeout=60)
    assert result.returncode == 0, result.stderr
    point, hashed = json.loads(result.stdout)
    return point, hashed


def test_the_key_point_does_not_depend_on_the_process() -> None:
    # blake2b, not hash(): the same on every worker and replica, whose PYTHONHASHSEED differs.
    seen = {seed: point_and_hash_in_a_new_process("client-42", seed) for seed in (1, 2, 3)}
    assert len({hashed for _, hashed in seen.values()}) == 3, "the hash seeds did not take effect"
    points = {seed: point for seed, (point, _) in seen.items()}
    assert len(set(points.values())) == 1, f"the key's point moved with PYTHONHASHSEED: {points}"


def test_the_key_point_is_pinned() -> None:
    # Changing the function re-routes every user with a routing key to a possibly other variant.
    assert abs(unit_interval("client-42") - 0.54288) < 1e-5


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
    assert all(router.for_request(request) == first for _ in range(20))
