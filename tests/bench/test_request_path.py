"""bench.request_path: each kind of process answers the bench's upload through its app (a
real trained model, the service's real app), and the report sets each row against the shipped
one."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import report, request_path, servers


def test_the_report_sets_each_configuration_against_the_shipped_one() -> None:
    medians = {"shipped": 0.80, "request log off": 0.76, "drift off": 0.79,
               "BentoML metrics off": 0.77, "all three off": 0.72, "fast lane off": 1.50,
               request_path.FLOOR: 0.10, request_path.FASTAPI: 0.55}
    runs = {name: [{"ms": ms, "cpu_ms": 2 * ms}, {"ms": ms + 0.02, "cpu_ms": 2 * ms}]
            for name, ms in medians.items()}
    text = request_path.render(runs, argparse.Namespace(requests=10, rounds=2), "m:v1",
                               "now", report.machine())
    assert "| request log off | no JSON line per request | 0.770 | -0.040 | 0.760-0.780 | " \
           "1.520 |" in text
    assert "| shipped | configuration.yaml as shipped | 0.810 |  | 0.800-0.820 | 1.600 |" in text
    assert "together:\n  +0.080 ms a request of the shipped 0.810 (10%)" in text
    assert "in\n  0.560 ms: +0.250 ms to the shipped service, of which\n  the features above " \
           "are 0.080" in text
    assert "Without the fast lane (BentoML's endpoint, its batcher and a thread hand-off per " \
           "batch):\n  +0.700 ms a request." in text


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["service", "floor", "fastapi"])
def test_each_kind_of_process_answers_the_upload_through_its_app(
        kind: str, trained_model: str, model_dir: Path, tmp_path: Path) -> None:
    """measure() fails unless every warm-up request was answered 200 by the app it built."""
    config = servers.bentoml_config(trained_model, {}, tmp_path)
    measured = request_path.measure(kind, 20, config, model_dir)
    assert measured["ms"] > 0 and measured["cpu_ms"] > 0, measured
