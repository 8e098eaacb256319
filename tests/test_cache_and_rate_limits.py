"""The result cache and per-client rate limits through real servers.

Cache (one worker, so that a repeat reaches the worker that kept the answer): a repeated upload
is answered `cached: true` and counted as a hit; another model tag (an A/B variant with the same
graph) never gets the first one's answer; the drift window sees real inferences only, and the
answers by class count every answer; a detector's thresholds are part of the key.
Rate limits (two workers): a client over its rate gets 429 `rate_limited` with Retry-After, and
never more answers than burst + rate x elapsed, however its connections spread over the workers;
one keep-alive connection (pinned to a worker) gets that worker's share; a slower client is never
refused; health and metrics are not limited. No assertion depends on latency.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest
from PIL import Image

from serving.routing import Router
from tests.helpers import ROOT, RunningServer, metric_total, start_server, write_config

pytestmark = pytest.mark.e2e

EXAMPLES = ROOT / "examples"
# One image per test, so that no test finds another's answer in the cache.
IMAGE = (EXAMPLES / "digit_7_00.png").read_bytes()
OTHER = (EXAMPLES / "digit_3_02.png").read_bytes()
FOR_TAGS = (EXAMPLES / "digit_2_06.png").read_bytes()
FOR_DRIFT = (EXAMPLES / "digit_6_01.jpg").read_bytes()


def copied_model(tag: str, name: str) -> str:
    """The same graph under a new tag in the store: what a new export brings to a rollout."""
    source = bentoml.models.get(tag)
    with bentoml.models.create(name) as model:
        shutil.copytree(source.path, model.path, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("model.yaml"))
    return str(model.tag)


@pytest.fixture(scope="module")
def variants(trained_model: str) -> tuple[str, str]:
    return trained_model, copied_model(trained_model, "cache-digits-copy")


@pytest.fixture(scope="module")
def cache_server(variants: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("cache")
    config = write_config(directory / "cache.yaml", {
        "cache": {"enabled": True, "max_entries": 100},
        "rollout": {"variants": [{"tag": tag, "weight": 1} for tag in variants]}}, workers=1)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        yield server


def client_for(variant: int, prefix: str) -> dict[str, str]:
    """An X-Client-ID header that the 50/50 router sends to `variant`."""
    router = Router([1, 1], ["X-Client-ID"])
    number = next(n for n in range(1000) if router.choose(f"{prefix}-{n}") == variant)
    return {"X-Client-ID": f"{prefix}-{number}"}


def classify(url: str, images: list[bytes], headers: dict[str, str]) -> list[dict]:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{url}/classify", files=files, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    answers: list[dict] = response.json()
    return answers


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def test_a_repeated_upload_is_answered_from_the_cache(cache_server, variants) -> None:
    url, headers = cache_server.url, client_for(0, "repeat")
    before = metrics(url)
    first, = classify(url, [IMAGE], headers)
    again, = classify(url, [IMAGE], headers)
    assert (first["cached"], again["cached"]) == (False, True)
    assert first["model"] == again["model"] == variants[0]
    same = ("label", "class_id", "confidence", "top_k", "model")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    mixed = classify(url, [IMAGE, OTHER], headers)
    assert [a["cached"] for a in mixed] == [True, False], "each image is looked up on its own"
    after = metrics(url)
    hits = metric_total(after, "image_classifier_cache_hits_total", model=variants[0]) - \
        metric_total(before, "image_classifier_cache_hits_total", model=variants[0])
    misses = metric_total(after, "image_classifier_cache_misses_total", model=variants[0]) - \
        metric_total(before, "image_classifier_cache_misses_total", model=variants[0])
    assert (hits, misses) == (2, 2), "hit ratio = hits / (hits + misses) in /metrics"


def test_another_model_tag_never_gets_the_first_ones_answer(cache_server, variants) -> None:
    url = cache_server.url
    classify(url, [FOR_TAGS], client_for(0, "tag"))
    other, = classify(url, [FOR_TAGS], client_for(1, "tag"))
    assert other["model"] == variants[1] and other["cached"] is False, \
        "the same bytes routed to another tag are run by that model"
    again, = classify(url, [FOR_TAGS], client_for(1, "tag-again"))
    assert again["model"] == variants[1] and again["cached"] is True


def drift_observed(url: str, tag: str) -> int:
    report = httpx.post(f"{url}/drift", json={}, timeout=30).json()
    return int(next(m["observed"] for m in report["models"] if m["model"] == tag))


def test_drift_sees_only_inferences_and_answers_by_class_count_every_answer(
        cache_server, variants) -> None:
    url, headers, tag = cache_server.url, client_for(0, "drift"), variants[0]
    label = classify(url, [FOR_DRIFT], headers)[0]["label"]  # cached from here on
    observed, before = drift_observed(url, tag), metrics(url)
    answers = classify(url, [FOR_DRIFT] * 5, headers)
    assert all(a["cached"] for a in answers)
    assert drift_observed(url, tag) == observed, "cached answers are not fed to drift"
    counted = metric_total(metrics(url), "image_classifier_predictions_total", model=tag,
                           label=label) - metric_total(before,
                                                       "image_classifier_predictions_total",
                                                       model=tag, label=label)
    assert counted == 5, "answers by class count the cached answers"


def test_a_detectors_thresholds_are_part_of_the_key(trained_detector: str, tmp_path: Path
                                                   ) -> None:
    from train_export.detection.scenes import heldout_scenes

    buffer = io.BytesIO()
    Image.fromarray(heldout_scenes(1, seed=3)[0].image).save(buffer, "PNG")
    files = [("images", ("scene.png", buffer.getvalue(), "image/png"))]
    config = tmp_path / "detector.yaml"
    config.write_text(
        "services:\n  ObjectDetector:\n    workers: 1\n    metrics: {enabled: true}\n"
        "    object_detector:\n      cache: {enabled: true}\n")
    with start_server(["service:ObjectDetector"], cwd=ROOT, log_dir=tmp_path,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        def detect(threshold: float) -> dict:
            response = httpx.post(f"{server.url}/detect", files=files, timeout=60,
                                  data={"confidence_threshold": str(threshold)})
            assert response.status_code == 200, response.text
            answer: dict = response.json()[0]
            return answer

        loose, loose_again = detect(0.3), detect(0.3)
        strict = detect(0.95)
        assert (loose["cached"], loose_again["cached"], strict["cached"]) == (False, True, False)
        assert loose_again["detections"] == loose["detections"]
        assert all(d["score"] > 0.95 for d in strict["detections"])
        assert detect(0.95)["cached"] is True


# --- rate limits ---------------------------------------------------------------------------

RATE, BURST, WORKERS = 2.0, 4, 2
FLOOD_S = 4.0


@pytest.fixture(scope="module")
def limited_server(trained_model: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("rate-limit")
    config = write_config(directory / "limited.yaml", {"rate_limit": {
        "enabled": True, "requests_per_s": RATE, "burst": BURST,
        "client_key": ["client_id", "remote_address"]}}, workers=WORKERS)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        yield server


def upload() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", ("a.png", IMAGE, "image/png"))]


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.refused: list[httpx.Response] = []
        self.other: list[str] = []

    def count(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            self.ok += 1
        elif response.status_code == 429:
            self.refused.append(response)
        else:
            self.other.append(f"{response.status_code} {response.text}")


def flood(url: str, client: str, seconds: float, keep_alive: bool) -> tuple[Tally, float]:
    """Requests as fast as answers come back for `seconds`: on new connections (spread over the
    workers), or on one keep-alive connection (one worker). Also the time from the first send to
    the last answer."""
    tally, headers = Tally(), {"X-Client-ID": client}
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=60, headers=headers,
                      limits=httpx.Limits(max_keepalive_connections=1 if keep_alive else 0)
                      ) as session:
        while time.monotonic() - started < seconds:
            tally.count(session.post("/classify", files=upload()))
    return tally, time.monotonic() - started


def polite(url: str, client: str, every_s: float, stop: threading.Event, tally: Tally) -> None:
    """A client well under its rate, even if all its requests reach one worker."""
    while not stop.is_set():
        tally.count(httpx.post(f"{url}/classify", files=upload(), timeout=60,
                               headers={"X-Client-ID": client, "Connection": "close"}))
        stop.wait(every_s)


def test_a_client_over_its_rate_is_refused_and_a_slower_one_never(limited_server) -> None:
    url = limited_server.url
    before = metrics(url)
    stop, slow = threading.Event(), Tally()
    # 1 request per 1.5 s: below even one worker's share (RATE / WORKERS = 1/s).
    thread = threading.Thread(target=polite, args=(url, "slow", 1.5, stop, slow))
    thread.start()
    try:
        greedy, elapsed = flood(url, "greedy", FLOOD_S, keep_alive=False)
    finally:
        stop.set()
        thread.join()
    assert greedy.other == [] and slow.other == [], greedy.other + slow.other
    assert greedy.refused, "a client sending as fast as it can must be refused"
    limit = BURST + RATE * elapsed + 1  # + 1: a token's fraction per worker, rounding
    assert greedy.ok <= limit, (f"{greedy.ok} answers in {elapsed:.1f} s over {WORKERS} "
                                f"workers: more than burst + rate x time ({limit:.1f})")
    assert slow.ok >= 2 and slow.refused == [], "the slower client is never refused"
    refusal = greedy.refused[0]
    assert refusal.json()["error"] == "rate_limited" and set(refusal.json()) == {"error",
                                                                                  "detail"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in greedy.refused)
    rejected = metric_total(metrics(url), "image_classifier_rejected_requests_total",
                            reason="rate_limited") - metric_total(
        before, "image_classifier_rejected_requests_total", reason="rate_limited")
    assert rejected == len(greedy.refused), "every 429 is counted in /metrics by reason"


def test_one_keep_alive_connection_gets_one_workers_share(limited_server) -> None:
    """The stated error of dividing the rate by the workers: a client pinned to one worker."""
    greedy, elapsed = flood(limited_server.url, "pinned", FLOOD_S, keep_alive=True)
    assert greedy.refused and greedy.other == []
    share = BURST / WORKERS + RATE / WORKERS * elapsed + 1
    assert greedy.ok <= share, (f"{greedy.ok} answers in {elapsed:.1f} s on one connection: "
                                f"more than one worker's share ({share:.1f})")
    seconds = [int(r.headers["retry-after"]) for r in greedy.refused]
    assert max(seconds) <= WORKERS / RATE + 1, "Retry-After: until this worker has a token"


def test_health_metrics_and_docs_are_never_limited(limited_server) -> None:
    headers = {"X-Client-ID": "monitor"}
    # One keep-alive connection: one worker, one bucket, emptied before each path is asked for.
    with httpx.Client(base_url=limited_server.url, headers=headers, timeout=30) as session:
        for path in ("/livez", "/readyz", "/metrics", "/docs.json", "/"):
            while session.post("/classify", files=upload()).status_code != 429:
                pass
            assert session.get(path).status_code == 200, f"{path} must never be rate limited"
