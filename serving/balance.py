"""Connection balance: a worker that holds more than its share of the service's active
connections asks some of their clients to reconnect.

Why: BentoML 1.4.39 gives every worker the same listening socket, and a keep-alive connection
stays with the worker that accepted it for its whole life. Which worker accepts is a race: 64
connections opened at once can all land on one of two workers, which then answers every request
while the other idles. Measured on 2 cores with mobilenet_v3_small at 64 connections: 472
answers/s in a start that split them 26 / 38, 259 in the next start, which put all 64 on one
worker (docs/performance.md, round 8). Nothing in BentoML or uvicorn rebalances them.

How: each worker counts its active connections (a request under way, or one answered in the last
IDLE_S seconds) and publishes the count in its slot of a small file shared by the service's
workers (`Board`). Every REFRESH_S a thread reads the other slots; a worker holding more than the
even share (rounded up) that is busy (more requests under way than that share, or a whole core's
CPU time since the last refresh) may close about half its excess: the next answers it sends carry
`Connection: close`, and uvicorn closes each connection after that answer. Nothing is refused or
lost: the answer is whole, and an HTTP/1.1 client opens a new connection for its next request.
The new connection is accepted by whichever worker gets to it first, most often the less busy
one; the counts correct any that come back. A balanced service closes nothing, and neither does
one that keeps up: with one request at a time in the whole server, the worker that just answered
is the one awake to accept the reconnection, so a close would move nothing.

Answers to balanced-away connections are counted in
`image_classifier_connections_rebalanced_total`; a worker's active connections are
`image_classifier_worker_connections` in /metrics.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

from .asgi import ASGIApp, Message, Receive, Scope, Send
from .metrics import connections_rebalanced, worker_connections
from .slots import Board, board_path

# A connection answered this long ago without a new request is not counted: an idle keep-alive
# connection costs its worker nothing.
IDLE_S = 2.0
# How often a worker publishes its count and reads the others'.
REFRESH_S = 0.2
# A worker that used this much of one core's time since its last refresh is busy, whatever it
# has under way: one that answers a light model in its event loop (serving/fast_lane.py) takes
# its connections' requests one after another, so it rarely has more than one under way even
# when it holds all of them and the other worker idles (digits at 4 connections, 1.00 of 2 cores
# in docs/benchmarks.md, round 9).
SATURATED = 0.9
CLOSE = (b"connection", b"close")


def closes_allowed(mine: int, in_flight: int, counts: list[int], saturated: bool = False) -> int:
    """How many of its connections a worker holding `mine` of `counts` may close before the
    next refresh: half its excess over the even share rounded up (the reconnections land
    anywhere, so a full correction would overshoot). None when it holds no more than that, or
    when it is not busy: no more of its requests under way (`in_flight`) than that share, and
    not `saturated` (a core's CPU time since the last refresh). A worker that keeps up gains
    nothing from a move, and a connection closed by a worker that is not busy is most often
    accepted again by the same worker."""
    share = math.ceil(sum(counts) / max(len(counts), 1))
    excess = mine - share
    busy = in_flight > share or saturated
    return (excess + 1) // 2 if excess > 0 and busy else 0


class ConnectionTracker:
    """One worker's active connections by client address: under way, or answered within
    IDLE_S."""

    def __init__(self) -> None:
        self.busy: dict[Any, int] = {}  # client -> requests under way on it
        self.idle_since: dict[Any, float] = {}

    def started(self, client: Any) -> None:
        self.busy[client] = self.busy.get(client, 0) + 1
        self.idle_since.pop(client, None)

    def finished(self, client: Any, closing: bool) -> None:
        left = self.busy.pop(client, 1) - 1
        if left > 0:
            self.busy[client] = left
        elif not closing:
            self.idle_since[client] = time.monotonic()

    def count(self, now: float) -> int:
        """Active connections; forgets the ones idle longer than IDLE_S."""
        for client, since in list(self.idle_since.items()):
            if now - since > IDLE_S:
                self.idle_since.pop(client, None)
        return len(self.busy) + len(self.idle_since)


class ConnectionBalance:
    """The ASGI middleware, outermost: counts this worker's connections and marks answers
    `Connection: close` while the worker holds more than its share of the `workers` the
    service runs (one worker: nothing to balance, the middleware passes everything on)."""

    def __init__(self, app: ASGIApp, *, service: str, workers: int) -> None:
        self.app = app
        self.service = service
        self.enabled = workers > 1
        self.tracker = ConnectionTracker()
        self.allowed = 0  # closes left until the next refresh, set by the thread
        self.board: Board | None = None
        self._lock = threading.Lock()  # the tracker, between the event loop and the thread
        self._stopped = threading.Event()
        self._cpu_at = (time.monotonic(), time.process_time())  # at the last refresh

    def _start(self) -> None:
        """On the first request, in the worker (the middleware is also built where the service
        is only imported): map the board, start publishing."""
        from bentoml._internal.context import server_context

        index = server_context.worker_index
        if index is None:  # not a worker of `bentoml serve`
            self.enabled = False
            return
        path = board_path(os.environ.get("PROMETHEUS_MULTIPROC_DIR"), self.service)
        self.board = Board(path, index)
        self.refresh()
        threading.Thread(target=self._refresh_forever, name="connection balance",
                         daemon=True).start()

    def _refresh_forever(self) -> None:
        while not self._stopped.wait(REFRESH_S):
            self.refresh()

    def stop(self) -> None:
        """Stop publishing (the thread is a daemon: a worker that exits needs no call)."""
        self._stopped.set()

    def refresh(self) -> None:
        """Publish this worker's count; read the others'; set how many may close."""
        assert self.board is not None
        with self._lock:
            mine, in_flight = self.tracker.count(time.monotonic()), len(self.tracker.busy)
        self.board.publish(mine)
        worker_connections().labels(service=self.service).set(mine)
        self.allowed = closes_allowed(mine, in_flight, self.board.counts(), self._saturated())

    def _saturated(self) -> bool:
        """Whether this process used SATURATED of a core since the last refresh (all its
        threads: the event loop's and the runtime's)."""
        wall, cpu = time.monotonic(), time.process_time()
        (wall_before, cpu_before), self._cpu_at = self._cpu_at, (wall, cpu)
        return cpu - cpu_before >= SATURATED * (wall - wall_before)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if self.enabled and self.board is None:
            self._start()
        if scope["type"] != "http" or client is None or not self.enabled:
            return await self.app(scope, receive, send)
        client = tuple(client)
        with self._lock:
            self.tracker.started(client)
        closing = False

        async def send_marked(message: Message) -> None:
            nonlocal closing
            if message["type"] == "http.response.start" and self.allowed > 0 \
                    and scope.get("http_version") == "1.1":
                self.allowed -= 1
                closing = True
                message["headers"] = [*message.get("headers", []), CLOSE]
                connections_rebalanced().labels(service=self.service).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_marked)
        finally:
            with self._lock:
                self.tracker.finished(client, closing)
