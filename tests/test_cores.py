"""Idle cores in a real two-worker `bentoml serve` (serving/cores.py): a request alone, with the
other worker idle, is answered by the session on every core, with the answer the worker's own
session gives. The default model is light (lone_request_threads: auto leaves it on its own
thread, tests/serving/test_deployment.py), so the session is asked for here by number. No
assertion depends on latency."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import (
    ROOT,
    RunningServer,
    metric_total,
    multipart_body,
    start_server,
    write_config,
)

pytestmark = pytest.mark.e2e

IMAGES = [(ROOT / "examples" / name).read_bytes() for name in ("digit_7_00.png", "digit_2_06.png")]
REQUESTS = 12


@pytest.fixture(scope="module")
def lone_server(trained_model: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("cores")
    config = write_config(directory / "cores.yaml", {"model": {"lone_request_threads": 2}},
                          workers=2)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        both_workers_started(server)
        yield server


def both_workers_started(server: RunningServer, timeout_s: float = 120) -> None:
    """/readyz answers once one worker is up; the other may still be loading and calibrating
    its runtime, which is a busy runtime to every other worker (in `make test`, all 12 requests
    came while worker 1 was still calibrating, and none took every core)."""
    deadline = time.monotonic() + timeout_s
    while server.log_text().count("images per runtime call") < 2:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.1)


def lone_calls(server: RunningServer) -> float:
    return metric_total(httpx.get(f"{server.url}/metrics", timeout=30).text,
                        "image_classifier_lone_calls_total")


def classify(connection: http.client.HTTPConnection, images: list[bytes]) -> list[dict]:
    body, content_type = multipart_body([(f"{i}.png", image, "image/png")
                                         for i, image in enumerate(images)])
    connection.request("POST", "/classify", body, {"Content-Type": content_type})
    response = connection.getresponse()
    answer = response.read()
    assert response.status == 200, answer
    answers: list[dict] = json.loads(answer)
    return answers


def test_requests_one_at_a_time_take_every_core_with_the_same_answers(lone_server) -> None:
    """One keep-alive connection, one request at a time: each is alone in its worker and the
    other worker idles, so each call of one image takes the session on every core. The answers
    are those of a request of two images (which runs as one call on the worker's own session,
    or, where the worker calibrated one image per call, as two calls alone: either way the
    same answers; tests/serving/test_runtime.py has the call of several images)."""
    address = urlsplit(lone_server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        before = lone_calls(lone_server)
        alone = [classify(connection, [image])[0] for image in IMAGES
                 for _ in range(REQUESTS // len(IMAGES))]
        after = lone_calls(lone_server)
        together = classify(connection, IMAGES)
    finally:
        connection.close()
    assert after - before == REQUESTS, f"{after - before} of {REQUESTS} calls on every core"
    for index, expected in enumerate(together):
        for answer in alone[index * (REQUESTS // len(IMAGES)):][:REQUESTS // len(IMAGES)]:
            assert [c["label"] for c in answer["top_k"]] == \
                [c["label"] for c in expected["top_k"]]
            assert answer["label"] == expected["label"]
            for ours, theirs in zip(answer["top_k"], expected["top_k"]):
                assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)


def test_model_info_says_how_many_threads_a_call_alone_takes(lone_server) -> None:
    info = httpx.post(f"{lone_server.url}/model_info", json={}, timeout=30).json()
    assert info["device"]["lone_request_threads"] == 2
    assert info["device"]["on_gpu"] is False
