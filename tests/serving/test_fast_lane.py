"""serving.fast_lane: which routes the lane may answer, and when a request is alone. What it
answers is tested against a real server (tests/test_service.py, tests/test_limits.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from serving.admission import BUDGET_STATE, Budget, alone_in_its_budget
from serving.fast_lane import INLINE_MAX_S, Lane, lanes_of
from serving.settings import LimitsSettings


def plain(images: Any) -> Any:
    return images


async def coroutine(images: Any) -> Any:
    return images


def api(route: str, fields: tuple[str, ...] = ("images",), batchable: bool = True,
        ctx_param: str | None = None, func: Any = plain) -> SimpleNamespace:
    return SimpleNamespace(route=route, batchable=batchable, ctx_param=ctx_param, func=func,
                           input_spec=SimpleNamespace(model_fields=dict.fromkeys(fields)))


def test_only_batchable_apis_of_one_input_and_no_context_get_a_lane() -> None:
    lanes = lanes_of({"classify": api("/classify"), "classify_tensor": api("/classify_tensor",
                                                                          ("pixels",)),
                      "model_info": api("/model_info", (), batchable=False),
                      "two": api("/two", ("a", "b")),
                      "with_context": api("/ctx", ctx_param="context"),
                      "async": api("/async", func=coroutine)})
    assert {path: (lane.name, lane.field) for path, lane in lanes.items()} == {
        "/classify": ("classify", "images"), "/classify_tensor": ("classify_tensor", "pixels")}


def scope_with(budget: Budget | None) -> dict[str, Any]:
    return {"state": {BUDGET_STATE: budget}} if budget else {}


def test_a_request_is_alone_when_its_budget_holds_nothing_else() -> None:
    budget = Budget(LimitsSettings(), "limits")
    budget.in_flight = 1  # itself
    assert alone_in_its_budget(scope_with(budget))
    budget.in_flight = 2
    assert not alone_in_its_budget(scope_with(budget)), "another request is in flight"
    budget.in_flight = 1
    budget.waiting.append(asyncio.Future(loop=asyncio.new_event_loop()))
    assert not alone_in_its_budget(scope_with(budget)), "another waits at the gate"
    assert not alone_in_its_budget(scope_with(None)), "not admitted: no budget"


def test_calls_are_run_in_the_loop_only_once_measured_short() -> None:
    lane = Lane("classify", api("/classify"), "images")
    assert lane.call_s >= INLINE_MAX_S, "unmeasured: in a thread"
    for _ in range(20):
        assert lane.timed(lambda value: value * 2, 21) == 42
    assert lane.call_s < INLINE_MAX_S
    with pytest.raises(ZeroDivisionError):
        lane.timed(lambda value: value / 0, 1)


@pytest.mark.parametrize("request_id", [None, 0x1F2E3D4C5B6A7988])
def test_the_lane_adds_the_headers_bentoml_adds_to_its_answers(request_id: int | None) -> None:
    """BentoHeaders reads BentoML's configuration once; what it adds must stay what BentoML's
    own endpoints add (ServiceAppFactory._add_response_headers), with or without a request id."""
    import contextvars

    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.context import trace_context
    from starlette.responses import JSONResponse

    from serving.fast_lane import BentoHeaders

    def both() -> tuple[dict[str, str], dict[str, str]]:
        trace_context.request_id = request_id
        ours, bentoml_s = JSONResponse([]), JSONResponse([])
        BentoHeaders.of("ImageClassifier").add_to(ours)
        factory = SimpleNamespace(service=SimpleNamespace(name="ImageClassifier"))
        ServiceAppFactory._add_response_headers(factory, bentoml_s)
        return dict(ours.headers), dict(bentoml_s.headers)

    ours, bentoml_s = contextvars.copy_context().run(both)
    assert ours == bentoml_s
    assert ours["server"] == "BentoML Service/ImageClassifier"
    assert ("x-bentoml-request-id" in ours) == (request_id is not None)
