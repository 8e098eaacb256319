"""Faults against a real `bentoml serve` of our own: SIGTERM in the middle of uploads loses no
accepted request, and a killed worker is replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.helpers import (
    ROOT,
    RunningServer,
    metric_total,
    multipart_body,
    open_request,
    read_response,
    start_server,
)

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "digit_7_00.png"
REQUEST_TIMEOUT_S = 20  # the grace period: no accepted request outlives it
REPLACEMENT_DEADLINE_S = 30  # circus checks every 10 s; a worker then starts in a few s


@contextlib.contextmanager
def own_server(tmp_path: Path, workers: int) -> Iterator[RunningServer]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"services": {"ImageClassifier": {
        "workers": workers,
        "image_classifier": {"limits": {"request_timeout_s": REQUEST_TIMEOUT_S}},
    }}}))
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path, env=env) as server:
        yield server


def in_progress(server: RunningServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_total(text, "bentoml_service_request_in_progress", endpoint="/classify")


def test_sigterm_under_load_loses_no_accepted_request(trained_model, tmp_path) -> None:
    body, content_type = multipart_body([("7.png", EXAMPLE.read_bytes(), "image/png")])
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    with own_server(tmp_path, workers=2) as server:
        # 24 requests accepted by the workers: 12 whole (being answered), 12 still uploading.
        whole = [open_request(server.url, "/classify", headers, body) for _ in range(12)]
        uploading = [open_request(server.url, "/classify", headers, body[:200]) for _ in range(12)]
        deadline = time.monotonic() + 30
        while in_progress(server) < 12 and time.monotonic() < deadline:
            time.sleep(0.1)  # the uploading ones stay in progress until their bodies finish
        assert in_progress(server) >= 12, "the uploads never reached the workers"

        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # shutdown under way: the workers have been told to stop
        for sock in uploading:
            sock.sendall(body[200:])
        answers = [read_response(sock) for sock in whole + uploading]

        sent, answered = len(answers), sum(status == 200 for status, _, _ in answers)
        assert (sent, answered) == (24, 24), [status for status, _, _ in answers]
        assert all(b'"label": "7"' in payload for _, _, payload in answers)
        try:
            server.process.wait(timeout=REQUEST_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {REQUEST_TIMEOUT_S + 10} s after SIGTERM")


def worker_processes(server: RunningServer) -> list[psutil.Process]:
    alive = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a killed one is gone, or a zombie
            if "_bentoml_impl.worker.service" in " ".join(process.cmdline()):
                alive.append(process)
    return alive


def classify_example(server: RunningServer) -> int:
    files = [("images", ("7.png", EXAMPLE.read_bytes(), "image/png"))]
    return httpx.post(f"{server.url}/classify", files=files, timeout=10).status_code


def wait_for_replacement(server: RunningServer, known: set[int]) -> psutil.Process:
    """A worker that is not one of `known`. BentoML's process manager (circus) looks at its
    workers every 10 s: a dead one is replaced at the next look, then loads the model."""
    deadline = time.monotonic() + REPLACEMENT_DEADLINE_S
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(classify_example(server))  # the service answers all along
        fresh = [w for w in worker_processes(server) if w.pid not in known]
        if fresh:
            assert set(statuses) == {200}, statuses
            return fresh[0]
        time.sleep(0.2)
    pytest.fail(f"no replacement in {REPLACEMENT_DEADLINE_S} s:\n{server.log_text()}")


def test_a_killed_worker_is_replaced_and_the_service_answers_throughout(trained_model,
                                                                         tmp_path) -> None:
    with own_server(tmp_path, workers=2) as server:
        first, second = worker_processes(server)
        first.kill()
        replacement = wait_for_replacement(server, {first.pid, second.pid})
        # Now kill the other original: whatever answers from here on is the replacement.
        second.kill()
        answers = [classify_example(server) for _ in range(20)]
        assert answers == [200] * 20, answers
        assert replacement.is_running()
        wait_for_replacement(server, {first.pid, second.pid, replacement.pid})
