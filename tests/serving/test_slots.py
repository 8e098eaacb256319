"""serving/slots.py: the file a service's workers share, one slot per worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from serving import slots
from serving.slots import Board


def ended_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_workers_see_each_others_counts_and_not_those_of_ended_processes(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "connections.slots"
    first, second = Board(path, 1), Board(path, 2)
    first.publish(5)
    second.publish(3)
    assert sorted(first.counts()) == sorted(second.counts()) == [3, 5]
    gone = Board(path, 3)
    gone.pid = ended_pid()
    gone.publish(40)
    assert sorted(first.counts()) == [3, 5], "an ended worker's slot is not counted"
    with pytest.raises(ValueError, match="outside"):
        Board(path, slots.MAX_WORKERS + 1)


def test_a_worker_sees_whether_another_live_worker_counts_above_a_value(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "runtime.slots"
    first, second = Board(path, 1), Board(path, 2)
    assert not first.others_above(0)
    first.publish(10)
    assert not first.others_above(0), "its own slot is not another's"
    second.publish(10)
    assert first.others_above(9) and not first.others_above(10)
    second.publish(0)
    gone = Board(path, 3)
    gone.pid = ended_pid()
    gone.publish(100)
    assert not first.others_above(0), "an ended worker's slot is not counted"


def test_each_service_and_kind_has_its_own_file(tmp_path: Path) -> None:
    names = {slots.board_path(str(tmp_path), service, kind).name
             for service in ("ImageClassifier", "ObjectDetector")
             for kind in ("connections", "runtime")}
    assert len(names) == 4
    assert slots.board_path(None, "ImageClassifier").parent.is_dir()
