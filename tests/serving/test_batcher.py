"""The dispatch rule (serving/batcher.py) on BentoML's own dispatcher class: a lone request
leaves at once, whatever max_latency_ms allows; while a batch runs the next one collects
everything queued; a request that cannot be answered in time is refused (BentoML's fallback)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from _bentoml_impl.server import app
from bentoml._internal.marshal.dispatcher import CorkDispatcher, Job
from bentoml.exceptions import ServiceUnavailable

from serving import batcher
from serving.batcher import EagerDispatcher, RefillDispatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # BentoML's dispatcher is asyncio's


# Generous: a dispatcher that waited for company would hold a lone request for seconds.
DEADLINE_S = 5.0


def fallback() -> None:
    raise ServiceUnavailable("process is overloaded")


def dispatcher(max_latency_ms: int = 3_600_000, max_batch_size: int = 64) -> EagerDispatcher:
    return EagerDispatcher(max_latency_ms, max_batch_size, fallback=fallback,
                           get_batch_size=lambda _: 1)


class Runtime:
    """A batch callback that records its batches; `gate` holds a batch until it is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, batch: Sequence[int]) -> list[int]:
        self.batches.append(list(batch))
        self.started.set()
        await self.gate.wait()
        return [x * 10 for x in batch]


async def test_lone_requests_leave_at_once_with_an_hour_of_latency_allowed() -> None:
    runtime = Runtime()
    call = dispatcher()(runtime)
    for value in range(30):
        assert await asyncio.wait_for(call(value), DEADLINE_S) == value * 10
    assert runtime.batches == [[value] for value in range(30)]


async def test_after_a_busy_period_a_lone_request_still_leaves_at_once() -> None:
    # BentoML's CorkDispatcher holds a request while n x (its age + 1 ms + a) <= 0.95 x the
    # mean wait of recent batches: after a busy spell whose batches waited 10 s, a lone
    # request waits about 9.5 s, and adds its own wait to that mean.
    runtime = Runtime()
    served = dispatcher()
    call = served(runtime)
    for value in range(30):  # past BentoML's training batches
        await asyncio.wait_for(call(value), DEADLINE_S)
    for _ in range(60):
        served.optimizer.log_outbound(n=32, wait=10.0, duration=0.01)
    served.optimizer.trigger_refresh()
    assert served.optimizer.wait == pytest.approx(10.0)
    for value in range(3):
        assert await asyncio.wait_for(call(value), DEADLINE_S) == value * 10


async def queued_behind_a_running_batch(runtime: Runtime, call, queued: int) -> list[int]:
    """Request 0 runs alone, held, while requests 1 to `queued` queue; then all are answered."""
    runtime.gate.clear()
    first = asyncio.ensure_future(call(0))
    await asyncio.wait_for(runtime.started.wait(), DEADLINE_S)
    waiting = [asyncio.ensure_future(call(value)) for value in range(1, queued + 1)]
    await asyncio.sleep(0.05)  # the controller sees them queued while the batch runs
    assert runtime.batches == [[0]]
    runtime.gate.set()
    return await asyncio.wait_for(asyncio.gather(first, *waiting), DEADLINE_S)


async def test_while_a_batch_runs_the_next_collects_everything_queued() -> None:
    runtime = Runtime()
    answers = await queued_behind_a_running_batch(runtime, dispatcher()(runtime), 5)
    assert answers == [0, 10, 20, 30, 40, 50]
    assert runtime.batches == [[0], [1, 2, 3, 4, 5]]


async def test_a_batch_takes_at_most_max_batch_size() -> None:
    runtime = Runtime()
    await queued_behind_a_running_batch(runtime, dispatcher(max_batch_size=2)(runtime), 5)
    assert runtime.batches == [[0], [1, 2], [3, 4], [5]]


async def test_a_request_that_cannot_be_answered_in_time_is_refused() -> None:
    runtime = Runtime()
    call = dispatcher(max_latency_ms=50)(runtime)
    runtime.gate.clear()
    first = asyncio.ensure_future(call(0))
    await asyncio.wait_for(runtime.started.wait(), DEADLINE_S)
    # Queued behind a batch that does not end: refused once older than max_latency_ms.
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(call(1), DEADLINE_S)
    runtime.gate.set()
    assert await asyncio.wait_for(first, DEADLINE_S) == 0


