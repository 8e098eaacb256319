"""Versions behind one API, through real servers: A/B variants by weight with sticky routing
keys, a shadow whose answers are compared and never returned (in a low-priority process per
worker, for the classifier and the detector), rollback by one setting, and `bentoml build`
packing every model the configuration names."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from scipy.stats import binom

from serving.contract import ONNX_FILE
from tests.helpers import (
    BIN,
    ROOT,
    RunningServer,
    bentoml_build,
    metric_total,
    python,
    saved_tag,
    start_server,
    write_config,
)

pytestmark = pytest.mark.e2e

NAME = "rollout-digits"
REQUESTS = 2000
V2_SHARE = 0.10
# Bounds that a correct 90/10 router misses once in a million runs (two-sided).
FALSE_ALARM = 1e-6


def train_version(seed: int) -> str:
    """A real (quick, one-epoch) training run: a new version of NAME in the session's store."""
    result = python("-m", "train_export", "--name", NAME, "--epochs", "1", "--seed", str(seed),
                    "--examples-dir", "", timeout=600)
    assert result.returncode == 0, result.stderr
    return saved_tag(result.stdout)


@pytest.fixture(scope="module")
def versions() -> tuple[str, str]:
    v1 = train_version(seed=1)
    v2 = train_version(seed=2)  # the newest: NAME:latest
    return v1, v2


def digits_payload(holdout, start: int, count: int) -> dict:
    return {"pixels": holdout.holdout_x[start:start + count, ..., 0].tolist()}


