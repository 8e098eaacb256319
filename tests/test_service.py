"""End to end against a real `bentoml serve` on 127.0.0.1 (the `server` fixture)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import pytest

from tests.conftest import digit_images
from tests.helpers import metric_samples, metric_total

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def digits(holdout, tmp_path_factory) -> list[tuple[Path, int]]:
    return digit_images(holdout, tmp_path_factory.mktemp("digits"), 120)


def post_images(url: str, paths: list[Path], client: httpx.Client | None = None) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(),
                         "image/png" if p.suffix == ".png" else "image/jpeg"))
             for p in paths]
    return (client or httpx).post(f"{url}/classify", files=files, timeout=60)


def test_held_out_digits_via_the_bentoml_client(server, digits, trained_model) -> None:
    with bentoml.SyncHTTPClient(server.url) as client:
        answers = []
        for start in range(0, 60, 4):  # several images per request
            answers += client.classify(images=[p for p, _ in digits[start:start + 4]])
    correct = sum(a["label"] == str(y) for a, (_, y) in zip(answers, digits[:60]))
    assert len(answers) == 60
    assert correct / 60 >= 0.95, f"accuracy {correct}/60 through SyncHTTPClient"
    assert {a["model"] for a in answers} == {trained_model}


def test_held_out_digits_via_raw_multipart(server, digits) -> None:
    with httpx.Client() as client:
        answers = [post_images(server.url, [p], client) for p, _ in digits[60:]]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.is_error]
    labels = [r.json()[0]["label"] for r in answers]
    correct = sum(label == str(y) for label, (_, y) in zip(labels, digits[60:]))
    assert correct / len(labels) >= 0.95, f"accuracy {correct}/{len(labels)} over raw HTTP"
    first = answers[0].json()[0]
    assert set(first) == {"label", "class_id", "confidence", "top_k", "model", "processing_ms",
                          "cached"}
    assert first["cached"] is False  # the cache is off as shipped
    assert len(first["top_k"]) == 3 and first["top_k"][0]["label"] == first["label"]
    assert first["processing_ms"] > 0


def test_many_images_in_one_request_keep_their_order(server, digits) -> None:
    chosen = [d for d in digits if d[1] in (0, 1, 7)][:3] + [d for d in digits if d[1] == 4][:1]
    single = [post_images(server.url, [p]).json()[0]["label"] for p, _ in chosen]
    for order in (chosen, chosen[::-1]):
        together = post_images(server.url, [p for p, _ in order])
        assert together.status_code == 200
        expected = single if order is chosen else single[::-1]
        assert [a["label"] for a in together.json()] == expected


def test_classify_tensor_answers_in_both_layouts(server, holdout) -> None:
    pixels = holdout.holdout_x[:16]
    for body in (pixels[..., 0].tolist(), pixels.tolist()):  # (N, H, W) and (N, H, W, C)
        response = httpx.post(f"{server.url}/classify_tensor", json={"pixels": body}, timeout=30)
        assert response.status_code == 200, response.text
        labels = [a["label"] for a in response.json()]
        assert sum(lbl == str(y) for lbl, y in zip(labels, holdout.holdout_y[:16])) >= 15


def test_health_metrics_docs_and_swagger(server) -> None:
    for path in ("/livez", "/readyz", "/healthz"):
        assert httpx.get(server.url + path).status_code == 200, path
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert {"/classify", "/classify_tensor", "/model_info"} <= set(spec["paths"])
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert "bentoml_service_request_total" in httpx.get(f"{server.url}/metrics").text


def test_model_info_describes_the_served_model(server, trained_model) -> None:
    info = httpx.post(f"{server.url}/model_info", json={}).json()
    assert info["tag"] == trained_model
    assert info["labels"] == [str(d) for d in range(10)]
    assert info["input"]["height"] == 28 and info["input"]["color_mode"] == "L"
    assert info["active_provider"] in info["providers"]
    assert info["gpu_available"] == (info["active_provider"] == "CUDAExecutionProvider")
    assert info["parity"]["onnxruntime_max_abs_diff"] <= 1e-4
    assert info["accuracy"]["holdout"] >= 0.97


def test_concurrent_requests_form_adaptive_batches(server, digits) -> None:
    paths = [p for p, _ in digits[:64]]
    with (httpx.Client(limits=httpx.Limits(max_connections=64)) as client,
          ThreadPoolExecutor(64) as pool):
        for _ in range(5):
            responses = list(pool.map(lambda p: post_images(server.url, [p], client), paths))
            assert all(r.status_code == 200 for r in responses)
    samples = metric_samples(httpx.get(f"{server.url}/metrics").text,
                             "bentoml_service_adaptive_batch_size_bucket")
    classify = {k: v for k, v in samples.items() if 'method_name="classify"' in k}
    # one histogram per worker process: sum the buckets over workers
    at_most_one = sum(v for k, v in classify.items() if 'le="1.0"' in k)
    total = sum(v for k, v in classify.items() if 'le="+Inf"' in k)
    assert total > at_most_one, f"no batch larger than 1 formed: {classify}"


def test_the_fast_lane_answers_a_lone_request_at_once_and_hands_the_others_to_the_batcher(
        server, digits) -> None:
    """One at a time, every request finds its model idle and the fast lane answers it at once
    (serving/fast_lane.py), counted as a batch of one in BentoML's batch-size histogram; sent
    together, the lane hands most of them to BentoML's batcher, which batches them. Every
    request goes through the lane, is in exactly one batch, and gets the same answer either way,
    with BentoML's own headers."""
    paths = [p for p, _ in digits[:32]]

    def counts() -> tuple[float, float, float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return (metric_total(text, "image_classifier_fast_lane_answers_total", route="/classify",
                             how="alone"),
                metric_total(text, "image_classifier_fast_lane_answers_total", route="/classify",
                             how="batched"),
                metric_total(text, "bentoml_service_adaptive_batch_size_sum",
                             method_name="classify"),
                metric_total(text, "bentoml_service_adaptive_batch_size_count",
                             method_name="classify"))

    alone_0, batched_0, requests_0, batches_0 = counts()
    answers = [post_images(server.url, [p]) for p in paths]
    alone = [a.json()[0] for a in answers]
    alone_1, batched_1, requests_1, batches_1 = counts()
    assert (alone_1 - alone_0, batched_1 - batched_0) == (32, 0), "each request alone"
    assert (requests_1 - requests_0, batches_1 - batches_0) == (32, 32), "each a batch of one"
    assert answers[0].headers["server"] == "BentoML Service/ImageClassifier"
    # 32 threads usually overlap in a worker at once; on a loaded machine a round may happen to
    # send them one after another, so a few rounds are allowed for the batcher to get some.
    handed_to_the_batcher = 0.0
    with (httpx.Client(limits=httpx.Limits(max_connections=32)) as client,
          ThreadPoolExecutor(32) as pool):
        for _ in range(5):
            together = [r.json()[0] for r in
                        pool.map(lambda p: post_images(server.url, [p], client), paths)]
            alone_2, batched_2, requests_2, _ = counts()
            assert (alone_2 - alone_1) + (batched_2 - batched_1) == 32, \
                "every request through the lane"
            assert requests_2 - requests_1 == 32, "each request in exactly one batch"
            assert [a["label"] for a in alone] == [t["label"] for t in together]
            assert [a["confidence"] for a in alone] == pytest.approx(
                [t["confidence"] for t in together], abs=1e-6)
            handed_to_the_batcher += batched_2 - batched_1
            if handed_to_the_batcher:
                break
            alone_1, batched_1, requests_1 = alone_2, batched_2, requests_2
    assert handed_to_the_batcher > 0, "none handed to the batcher in 5 rounds of 32 together"
