"""bench.profile: py-spy's raw stacks shared out by stage, the innermost matching frame first."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profile import summarize


def test_each_sample_counts_for_the_innermost_stage_it_reaches(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (w.py:1);Admission.__call__ (serving/admission.py:200);FastLane.__call__ "
        "(serving/fast_lane.py:139);Session.run (onnxruntime/x.py:395) 6\n"
        "main (w.py:1);Admission.__call__ (serving/admission.py:200);RequestLog.__call__ "
        "(serving/request_log.py:76) 2\n"
        "main (w.py:1);EagerDispatcher._release_next (serving/batcher.py:90) 1\n"
        "main (w.py:1);Runner.run (asyncio/runners.py:118) 1\n")
    assert summarize(raw) == pytest.approx({
        "ONNX Runtime (inference)": 0.6, "request log (JSON line)": 0.2,
        "batching (dispatcher)": 0.1, "other (event loop, HTTP, Python)": 0.1})
