"""serving/cores.py: which models get a session on every core for a call alone, and when a
worker counts the other workers' runtimes as busy. The sessions themselves:
tests/serving/test_runtime.py; in a real two-worker server: tests/test_cores.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from serving import cores
from serving.cores import QUIET_S, REQUEST_ALONE, CoreShare, lone_request_threads
from serving.slots import Board


@pytest.mark.parametrize(("own", "cores_", "expected"), [
    (1, 2, 2),      # every core
    (1, 16, 16),
    (2, 2, 0),      # its own session already has every core
    (0, 2, 0),      # 0: one per core
    (1, 1, 0),      # one core: nothing to gain
])
def test_auto_gives_every_core_where_the_worker_has_fewer(own: int, cores_: int, expected: int
                                                          ) -> None:
    assert lone_request_threads("auto", own, cores_) == expected


@pytest.mark.parametrize(("setting", "own", "expected"), [
    (4, 1, 4), (0, 1, 8), (1, 1, 0), (2, 2, 0), (2, 0, 0), (16, 0, 16)])
def test_a_number_of_threads_is_taken_as_set_when_it_is_more_than_the_workers_own(
        setting: int, own: int, expected: int) -> None:
    assert lone_request_threads(setting, own, 8) == expected


class Clock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


def pair(tmp_path: Path) -> tuple[CoreShare, CoreShare, Clock]:
    clock = Clock()
    path = tmp_path / "runtime.slots"
    return CoreShare(Board(path, 1), clock), CoreShare(Board(path, 2), clock), clock


def test_another_workers_runtime_is_busy_while_it_runs_and_for_a_quiet_time_after(
        tmp_path: Path) -> None:
    mine, other, clock = pair(tmp_path)
    assert mine.others_idle()
    with other.call():
        clock.now += 10 * 10**9  # however long it runs
        assert not mine.others_idle()
        with mine.call():
            assert not mine.others_idle() and not other.others_idle()
    assert not mine.others_idle(), "just ended: its next call may follow at once"
    clock.now += int(QUIET_S * 1e9) - 1
    assert not mine.others_idle()
    clock.now += 2
    assert mine.others_idle()
    assert other.others_idle(), "this worker's own calls never keep it from every core"


def test_calls_from_several_threads_of_a_worker_are_counted_until_the_last_ends(
        tmp_path: Path) -> None:
    mine, other, clock = pair(tmp_path)
    started, release = threading.Barrier(3), threading.Event()

    def call() -> None:
        with other.call():
            started.wait()
            release.wait()

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait()
    assert other.running == 2 and not mine.others_idle()
    release.set()
    for thread in threads:
        thread.join()
    clock.now += int(QUIET_S * 1e9) + 1
    assert other.running == 0 and mine.others_idle()


def test_a_process_that_is_not_a_worker_has_no_others() -> None:
    share = CoreShare()
    with share.call():
        assert share.others_idle()
    assert cores.worker_share().board is None  # the test process is no worker of bentoml serve


def test_a_call_is_alone_only_where_the_fast_lane_marks_it() -> None:
    assert REQUEST_ALONE.get() is False
    marked = REQUEST_ALONE.set(True)
    try:
        assert REQUEST_ALONE.get() is True
    finally:
        REQUEST_ALONE.reset(marked)