def classify_tensor(url: str, payload: dict, headers: dict | None = None) -> list[dict]:
    response = httpx.post(f"{url}/classify_tensor", json=payload, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def served_tags(url: str, payload: dict, keys: list[str | None]) -> list[list[str]]:
    """The model tags of the answers, one request per key (None: no routing header)."""
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(16) as pool:
        def send(key):
            headers = {"X-Client-ID": key} if key is not None else None
            response = client.post("/classify_tensor", json=payload, headers=headers)
            assert response.status_code == 200, response.text
            return [p["model"] for p in response.json()]

        return list(pool.map(send, keys))


@pytest.fixture(scope="module")
def ab_server(versions, tmp_path_factory):
    v1, v2 = versions
    directory = tmp_path_factory.mktemp("ab")
    config = write_config(directory / "ab.yaml", {"rollout": {"variants": [
        {"tag": v1, "weight": 90}, {"tag": v2, "weight": 10}]}}, workers=2)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        yield server


def test_a_90_10_split_sends_10_percent_to_the_second_variant(ab_server, versions, holdout):
    v1, v2 = versions
    before = httpx.get(f"{ab_server.url}/metrics").text
    tags = served_tags(ab_server.url, digits_payload(holdout, 0, 1), [None] * REQUESTS)
    shares = Counter(t for (t,) in tags)
    assert set(shares) == {v1, v2}
    low, high = binom.ppf([FALSE_ALARM / 2, 1 - FALSE_ALARM / 2], REQUESTS, V2_SHARE)
    print(f"90/10 split: {shares[v2]} of {REQUESTS} requests to v2 (bounds {low:.0f}-{high:.0f})")
    assert low <= shares[v2] <= high, f"{shares[v2]} of {REQUESTS} to v2, outside [{low}, {high}]"
    after = httpx.get(f"{ab_server.url}/metrics").text
    for tag in (v1, v2):  # /metrics counts what the answers say, per variant
        routed = (metric_total(after, "image_classifier_routed_requests_total", model=tag)
                  - metric_total(before, "image_classifier_routed_requests_total", model=tag))
        assert routed == shares[tag]
        answered = (metric_total(after, "image_classifier_predictions_total", model=tag)
                    - metric_total(before, "image_classifier_predictions_total", model=tag))
        assert answered == shares[tag]
        assert metric_total(after, "image_classifier_confidence_count", model=tag) >= shares[tag]
        assert metric_total(after, "image_classifier_processing_seconds_count", model=tag) > 0
    assert metric_total(after, "image_classifier_model_info", model=v2, role="variant",
                        weight="10") == 1


def test_a_routing_key_sticks_to_one_variant(ab_server, versions, holdout):
    keys = [f"client-{i}" for i in range(300)]
    payload = digits_payload(holdout, 0, 3)  # 3 images per request: one variant per request
    first, second = served_tags(ab_server.url, payload, keys), served_tags(ab_server.url, payload,
                                                                          keys)
    for key, a, b in zip(keys, first, second):
        assert len(set(a)) == 1 and a == b, f"{key} was answered by {set(a) | set(b)}"
    on_v2 = sum(tags[0] == versions[1] for tags in first)
    low, high = binom.ppf([FALSE_ALARM / 2, 1 - FALSE_ALARM / 2], len(keys), V2_SHARE)
    assert low <= on_v2 <= high
    # /model_info describes the model a key is routed to.
    for key, tags in list(zip(keys, first))[:20]:
        info = httpx.post(f"{ab_server.url}/model_info", json={}, headers={"X-Client-ID": key})
        assert info.json()["tag"] == tags[0]
        assert [v["tag"] for v in info.json()["variants"]] == list(versions)


def local_classes(tag: str, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(bentoml.models.get(tag).path) / ONNX_FILE),
                                   providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": pixels})[0].argmax(axis=1)


def test_the_shadow_is_compared_and_never_answers(versions, holdout, tmp_path):
    v1, v2 = versions
    config = write_config(tmp_path / "shadow.yaml", {
        "model": {"tag": v1}, "rollout": {"shadow": {"tag": v2, "fraction": 1.0,
                                                     "queue_batches": 64}}}, workers=2)
    count, per_request = 40, 8
    pixels = holdout.holdout_x[:count * per_request]
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        answers = [classify_tensor(server.url, digits_payload(holdout, i * per_request,
                                                              per_request))
                   for i in range(count)]
        assert {p["model"] for answer in answers for p in answer} == {v1}
        metrics = wait_for_shadow(server.url, v2, expected=len(pixels))
        check_shadow_processes(server, workers=2)
    agreed = metric_total(metrics, "image_classifier_shadow_comparisons_total", shadow=v2,
                          agree="true")
    compared = metric_total(metrics, "image_classifier_shadow_comparisons_total", shadow=v2)
    dropped = metric_total(metrics, "image_classifier_shadow_dropped_total", shadow=v2)
    # A queue that holds all 40 batches: none is dropped, so every image is compared and the
    # agreement is exactly what the two graphs say on the same pixels.
    assert (compared, dropped) == (len(pixels), 0)
    expected = int((local_classes(v1, pixels) == local_classes(v2, pixels)).sum())
    assert agreed == expected
    assert metric_total(metrics, "image_classifier_shadow_inference_seconds_count", shadow=v2) > 0
    assert metric_total(metrics, "image_classifier_model_info", model=v2, role="shadow") == 1
    assert f"shadow {v2} agreed with the served answer on" in server.log_text()


def check_shadow_processes(server: RunningServer, workers: int) -> None:
    """One shadow process per worker, a child of it, at the lowest priority, without torch."""
    tree = psutil.Process(server.process.pid).children(recursive=True)
    shadows = [p for p in tree if "multiprocessing.spawn" in " ".join(p.cmdline())]
    assert len(shadows) == workers, [p.cmdline() for p in tree]
    for shadow in shadows:
        assert "_bentoml_impl.worker.service" in " ".join(shadow.parent().cmdline())
        assert shadow.nice() == 19
        libraries = {Path(m.path).name for m in shadow.memory_maps()}
        assert not any("torch" in name for name in libraries), sorted(libraries)


def test_the_detectors_shadow_is_compared_in_its_own_process(trained_detector, tmp_path):
    """The comparison is the task's: a detector shadowing itself agrees on every image."""
    config = tmp_path / "detector-shadow.yaml"
    config.write_text(yaml.safe_dump({"services": {"ObjectDetector": {
        "workers": 1, "metrics": {"enabled": True}, "object_detector": {
            "model": {"tag": trained_detector},
            "rollout": {"shadow": {"tag": trained_detector, "queue_batches": 64}}}}}}))
    from train_export.detection.scenes import heldout_scenes

    images = [Image.fromarray(np.asarray(scene.image)) for scene in heldout_scenes(12, seed=0)]
    with start_server(["service:ObjectDetector"], cwd=ROOT, log_dir=tmp_path,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        for number, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            files = [("images", (f"scene{number}.png", buffer.getvalue(), "image/png"))]
            answer = httpx.post(f"{server.url}/detect", files=files, timeout=60)
            assert answer.status_code == 200, answer.text
        metrics = wait_for_shadow(server.url, trained_detector, expected=len(images))
        check_shadow_processes(server, workers=1)
    assert metric_total(metrics, "image_classifier_shadow_comparisons_total",
                        shadow=trained_detector, agree="true") == len(images)
    assert metric_total(metrics, "image_classifier_shadow_dropped_total",
                        shadow=trained_detector) == 0


def wait_for_shadow(url: str, shadow: str, expected: int) -> str:
    """/metrics once the shadow has dealt with every copy (it runs after the answers)."""
    for _ in range(200):
        text = httpx.get(f"{url}/metrics").text
        done = (metric_total(text, "image_classifier_shadow_comparisons_total", shadow=shadow)
                + metric_total(text, "image_classifier_shadow_dropped_total", shadow=shadow))
        if done >= expected:
            return text
        time.sleep(0.1)
    return text


def test_rollback_by_one_setting(versions, holdout, tmp_path):
    """v1 served, then v2 (`latest`), then back to v1 with IMAGE_CLASSIFIER_MODEL_TAG."""
    v1, v2 = versions
    listed = subprocess.run([str(BIN / "bentoml"), "models", "list", NAME, "-o", "json"],
                            capture_output=True, text=True, check=True)
    assert {v1, v2} <= {m["tag"] for m in json.loads(listed.stdout)}
    payload = digits_payload(holdout, 0, 2)
    steps = [({"model": {"tag": v1}}, {}, v1),
             ({"model": {"tag": f"{NAME}:latest"}}, {}, v2),
             ({"model": {"tag": f"{NAME}:latest"}}, {"IMAGE_CLASSIFIER_MODEL_TAG": v1}, v1)]
    for number, (section, extra_env, expected) in enumerate(steps):
        config = write_config(tmp_path / f"step{number}.yaml", section, workers=1)
        env = {**os.environ, "BENTOML_CONFIG": str(config), **extra_env}
        with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path,
                          env=env) as server:
            assert {p["model"] for p in classify_tensor(server.url, payload)} == {expected}
            info = httpx.post(f"{server.url}/model_info", json={}).json()
            assert info["tag"] == expected and len(info["variants"]) == 1


def test_build_packs_every_model_the_configuration_names(versions, tmp_path):
    v1, v2 = versions
    project = tmp_path / "project"
    project.mkdir()
    for name in ("service.py", "classifier_service.py", "bentofile.yaml", "serving",
                 "requirements", "docs", "deploy"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, project / name)
    write_config(project / "configuration.yaml", {
        "rollout": {"variants": [{"tag": v1, "weight": 100}, {"tag": v2, "weight": 0}],
                    "shadow": {"tag": v2}}})
    packed = {str(m.tag) for m in bentoml.get(bentoml_build(project)).info.all_models}
    assert packed == {v1, v2}  # v2 with weight 0: there to roll forward to, or to shadow
