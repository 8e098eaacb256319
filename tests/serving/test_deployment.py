"""What a worker does once its models are loaded: the heap allocated so far leaves the garbage
collector's generations (serving/deployment.py keep_out_of_collections)."""

from __future__ import annotations

import gc

from serving.deployment import keep_out_of_collections


def test_objects_allocated_at_start_are_frozen_and_new_ones_are_not() -> None:
    loaded = [[] for _ in range(1000)]
    try:
        keep_out_of_collections()
        frozen = gc.get_freeze_count()
        assert frozen >= len(loaded)
        later: list[list[int]] = [[] for _ in range(1000)]
        assert gc.get_freeze_count() == frozen  # only what existed at the call
        # The collector's generations hold the new lists, not the frozen ones.
        scanned = {id(o) for o in gc.get_objects()}
        assert id(later[0]) in scanned and id(loaded[0]) not in scanned
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
