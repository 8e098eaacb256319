"""The adaptive batcher's dispatch rule: a batch leaves as soon as the runtime is free.

BentoML 1.4.39's CorkDispatcher holds queued requests back while it predicts that waiting pays:
with the runtime free it still waits while `n * (age of the newest + 1 ms + a) <= 0.95 x the
average wait of past batches`. Its own past waits feed that average, so a window once open stays
open, and a lone request at 1 connection waits for company that never comes. Before that it
"trains" on the first ~24 batches, holding requests back to form batches of 2 and 3.

Here the rule of continuous batching instead (Triton's dynamic batcher without a queue delay,
LitServe's and vLLM's loops): when the runtime is free, everything queued leaves as one batch (up
to max_batch_size); while a batch runs, the next one grows. Nothing waits for company, so a lone
request pays no window, and under load the batches are as large as the runtime's own pace makes
them. BentoML's overload rule is kept: when the oldest queued request cannot be answered within
max_latency_ms (its age plus the queue's cost at the pace of recent batches), it is answered 503
("process is overloaded") rather than left to time out.

`refill` (the default) adds one hold to that rule: after a batch of several requests, the next
waits, up to REFILL_WAIT_S from when the runtime went free, until as many are queued. Under load
the clients that batch answered send their next requests within a moment; released at once, the
next batch leaves without them. After a batch of one nothing waits, so a lone request still
pays no window.

Not a new batcher: BentoML's queue, batch splitting, metrics and record of recent batches are
reused; only the controller (when to release a batch) and the queue's cost are replaced, by
installing this class where BentoML's service app looks the dispatcher up. The versions it was
checked against are pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

from bentoml._internal.marshal.dispatcher import CorkDispatcher

logger = logging.getLogger(__name__)

# While a batch runs, how often the queue is checked for requests that can no longer be answered
# in time (BentoML polls every 1 ms; the end of a batch wakes the controller at once anyway).
OVERLOAD_CHECK_S = 0.01


class EagerDispatcher(CorkDispatcher[Any, Any]):
    """CorkDispatcher that releases whatever is queued as soon as no batch is running."""

    overload_check_s = OVERLOAD_CHECK_S

    @functools.cached_property
    def _runtime_free(self) -> asyncio.Event:
        # Created on first use, in the event loop that serves (as BentoML's own condition is).
        return asyncio.Event()

    # The size of the last batch released, and when the runtime last went free (refill_hold).
    _last_batch = 0
    _freed_at = 0.0

    async def outbound_call(self, inputs_info: Any, training: bool = False) -> None:
        try:
            await super().outbound_call(inputs_info, training)
        finally:
            self._freed_at = time.time()
            self._runtime_free.set()  # the semaphore was released: wake the controller

    def refill_hold(self, now: float) -> float:
        """How much longer the next batch waits for company with the runtime free: never."""
        return 0.0

    def estimated_latency(self, now: float) -> float:
        """When the oldest queued request would be answered if its batch left now: its age, plus
        the queue's cost at the pace of recent batches (before any was timed, its age alone)."""
        age = now - self._queue[0].enqueue_time
        per_request = self.recent_seconds_per_request()
        return age if per_request is None else age + per_request * len(self._queue)

    def recent_seconds_per_request(self) -> float | None:
        """The time BentoML's record of the last 50 batches took over the requests they held.

        Why not BentoML's fit of that record (o_a x requests + o_b, least squares): after a
        quiet spell nearly every batch recorded holds one or two requests, and a line through
        points of almost one size takes its slope from their noise; a steep one prices a handful
        of queued requests above max_latency_ms, the oldest is refused, and the batches left to
        record are again of one. Seen once (resnet18 at 64 connections right after 1, 2 cores):
        one worker refused 12,198 requests in 16 s, each 30-60 ms after it came, while the other
        served; only such a price refuses a request that young. Time over requests is the pace
        itself: it never extrapolates."""
        record = self.optimizer.o_stat
        requests = sum(n for n, _, _ in record)
        return sum(duration for _, duration, _ in record) / requests if requests else None

    async def controller(self) -> None:
        while True:
            try:
                await self._release_next()
            except Exception:  # as BentoML's loop does: a failed round must not stop batching
                logger.exception("Error dispatching a batch")

    async def _release_next(self) -> None:
        """One round: wait for a queued request, then refuse what is too late, wait for the
        running batch to end, or release everything queued as the next batch."""
        async with self._wake_event:  # until anything is queued
            await self._wake_event.wait_for(self._queue.__len__)
        if len(self._queue) > 1 and self.estimated_latency(time.time()) >= self.max_latency:
            self._queue.popleft().future.cancel()  # answered 503 by BentoML's fallback
            return
        # A batch runs: wait for its end, re-checking the queue meanwhile.
        if self._sema.is_locked():  # type: ignore[no-untyped-call]
            if time.time() - self._queue[0].enqueue_time >= self.max_latency:
                self._queue.popleft().future.cancel()
                return
            self._runtime_free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._runtime_free.wait(), self.overload_check_s)
            return
        if (hold := self.refill_hold(time.time())) > 0:
            async with self._wake_event:  # until the next request comes, or the hold ends
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_event.wait(), hold)
            return
        batch = tuple(self._get_inputs())  # before the semaphore: a failure here leaves it free
        self._last_batch = len(batch)
        self._sema.acquire()  # type: ignore[no-untyped-call]
        self._loop.create_task(self.outbound_call(batch))


# How long, at most, the refill rule holds a batch after the runtime went free: two of BentoML's
# cork ticks (1 ms), not tuned further. With it the digits model at 64 connections answered
# 1,553-1,670/s against 1,401-1,519 without (three starts each, 2 cores; docs/performance.md,
# round 7); the detector's p99 at 128 rose by about a quarter, so it is configured eager.
REFILL_WAIT_S = 0.002


class RefillDispatcher(EagerDispatcher):
    """Eager, except that after a batch of several requests the next one waits, up to
    REFILL_WAIT_S from when the runtime went free, until the queue holds as many requests as
    that batch did (the module's docstring says why). After a batch of one, nothing waits."""

    refill_wait_s = REFILL_WAIT_S

    def refill_hold(self, now: float) -> float:
        if self._last_batch < 2 or len(self._queue) >= self._last_batch:
            return 0.0
        return max(0.0, self._freed_at + self.refill_wait_s - now)


DISPATCHERS: dict[str, type[CorkDispatcher[Any, Any]]] = {
    "eager": EagerDispatcher, "refill": RefillDispatcher, "cork": CorkDispatcher}


def install(dispatch: str) -> None:
    """Make BentoML's service app build this dispatcher (batching.dispatch) for batchable APIs:
    it looks the class up by name when a worker builds its app, after the service module is
    imported, so the choice holds for every API of the worker."""
    from _bentoml_impl.server import app

    if not issubclass(app.CorkDispatcher, CorkDispatcher):
        raise RuntimeError("BentoML's service app no longer uses CorkDispatcher: this BentoML "
                           "version is not the pinned one (requirements/serving.txt)")
    app.CorkDispatcher = DISPATCHERS[dispatch]
