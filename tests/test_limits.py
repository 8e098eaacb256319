"""Limits, API key, CORS and overload, against a real `bentoml serve` with tight settings: every
limit answers with its status, a JSON reason, and a count in /metrics."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from classifier_client import RetryingClient
from tests.helpers import (
    ROOT,
    RunningServer,
    metric_total,
    multipart_body,
    open_request,
    python,
    read_response,
    start_server,
    wait_for_job,
)

pytestmark = pytest.mark.e2e

API_KEY = "test-key-" + "x" * 24
EXAMPLE = ROOT / "examples" / "digit_7_00.png"
LIMITS = {"max_request_bytes": 1_000_000, "max_images_per_request": 4, "max_images_per_job": 6,
          "max_concurrency": 4, "request_timeout_s": 3}
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def strict(trained_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("strict")
    (directory / "api_key").write_text(API_KEY + "\n")
    config = directory / "strict.yaml"
    config.write_text(yaml.safe_dump({"services": {"ImageClassifier": {
        "workers": 1,
        "http": {"cors": {"enabled": True, "access_control_allow_origins": [ORIGIN],
                          "access_control_allow_methods": ["GET", "POST"],
                          "access_control_allow_headers": ["Authorization", "Content-Type"]}},
        "image_classifier": {
            "batching": {"max_latency_ms": 2},  # so tight that a burst overloads the batcher
            "limits": {**LIMITS, "target_wait_ms": 0},  # no gate: the burst reaches the batcher
            "security": {"api_key_file": str(directory / "api_key")},
        },
    }}}))
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory, env=env) as server:
        yield server


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def classify(url: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
    files = [("images", ("7.png", EXAMPLE.read_bytes(), "image/png"))]
    return httpx.post(f"{url}/classify", files=files, headers=headers, timeout=60, **kwargs)


def metrics(server: RunningServer) -> str:
    return httpx.get(f"{server.url}/metrics").text


# --- API key --------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, auth("wrong-key-" + "y" * 20), {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}],
                         ids=["none", "wrong", "no-scheme", "basic-scheme"])
def test_model_endpoints_need_the_api_key(strict, headers) -> None:
    response = classify(strict.url, headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    info = httpx.post(f"{strict.url}/model_info", json={}, headers=headers)
    assert info.status_code == 401


def test_the_right_key_is_served(strict) -> None:
    response = classify(strict.url, auth())
    assert response.status_code == 200 and response.json()[0]["label"] == "7"


def test_health_metrics_and_docs_stay_open_without_the_key(strict) -> None:
    for path in ("/livez", "/readyz", "/healthz", "/health", "/v2/health/live",
                 "/v2/health/ready", "/metrics", "/", "/docs.json"):
        assert httpx.get(strict.url + path).status_code == 200, path


def test_the_inference_protocol_needs_the_key(strict, trained_model: str) -> None:
    """The protocol's infer and metadata routes are model endpoints like /classify."""
    name = trained_model.split(":")[0]
    request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                           "data": [0] * 28 * 28}]}
    infer = f"{strict.url}/v2/models/{name}/infer"
    assert httpx.post(infer, json=request).status_code == 401
    assert httpx.get(f"{strict.url}/v2/models/{name}").status_code == 401
    assert httpx.post(infer, json=request, headers=auth()).status_code == 200
    assert httpx.get(f"{strict.url}/v2/models/{name}", headers=auth()).status_code == 200


def test_the_default_configuration_needs_no_key(server) -> None:
    assert classify(server.url).status_code == 200


# --- CORS -----------------------------------------------------------------------------------

def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{url}/classify", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})


def test_cors_allows_the_configured_origin_only(strict) -> None:
    allowed = preflight(strict.url, ORIGIN)
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = preflight(strict.url, "https://elsewhere.example")
    assert "access-control-allow-origin" not in other.headers
    answer = classify(strict.url, {**auth(), "Origin": ORIGIN})
    assert answer.headers.get("access-control-allow-origin") == ORIGIN


def test_cors_is_off_by_default(server) -> None:
    assert "access-control-allow-origin" not in preflight(server.url, ORIGIN).headers
    assert "access-control-allow-origin" not in classify(server.url, {"Origin": ORIGIN}).headers


# --- size limits ----------------------------------------------------------------------------

