"""Observability through a real server: metrics after known traffic, one JSON log line per
request, online drift that flags blurred digits and not clean ones, and a Grafana dashboard whose
queries name metrics the service exports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from devtools.processes import free_port, stop_tree
from tests.helpers import ROOT, metric_samples, metric_total, start_server, write_config
from train_export.drift_report import blur

pytestmark = pytest.mark.e2e

MONITORING = ROOT / "deploy" / "monitoring"
WINDOW = 200


@pytest.fixture(scope="module")
def observed(trained_model, tmp_path_factory):
    """One worker (its drift window sees every image), a shadow (so that every metric the
    dashboard uses exists), drift tested on demand only."""
    directory = tmp_path_factory.mktemp("observed")
    config = write_config(directory / "observed.yaml", {
        "model": {"tag": trained_model},
        "rollout": {"shadow": {"tag": trained_model}},
        "drift": {"window_size": WINDOW, "min_samples": WINDOW, "interval_s": 3600}},
        workers=1)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        yield server


def png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[..., 0])).save(buffer, format="PNG")
    return buffer.getvalue()


def scrape(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def delta(before: str, after: str, name: str, **labels: str) -> float:
    return metric_total(after, name, **labels) - metric_total(before, name, **labels)


def test_metrics_count_known_traffic(observed, holdout, trained_model) -> None:
    images = [png(holdout.holdout_x[i]) for i in range(30)]
    before = scrape(observed)
    answers = []
    with httpx.Client(base_url=observed.url, timeout=30) as client:
        for start in range(0, 30, 3):  # 10 requests of 3 images
            response = client.post("/classify", files=[
                ("images", (f"{i}.png", images[i], "image/png")) for i in range(start, start + 3)])
            assert response.status_code == 200, response.text
            answers += response.json()
        assert client.post("/classify", files=[("images", ("x.png", b"not an image"))]
                           ).status_code == 400
    after = scrape(observed)
    by_class = Counter(a["label"] for a in answers)
    for label, count in by_class.items():
        assert delta(before, after, "image_classifier_predictions_total", label=label,
                     model=trained_model) == count
    assert delta(before, after, "image_classifier_confidence_count", model=trained_model) == 30
    assert delta(before, after, "image_classifier_confidence_sum", model=trained_model) == \
        pytest.approx(sum(a["confidence"] for a in answers), rel=1e-6)
    assert delta(before, after, "image_classifier_processing_seconds_count",
                 model=trained_model) == 30
    assert delta(before, after, "image_classifier_routed_requests_total",
                 model=trained_model) == 10
    # 31 uploads opened (the bad one is not an image: no size); 28x28 each.
    assert delta(before, after, "image_classifier_image_pixels_count") == 30
    assert delta(before, after, "image_classifier_image_pixels_sum") == 30 * 28 * 28
    assert delta(before, after, "image_classifier_upload_bytes_sum") == \
        sum(len(i) for i in images) + len(b"not an image")
    assert delta(before, after, "image_classifier_rejected_requests_total",
                 reason="invalid_image", status="400") == 1
    assert metric_total(after, "image_classifier_model_info", model=trained_model,
                        role="variant") == 1


def log_lines(server, wanted: set[str]) -> dict[str, dict]:
    """The request log lines by request id, once all of `wanted` are written (a line is
    written as its answer finishes, so it may land just after the client has the answer)."""
    for _ in range(100):
        lines = {line["request_id"]: line for line in map(json.loads, (
            ln for ln in server.log_text().splitlines() if ln.startswith('{"ts"')))}
        if wanted <= set(lines):
            return lines
        time.sleep(0.05)
    return lines


def test_one_json_line_per_request_and_never_the_image(observed, holdout, trained_model):
    image = png(holdout.holdout_x[0])
    with httpx.Client(base_url=observed.url, timeout=30) as client:
        ok = client.post("/classify", headers={"X-Request-ID": "req-ok-1"},
                         files=[("images", ("a.png", image)), ("images", ("b.png", image))])
        bad = client.post("/classify", headers={"X-Request-ID": "req-bad-1"},
                          files=[("images", ("c.png", image[:40]))])
        unnamed = client.post("/model_info", json={})
    assert ok.headers["x-request-id"] == "req-ok-1" and bad.status_code == 400
    assert len(unnamed.headers["x-request-id"]) == 32, "a new id when the caller sends none"
    lines = log_lines(observed, {"req-ok-1", "req-bad-1", unnamed.headers["x-request-id"]})
    line = lines["req-ok-1"]
    assert line["route"] == "/classify" and line["status"] == 200 and line["outcome"] == "ok"
    assert line["images"] == 2 and line["models"] == [trained_model]
    assert [p["label"] for p in line["predictions"]] == [a["label"] for a in ok.json()]
    assert line["latency_ms"] > 0
    assert lines["req-bad-1"]["status"] == 400
    assert lines["req-bad-1"]["outcome"] == "invalid_image"
    assert lines[unnamed.headers["x-request-id"]]["route"] == "/model_info"
    log = observed.log_text()
    assert "PNG" not in "".join(ln for ln in log.splitlines() if ln.startswith('{"ts"'))


def send_stream(server, pixels: np.ndarray) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for start in range(0, len(pixels), 25):
            response = client.post("/classify_tensor",
                                   json={"pixels": pixels[start:start + 25, ..., 0].tolist()})
            assert response.status_code == 200, response.text


def drift_now(server) -> dict:
    response = httpx.post(f"{server.url}/drift", json={"test_now": True}, timeout=60)
    assert response.status_code == 200, response.text
    (state,) = response.json()["models"]
    return state


@pytest.mark.parametrize("route", ["/classify", "/classify_tensor"])
def test_a_client_that_hangs_up_mid_body_is_logged_as_499_not_as_a_server_error(observed, route):
    """The body announced, a part sent, the connection closed: nobody gets an answer, and the
    request log and the refusal counter say the client left (499), not that the server failed."""
    before = scrape(observed)
    request_id = f"req-gone-{route.strip('/')}"
    media_type = "multipart/form-data; boundary=b" if route == "/classify" else "application/json"
    start = ("--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
             "Content-Type: image/png\r\n\r\n\x89PNG" if route == "/classify"
             else '{"pixels": [[[0, 0')
    host, port = observed.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall((f"POST {route} HTTP/1.1\r\nHost: {host}\r\n"
                            f"X-Request-ID: {request_id}\r\nContent-Type: {media_type}\r\n"
                            f"Content-Length: 100000\r\n\r\n{start}").encode("latin-1"))
        time.sleep(0.2)  # read by the server, then the client is gone
    line = log_lines(observed, {request_id}).get(request_id)
    assert line is not None, "no request log line for a client that hung up"
    assert (line["status"], line["outcome"]) == (499, "client_closed_request"), line
    after = scrape(observed)
    assert delta(before, after, "image_classifier_rejected_requests_total",
                 reason="client_closed_request") == 1
    assert delta(before, after, "bentoml_service_request_total", http_response_code="500") == 0


def test_opentelemetry_runs_only_where_an_exporter_is_configured(observed, holdout,
                                                                trained_model, tmp_path):
    """serving/tracing.py: with no exporter (the shipped configuration) BentoML's OpenTelemetry
    middleware is left out, and with it the span id BentoML sends as X-BentoML-Request-ID; with
    one configured, the middleware is back and every route still answers."""
    image = png(holdout.holdout_x[0])
    files = [("images", ("a.png", image))]
    untraced = [httpx.post(f"{observed.url}{route}", files=files, timeout=30)
                for route in ("/classify", "/classify")] + \
        [httpx.post(f"{observed.url}/model_info", json={}, timeout=30)]
    assert [r.status_code for r in untraced] == [200, 200, 200]
    assert not any("x-bentoml-request-id" in r.headers for r in untraced)
    config = write_config(tmp_path / "traced.yaml", {"model": {"tag": trained_model}},
                          workers=1, tracing={"exporter_type": "in_memory"})
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as traced:
        answers = [httpx.post(f"{traced.url}/classify", files=files, timeout=30),
                   httpx.post(f"{traced.url}/model_info", json={}, timeout=30)]
    assert [r.status_code for r in answers] == [200, 200]
    assert all(len(r.headers.get("x-bentoml-request-id", "")) == 16 for r in answers), \
        [dict(r.headers) for r in answers]
    assert answers[0].json()[0]["label"] == untraced[0].json()[0]["label"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_flags_blurred_digits_and_not_clean_ones(observed, holdout, seed) -> None:
    """Held-out digits the model never trained on, then the same digits blurred (sigma 2): each
    stream fills the whole window, so each test sees one stream only."""
    rng = np.random.default_rng(seed)
    clean = holdout.holdout_x[rng.permutation(len(holdout.holdout_x))[:WINDOW]]
    send_stream(observed, clean)
    state = drift_now(observed)
    assert state["window_size"] == WINDOW and state["reference_size"] == 500
    assert state["drift"] is False, state
    send_stream(observed, blur(clean, sigma=2.0))
    state = drift_now(observed)
    assert state["drift"] is True and state["p_value"] < state["threshold"], state
    metrics = scrape(observed)
    assert metric_total(metrics, "image_classifier_drift_detected") == 1
    assert metric_total(metrics, "image_classifier_drift_p_value") == state["p_value"]


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set()
    for expr in expressions:
        names |= set(re.findall(r"\b((?:image_classifier|bentoml_service)_[a-z_]+)", expr))
    return names


def test_the_dashboard_queries_metrics_the_service_exports(observed, holdout) -> None:
    send_stream(observed, holdout.holdout_x[:WINDOW])  # traffic, and a full drift window
    with httpx.Client(base_url=observed.url, timeout=30) as client:  # at least one of each
        client.post("/classify", files=[("images", ("x.png", b"not an image"))])
        client.post("/drift", json={"test_now": True})
    exported = scrape(observed)
    names = dashboard_metric_names()
    assert len(names) >= 15
    missing = sorted(n for n in names if not metric_samples(exported, n))
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"
    titles = " ".join(p["title"].lower() for p in json.loads(
        (MONITORING / "grafana-dashboard.json").read_text())["panels"])
    for topic in ("traffic", "latency", "batch", "class mix", "confidence", "drift p-value",
                  "errors"):
        assert topic in titles, topic
    # The labels the panels group by exist on BentoML's request metrics.
    assert re.search(r'bentoml_service_request_total\{[^}]*endpoint="/classify"[^}]*'
                     r'http_response_code="200"', exported)


@pytest.fixture
def prometheus(observed, tmp_path):
    """A real Prometheus (Debian's package) scraping the observed server every second, with the
    shipped alert rules; stopped by its PID."""
    shipped = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    job = shipped["scrape_configs"][0]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [observed.url.removeprefix("http://")]
    shipped["rule_files"] = [str(MONITORING / name) for name in shipped["rule_files"]]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp_path / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={url.removeprefix('http://')}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            # Ready, then the first scrape: Prometheus hands targets to its scrapers every 5 s.
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):  # not up yet
                    if query(url, 'count({job="image-classifier"})')["data"]["result"]:
                        break
                time.sleep(0.1)
            yield url
        finally:
            stop_tree(process)


def query(prometheus: str, expr: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    return response.json()


def test_the_dashboard_queries_run_in_prometheus(observed, prometheus, holdout) -> None:
    for name in ("prometheus.yml", "alerts.yml"):
        kind = "config" if name == "prometheus.yml" else "rules"
        checked = subprocess.run(["promtool", "check", kind, str(MONITORING / name)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    # Traffic while Prometheus scrapes: rates need two scrapes with something in between.
    for _ in range(4):
        send_stream(observed, holdout.holdout_x[:50])
        seven = ("images", ("7.png", png(holdout.holdout_x[0])))
        httpx.post(f"{observed.url}/classify",
                   files=[("images", ("x.png", b"not an image")), seven])
        httpx.post(f"{observed.url}/classify", files=[seven])
        httpx.post(f"{observed.url}/drift", json={"test_now": True}, timeout=60)
        time.sleep(1.2)
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m")
            answer = query(prometheus, expr)
            assert answer["status"] == "success", (panel["title"], expr, answer)
            if not answer["data"]["result"]:
                empty.append(panel["title"])
    # Every panel shows data after this traffic (the shadow's drop share may be 0, not empty).
    assert not empty, f"panels with no data: {sorted(set(empty))}"
    up = query(prometheus, 'up{job="image-classifier"}')["data"]["result"]
    assert up and up[0]["value"][1] == "1"
