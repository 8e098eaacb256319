"""call_with_retries: 429 and 503 are retried with growing, jittered pauses; nothing else is."""

from __future__ import annotations

from http import HTTPStatus

import httpx
import pytest
from bentoml.exceptions import BentoMLException

from classifier_client import call_with_retries


def flaky(statuses: list[int]):
    """A call that fails with each status in turn, then answers 'ok'."""
    remaining = list(statuses)

    def call() -> str:
        if remaining:
            status = remaining.pop(0)
            raise BentoMLException(f"{status}", error_code=HTTPStatus(status))
        return "ok"

    return call


def test_overload_answers_are_retried_with_growing_pauses() -> None:
    pauses: list[float] = []
    assert call_with_retries(flaky([429, 503, 503]), sleep=pauses.append,
                             first_delay_s=1.0) == "ok"
    assert len(pauses) == 3
    for attempt, pause in enumerate(pauses):
        assert 2**attempt / 2 <= pause <= 2**attempt  # jittered within [delay/2, delay]


def test_the_pause_is_capped() -> None:
    pauses: list[float] = []
    call_with_retries(flaky([503] * 7), attempts=8, sleep=pauses.append, first_delay_s=1.0,
                      max_delay_s=3.0)
    assert max(pauses) <= 3.0


def test_client_errors_are_not_retried() -> None:
    pauses: list[float] = []
    with pytest.raises(BentoMLException):
        call_with_retries(flaky([422]), sleep=pauses.append)
    assert pauses == []


def test_the_last_refusal_is_raised_when_attempts_run_out() -> None:
    with pytest.raises(BentoMLException) as caught:
        call_with_retries(flaky([503] * 5), attempts=3, sleep=lambda _: None)
    assert caught.value.error_code == HTTPStatus.SERVICE_UNAVAILABLE


def test_plain_http_refusals_follow_the_same_policy() -> None:
    """httpx's errors (the detector's client) are retried on 429 and 503 only, like BentoML's."""
    request = httpx.Request("POST", "http://service/detect")
    remaining = [429, 503]

    def call() -> str:
        if remaining:
            response = httpx.Response(remaining.pop(0), request=request)
            raise httpx.HTTPStatusError("busy", request=request, response=response)
        return "ok"

    pauses: list[float] = []
    assert call_with_retries(call, sleep=pauses.append) == "ok" and len(pauses) == 2
    refused = httpx.Response(422, request=request)
    with pytest.raises(httpx.HTTPStatusError):
        call_with_retries(lambda: refused.raise_for_status(), sleep=pauses.append)
    assert len(pauses) == 2, "a 422 is not retried"