def refill_dispatcher(hold_s: float) -> RefillDispatcher:
    served = RefillDispatcher(3_600_000, 64, fallback=fallback, get_batch_size=lambda _: 1)
    served.refill_wait_s = hold_s
    return served


async def four_at_once(runtime: Runtime, call) -> None:
    """A batch of one that runs while four more queue, then those four as one batch."""
    await queued_behind_a_running_batch(runtime, call, 4)
    assert runtime.batches == [[0], [1, 2, 3, 4]]


async def test_after_a_batch_of_several_the_next_waits_for_as_many() -> None:
    """An hour's hold: only the requests coming can release the batch, not the clock."""
    runtime = Runtime()
    call = refill_dispatcher(hold_s=3600)(runtime)
    await four_at_once(runtime, call)
    first = asyncio.ensure_future(call(5))
    await asyncio.sleep(0.05)
    assert len(runtime.batches) == 2, "one request, after a batch of four: held"
    others = [asyncio.ensure_future(call(value)) for value in (6, 7, 8)]
    assert await asyncio.wait_for(asyncio.gather(first, *others), DEADLINE_S) == [50, 60, 70, 80]
    assert runtime.batches[2] == [5, 6, 7, 8]


async def test_the_hold_ends_when_no_company_comes() -> None:
    runtime = Runtime()
    call = refill_dispatcher(hold_s=0.05)(runtime)
    await four_at_once(runtime, call)
    assert await asyncio.wait_for(call(5), DEADLINE_S) == 50
    assert runtime.batches[2] == [5]


async def test_after_a_batch_of_one_nothing_waits() -> None:
    runtime = Runtime()
    call = refill_dispatcher(hold_s=3600)(runtime)
    for value in range(5):
        assert await asyncio.wait_for(call(value), DEADLINE_S) == value * 10
    assert runtime.batches == [[value] for value in range(5)]


def test_install_chooses_the_class_bentoml_builds() -> None:
    try:
        batcher.install("eager")
        assert app.CorkDispatcher is EagerDispatcher
        batcher.install("refill")
        assert app.CorkDispatcher is RefillDispatcher
        batcher.install("cork")
        assert app.CorkDispatcher is CorkDispatcher
    finally:
        app.CorkDispatcher = CorkDispatcher


async def test_a_failed_round_does_not_stop_batching() -> None:
    class FailsOnce(EagerDispatcher):
        failed = False

        def _get_inputs(self, num_batches=None):
            if not self.failed:
                self.failed = True
                raise RuntimeError("injected")
            return super()._get_inputs(num_batches)

    runtime = Runtime()
    served = FailsOnce(3_600_000, 64, fallback=fallback, get_batch_size=lambda _: 1)
    call = served(runtime)
    assert await asyncio.wait_for(call(4), DEADLINE_S) == 40
    assert served.failed


def test_the_queue_is_priced_at_the_pace_of_recent_batches() -> None:
    """Batches of 1 and 2 requests at 35 ms a request, and one of 2 that took 0.5 s (a stall):
    BentoML's fit draws its line through that point (0.47 s a request), so 3 requests queued
    a few ms ago would look past a 1 s max_latency_ms and the oldest be refused; their recent
    pace (40 ms a request) answers them in time."""
    served = dispatcher(max_latency_ms=1000)
    for _ in range(2 + 47):  # BentoML skips the first 2
        served.optimizer.log_outbound(n=1, wait=0.0, duration=0.035)
    served.optimizer.log_outbound(n=2, wait=0.0, duration=0.5)
    served.optimizer.trigger_refresh()
    fitted = served.optimizer.o_a * 3 + served.optimizer.o_b
    assert fitted > 1.0, "the fit this guards against"
    now = 1000.0
    for _ in range(3):
        served._queue.append(Job(now - 0.005, None, None))  # type: ignore[arg-type]
    per_request = served.recent_seconds_per_request()
    assert per_request == pytest.approx((47 * 0.035 + 0.5) / 49)
    assert served.estimated_latency(now) == pytest.approx(0.005 + 3 * per_request)
    assert served.estimated_latency(now) < served.max_latency


def test_before_any_batch_is_timed_the_oldest_request_s_age_is_its_latency() -> None:
    served = dispatcher(max_latency_ms=1000)
    served._queue.append(Job(99.0, None, None))  # type: ignore[arg-type]
    assert served.recent_seconds_per_request() is None
    assert served.estimated_latency(100.0) == pytest.approx(1.0)
