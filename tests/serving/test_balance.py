"""serving/balance.py: the share each worker may hold, the count of active connections, the
board the workers share, and the middleware's `Connection: close` on a worker over its share.
tests/test_balance.py runs it in a real two-worker server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from bentoml._internal.context import server_context

from serving import balance, slots
from serving.balance import ConnectionBalance, ConnectionTracker, closes_allowed
from serving.slots import Board
from tests.helpers import call_asgi, http_scope


@pytest.mark.parametrize(("mine", "counts", "allowed"), [
    (64, [64, 0], 16),      # all on one worker: half its excess over 32
    (40, [40, 24], 4),      # 8 over the share
    (33, [33, 31], 1),
    (32, [32, 32], 0),      # balanced
    (3, [3, 1], 1),         # four connections: 3 / 1 becomes 2 / 2
    (3, [3, 2], 0),         # five: 3 is the share rounded up
    (1, [1, 0], 0),         # one connection stays where it is
    (0, [0, 0], 0),
    (30, [30, 10, 10, 10], 8),  # four workers, share 15
])
def test_a_busy_worker_may_close_half_its_excess_over_the_even_share(
        mine: int, counts: list[int], allowed: int) -> None:
    assert closes_allowed(mine, in_flight=mine, counts=counts) == allowed


def test_a_worker_that_keeps_up_closes_nothing() -> None:
    """All 64 connections here but no more requests under way than the share: moving them
    would gain nothing."""
    assert closes_allowed(64, in_flight=32, counts=[64, 0]) == 0
    assert closes_allowed(64, in_flight=1, counts=[64, 0]) == 0
    assert closes_allowed(64, in_flight=33, counts=[64, 0]) == 16


@pytest.mark.parametrize(("mine", "counts", "allowed"), [
    (4, [4, 0], 1),  # four connections answered one after another in one busy event loop
    (2, [2, 0], 1),
    (1, [1, 0], 0),  # one connection stays where it is
    (2, [2, 2], 0),  # balanced
])
def test_a_worker_using_a_whole_core_is_busy_with_one_request_under_way(
        mine: int, counts: list[int], allowed: int) -> None:
    """A light model answered in the event loop (serving/fast_lane.py): its connections'
    requests run one after another, so one is under way at a time, yet the worker is full."""
    assert closes_allowed(mine, in_flight=1, counts=counts, saturated=True) == allowed
    assert closes_allowed(mine, in_flight=1, counts=counts, saturated=False) == 0


def test_saturated_is_a_cores_cpu_time_since_the_last_refresh(
        worker, monkeypatch: pytest.MonkeyPatch) -> None:
    middleware, _, _ = worker
    clock = {"wall": 100.0, "cpu": 5.0}
    monkeypatch.setattr(balance.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(balance.time, "process_time", lambda: clock["cpu"])
    middleware._cpu_at = (clock["wall"], clock["cpu"])

    def after(wall_s: float, cpu_s: float) -> bool:
        clock["wall"] += wall_s
        clock["cpu"] += cpu_s
        return middleware._saturated()

    assert after(0.2, 0.19) is True, "0.95 of a core"
    assert after(0.2, 0.02) is False, "0.1 of a core"
    assert after(0.2, 0.35) is True, "two threads: the event loop's and the runtime's"
    assert after(0.4, 0.3) is False, "0.75 of a core"


def test_a_connection_counts_while_a_request_runs_and_for_a_while_after() -> None:
    tracker = ConnectionTracker()
    tracker.started(("127.0.0.1", 5000))
    tracker.started(("127.0.0.1", 5001))
    tracker.started(("127.0.0.1", 5001))  # a second request under way on one connection
    assert tracker.count(now=0.0) == 2
    tracker.finished(("127.0.0.1", 5001), closing=False)
    assert tracker.count(now=0.0) == 2, "one of its requests still runs"
    tracker.finished(("127.0.0.1", 5001), closing=False)
    tracker.finished(("127.0.0.1", 5000), closing=True)  # asked to close: gone at once
    answered = tracker.idle_since[("127.0.0.1", 5001)]
    assert tracker.count(answered + balance.IDLE_S / 2) == 1
    assert tracker.count(answered + balance.IDLE_S * 2) == 0, "idle too long: not counted"


async def _answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class HeldApp:
    """An app whose answers wait until `release`: requests stay under way meanwhile."""

    def __init__(self) -> None:
        self.released: asyncio.Event | None = None  # one per event loop (answers_when_released)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert self.released is not None
        await self.released.wait()
        await _answer(scope, receive, send)


def request(client_port: int, http_version: str = "1.1") -> dict[str, Any]:
    return {**http_scope("/classify"), "client": ("127.0.0.1", client_port),
            "http_version": http_version}


async def answers_when_released(middleware: ConnectionBalance, app: HeldApp,
                                requests: list[dict[str, Any]], meanwhile: Any
                                ) -> list[dict[str, str]]:
    """The answers' headers to `requests`, sent at once and held until `meanwhile()` ran."""
    app.released = asyncio.Event()
    calls = [asyncio.create_task(call_asgi(middleware, r)) for r in requests]
    await asyncio.sleep(0)  # each is under way, waiting for the app
    meanwhile()
    app.released.set()
    return [answer.headers for answer in await asyncio.gather(*calls)]


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The middleware as worker 1 of 2 over a held app, its board in a temporary metrics
    directory; the other worker's slot, to fill in."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(server_context, "worker_index", 1)
    app = HeldApp()
    middleware = ConnectionBalance(app, service="Test", workers=2)
    yield middleware, app, Board(slots.board_path(str(tmp_path), "Test"), 2)
    middleware.stop()