def declare_a_large_body(url: str) -> tuple[int, bytes]:
    """A request head that announces 50 MB; answered with no body byte sent."""
    sock = open_request(url, "/classify", {
        **auth(), "Content-Type": "multipart/form-data; boundary=x",
        "Content-Length": str(50_000_000)})
    status, _, body = read_response(sock)
    return status, body


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(strict) -> None:
    status, body = declare_a_large_body(strict.url)
    assert status == 413 and b"request_too_large" in body and b"1000000" in body


def test_a_streamed_body_is_cut_off_at_the_limit(strict) -> None:
    """No Content-Length (chunked): refused as soon as the limit is crossed, not at the end."""
    part_head = (b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n")
    sock = open_request(strict.url, "/classify", {
        **auth(), "Content-Type": "multipart/form-data; boundary=x",
        "Transfer-Encoding": "chunked"}, f"{len(part_head):x}\r\n".encode() + part_head + b"\r\n")
    chunk, sent, total = b"\0" * 65536, 0, 20_000_000
    sock.settimeout(0.05)
    while sent < total:
        try:
            if sock.recv(1, socket.MSG_PEEK):  # the answer has arrived
                break
        except TimeoutError:
            pass
        try:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    sock.settimeout(30)
    status, _, body = read_response(sock)
    assert status == 413 and b"request_too_large" in body
    assert sent < total / 2, f"{sent} bytes were sent before the refusal"


def classify_too_many(url: str) -> httpx.Response:
    files = [("images", ("7.png", EXAMPLE.read_bytes(), "image/png"))] * 5
    return httpx.post(f"{url}/classify", files=files, headers=auth(), timeout=60)


def test_more_images_than_allowed_in_one_request(strict) -> None:
    response = classify_too_many(strict.url)
    assert response.status_code == 413 and response.json()["error"] == "too_many_images"


def test_a_job_over_its_image_limit_fails_with_the_reason(strict) -> None:
    files = [("images", ("7.png", EXAMPLE.read_bytes(), "image/png"))] * 7
    task_id = httpx.post(f"{strict.url}/classify_batch/submit", files=files,
                         headers=auth()).json()["task_id"]
    status = wait_for_job(strict.url, task_id, headers=auth())
    assert status == "failed", f"a job over its image limit ended {status}"
    result = httpx.get(f"{strict.url}/classify_batch/get", params={"task_id": task_id},
                       headers=auth())
    assert result.status_code == 413
    assert result.json()["error"] == "too_many_images" and "over the limit of 6" in \
        result.json()["detail"]


# --- timeout and concurrency ----------------------------------------------------------------

def half_sent_upload(url: str) -> tuple[socket.socket, bytes]:
    body, content_type = multipart_body([("7.png", EXAMPLE.read_bytes(), "image/png")])
    sock = open_request(url, "/classify", {**auth(), "Content-Type": content_type,
                                           "Content-Length": str(len(body))}, body[:100])
    return sock, body[100:]


def stall_an_upload(url: str) -> tuple[int, bytes]:
    """A client that stalls mid-upload, until the service gives up on it."""
    sock, _rest = half_sent_upload(url)
    status, _, body = read_response(sock)
    return status, body


@contextlib.contextmanager
def uploads_in_flight(url: str, count: int) -> Iterator[None]:
    """`count` uploads stalled mid-body, in flight in the worker while the block runs; then
    finished: each is still answered."""
    held = [half_sent_upload(url) for _ in range(count)]
    time.sleep(0.5)  # let the worker read their heads
    try:
        yield
    finally:
        statuses = []
        for sock, rest in held:  # one at a time: together they would overload the batcher (2 ms)
            sock.sendall(rest)
            statuses.append(read_response(sock)[0])
    assert statuses == [200] * count, f"uploads held in flight were answered {statuses}"


def test_a_request_not_finished_in_time_gets_504(strict) -> None:
    status, body = stall_an_upload(strict.url)
    assert status == 504, body
    assert b'"timeout"' in body and b"limits.request_timeout_s" in body


def test_over_the_concurrency_limit_gets_429_with_retry_after(strict) -> None:
    with uploads_in_flight(strict.url, LIMITS["max_concurrency"]):
        response = classify(strict.url, auth())
    assert response.status_code == 429, response.text
    assert response.json()["error"] == "too_many_requests"
    assert response.headers["retry-after"] == "1"
    assert classify(strict.url, auth()).status_code == 200


def test_overload_is_refused_with_retry_after_and_the_client_retries(strict) -> None:
    """A burst beyond what the worker takes: 429 (concurrency) and 503 (batcher latency bound)
    with Retry-After, counted in /metrics; our retrying client still gets every answer."""
    before = metrics(strict)
    with ThreadPoolExecutor(32) as pool:
        raw = list(pool.map(lambda _: classify(strict.url, auth()), range(96)))
    statuses = {r.status_code for r in raw}
    assert statuses <= {200, 429, 503}, statuses
    refused = [r for r in raw if r.status_code != 200]
    assert refused, "the burst was not enough to overload one worker"
    assert all(r.headers["retry-after"] == "1" and r.json()["error"] in
               ("too_many_requests", "overloaded") for r in refused)
    after = metrics(strict)
    counted = sum(
        metric_total(after, "image_classifier_rejected_requests_total", reason=reason)
        - metric_total(before, "image_classifier_rejected_requests_total", reason=reason)
        for reason in ("too_many_requests", "overloaded"))
    assert counted == len(refused)

    def retrying(_: int) -> str:
        with RetryingClient(strict.url, api_key=API_KEY) as client:
            return client.classify([EXAMPLE])[0]["label"]

    with ThreadPoolExecutor(32) as pool:
        labels = list(pool.map(retrying, range(64)))
    assert labels == ["7"] * 64


def test_every_limit_is_counted_in_metrics(strict) -> None:
    """One refusal of each kind, made here: each is counted once, by us with its reason and by
    BentoML with its status."""
    before = metrics(strict)
    assert classify(strict.url, headers={}).status_code == 401
    assert declare_a_large_body(strict.url)[0] == 413
    assert classify_too_many(strict.url).status_code == 413
    assert stall_an_upload(strict.url)[0] == 504
    with uploads_in_flight(strict.url, LIMITS["max_concurrency"]):
        assert classify(strict.url, auth()).status_code == 429
    after = metrics(strict)

    def counted(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    for reason, status in [("unauthorized", "401"), ("request_too_large", "413"),
                           ("too_many_images", "413"), ("timeout", "504"),
                           ("too_many_requests", "429")]:
        ours = counted("image_classifier_rejected_requests_total", reason=reason, status=status)
        assert ours == 1, f"one {reason} refusal counted {ours} times"
    for status, refusals in {"401": 1, "413": 2, "504": 1, "429": 1}.items():
        bentoml = counted("bentoml_service_request_total", http_response_code=status)
        assert bentoml == refusals, f"BentoML counted {bentoml} answers {status}, not {refusals}"


def test_a_short_api_key_stops_startup(trained_model: str) -> None:
    env = {**os.environ, "IMAGE_CLASSIFIER_API_KEY": "short"}
    result = python("-c", "from service import ImageClassifier", env=env)
    assert result.returncode != 0
    assert "use at least 16" in result.stderr


# --- the gate: a burst over the worker's pace waits its turn --------------------------------

@pytest.fixture(scope="module")
def gated(trained_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One worker whose gate lets in what it answers in 1 ms: after a few answers, two at a
    time (Pace.FLOOR); everything else waits its turn."""
    directory = tmp_path_factory.mktemp("gated")
    config = directory / "gated.yaml"
    config.write_text(yaml.safe_dump({"services": {"ImageClassifier": {
        "workers": 1,
        "image_classifier": {"limits": {"target_wait_ms": 1, "max_queue_wait_ms": 20_000,
                                        "max_concurrency": 64}},
    }}}))
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory, env=env) as server:
        yield server


def gate(server: RunningServer, state: str) -> float:
    return metric_total(metrics(server), "image_classifier_admission_gate", state=state)


def test_a_burst_over_the_pace_waits_its_turn_and_is_answered(gated) -> None:
    for _ in range(60):  # each answer teaches the pace: none is answered within 1 ms
        assert classify(gated.url).status_code == 200
    assert gate(gated, "limit") == 2, "the gate lets two requests in at a time"
    before = metrics(gated)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: classify(gated.url), range(24)))
    assert [a.status_code for a in answers] == [200] * 24, \
        "the 22 over the pace waited for their turn instead of being refused"
    assert all(a.json()[0]["label"] == "7" for a in answers)
    after = metrics(gated)
    refused = (metric_total(after, "image_classifier_rejected_requests_total")
               - metric_total(before, "image_classifier_rejected_requests_total"))
    assert refused == 0
    assert gate(gated, "waiting") == 0 and gate(gated, "in_flight") == 0
