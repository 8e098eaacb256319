"""Idle cores: a request alone runs on every core while the other workers' runtimes are idle.

Why: a worker runs its model on one ONNX Runtime thread, and one worker per core serves most
under load (configuration.yaml). A request alone then leaves the other cores idle: in `make
bench`'s ceiling (docs/benchmarks.md, round 10) resnet18 took 39.8 ms per image on one thread
and 23.9 ms on both cores, and a server without workers (the FastAPI peer, every core on each
call) answered one connection in 21.0 ms at p50 against this service's 39.9 (round 9). Two
threads per worker for every call would take that back under load: each worker's calls wait on
a thread the other worker's calls are using (the levers table, 2 workers x 2 ORT threads:
resnet18 at 4 connections 42.8 answers/s against 48.9 shipped).

How: a request alone in its worker (nothing else past its admission gate or waiting at it) is
run by the fast lane (serving/fast_lane.py), which marks its call (REQUEST_ALONE). Each worker
publishes, in a file the service's workers share (serving/slots.py), until when its runtime
counts as busy: while a call runs, and for QUIET_S after it. A marked call of one image, made
while no other worker's runtime is busy, goes to a second session of the same graph with a
thread per core; every other call goes to the worker's own. The two sessions share the weights
(serving/weights.py). Two workers that both find the others idle at the same instant both take
every core for that call: what two threads per worker would cost, for one call.

Which models: with lone_request_threads `auto`, every model on a CPU with more cores than a
worker's own threads. The second session's threads spin between operators while its call runs
and stop when it returns (serving/runtime.py, lone_call_options): with threads that sleep
between operators, splitting a light model's image costs what it saves (round 10's levers
table, mobilenet_v3_small at 1 connection: 179/s with 2 workers x 2 ORT threads against 215
shipped); with threads that spin, 244/s.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .slots import Board, board_path

# A worker's runtime counts as busy this long after its last call. A busy worker's calls follow
# each other within a few milliseconds (the next request's decoding, the answer): at 2
# connections, one per worker, each request is alone in its worker, and without this each would
# find the other's runtime idle between its calls and take every core. (Before calls had to be
# alone in their worker too, resnet18 at 64 connections made 32 calls on every core in 15 s in
# such gaps, each then sharing the cores with the other worker's thread.)
QUIET_S = 0.010


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Set by the fast lane around the call of a request alone in its worker (asyncio.to_thread
# carries it into the thread that runs it): only such a call may take every core.
REQUEST_ALONE: ContextVar[bool] = ContextVar("request_alone", default=False)
# Published while a call runs: busy until further notice.
BUSY = 2**63 - 1


class CoreShare:
    """Whether the other workers' runtimes are busy, and this worker's published, as a time of
    CLOCK_MONOTONIC (the same in every process of the machine) in nanoseconds until which the
    worker is busy. Without a board (a process that is not a worker of `bentoml serve`: tests,
    the offline client), no other worker exists to be disturbed."""

    def __init__(self, board: Board | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.board = board
        self.clock = clock
        self.running = 0  # calls under way in this process
        self._lock = threading.Lock()  # calls from the batcher's thread, a job's, the lane's

    def others_idle(self) -> bool:
        return self.board is None or not self.board.others_above(self.clock())

    @contextmanager
    def call(self) -> Iterator[None]:
        """A runtime call of this worker, published while it runs."""
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)

    def _count(self, change: int) -> None:
        with self._lock:
            self.running += change
            if self.board is not None:
                self.board.publish(BUSY if self.running else
                                   self.clock() + int(QUIET_S * 1e9))


@functools.cache
def worker_share() -> CoreShare:
    """This process's share: one per worker, whichever of its models runs (a ModelServer's
    worker runs one call at a time across them, serving/predictor.RUNNING)."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is None:  # not a worker of `bentoml serve`
        return CoreShare()
    path = board_path(os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                      server_context.service_name or "service", "runtime")
    return CoreShare(Board(Path(path), server_context.worker_index))


def lone_request_threads(setting: int | str, worker_threads: int, cores: int) -> int:
    """Threads of the session for calls alone (model.lone_request_threads); 0: no such session.
    `worker_threads`: the worker's own session's (model.intra_op_threads, 0 = one per core);
    auto: one per core."""
    own = worker_threads or cores
    wanted = cores if setting == "auto" else int(setting) or cores
    return wanted if wanted > own else 0