def test_a_busy_worker_over_its_share_asks_one_client_to_reconnect(worker) -> None:
    middleware, app, other = worker

    def one_connection_there() -> None:
        other.publish(1)  # 3 here, all under way, 1 there: the share is 2
        middleware.refresh()

    answers = asyncio.run(answers_when_released(
        middleware, app, [request(port) for port in (5000, 5001, 5002)], one_connection_there))
    assert [a.get("connection") for a in answers].count("close") == 1
    middleware.refresh()
    assert middleware.allowed == 0, "2 here (the closed one left), 1 there: balanced"
    assert middleware.board is not None and sorted(middleware.board.counts()) == [1, 2]


def test_a_balanced_worker_and_an_http_1_0_client_are_left_alone(worker) -> None:
    middleware, app, other = worker

    def as_many_there(count: int) -> Any:
        def publish() -> None:
            other.publish(count)
            middleware.refresh()
        return publish

    balanced = asyncio.run(answers_when_released(
        middleware, app, [request(5000), request(5001)], as_many_there(2)))
    assert all("connection" not in a for a in balanced)
    old_clients = asyncio.run(answers_when_released(
        middleware, app, [request(port, "1.0") for port in (5002, 5003, 5004, 5005)],
        as_many_there(0)))
    assert all("connection" not in a for a in old_clients), "HTTP/1.0 closes anyway"
    assert middleware.allowed > 0, "closes were allowed, none was used on HTTP/1.0"


def test_one_worker_or_no_server_means_nothing_to_balance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(server_context, "worker_index", 1)
    alone = ConnectionBalance(_answer, service="Test", workers=1)
    assert asyncio.run(call_asgi(alone, request(5000))).status == 200
    assert alone.board is None and not list(tmp_path.iterdir())
    monkeypatch.setattr(server_context, "worker_index", None)  # imported, not served
    imported = ConnectionBalance(_answer, service="Test", workers=2)
    assert asyncio.run(call_asgi(imported, request(5000))).status == 200
    assert imported.board is None and not imported.enabled


def test_the_board_is_named_by_the_serving_process_and_the_service(tmp_path: Path) -> None:
    path = slots.board_path(str(tmp_path), "ImageClassifier")
    assert path.parent == tmp_path
    assert path.name == f"connections-{os.getppid()}-ImageClassifier.slots"
    assert not path.name.endswith(".db"), "Prometheus reads every .db file in that directory"
