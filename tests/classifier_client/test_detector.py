"""DetectorClient: images as repeated `images` parts, thresholds as form fields, the retry policy
of classifier_client.retry, and refusals that carry the service's {"error", "detail"}."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from classifier_client.detector import DetectOptions, DetectorClient, ServiceError
from classifier_client.folder import reason_of

ANSWER = {"detections": [], "width": 4, "height": 4, "model": "digits-detector:test",
          "processing_ms": 1.0}


def service(statuses: list[int], seen: list[httpx.Request]) -> httpx.MockTransport:
    """Answers each status in turn (then 200 with one answer per image) and keeps the requests."""
    remaining = list(statuses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if remaining:
            status = remaining.pop(0)
            return httpx.Response(status, json={"error": "overloaded" if status in (429, 503)
                                                else "invalid_option", "detail": "try again"})
        images = request.content.count(b'name="images"')
        return httpx.Response(200, json=[ANSWER] * images)

    return httpx.MockTransport(handle)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for path in paths:
        path.write_bytes(b"pixels of " + path.name.encode())
    return paths


def test_images_and_only_the_thresholds_set_are_sent(images: list[Path]) -> None:
    seen: list[httpx.Request] = []
    with DetectorClient("http://detector", api_key="k" * 16,
                        transport=service([], seen)) as client:
        answers = client.detect(images, DetectOptions(confidence_threshold=0.25,
                                                      max_detections=5))
    assert answers == [ANSWER, ANSWER]
    body = seen[0].content
    assert seen[0].url.path == "/detect"
    assert seen[0].headers["authorization"] == "Bearer " + "k" * 16
    assert body.count(b'name="images"') == 2 and b"pixels of b.jpg" in body
    assert b'name="confidence_threshold"\r\n\r\n0.25' in body
    assert b'name="max_detections"\r\n\r\n5' in body
    assert b"iou_threshold" not in body, "an unset threshold is left to the service"


def test_overload_is_retried(images: list[Path]) -> None:
    seen: list[httpx.Request] = []
    with DetectorClient("http://detector", transport=service([503, 429], seen)) as client:
        assert client.detect(images[:1]) == [ANSWER]
    assert len(seen) == 3


def test_a_refusal_is_raised_at_once_with_the_services_reason(images: list[Path]) -> None:
    seen: list[httpx.Request] = []
    with DetectorClient("http://detector", transport=service([422], seen)) as client, \
            pytest.raises(ServiceError) as caught:
        client.detect(images[:1])
    assert len(seen) == 1, "a client error is not retried"
    assert caught.value.response.status_code == 422
    assert reason_of(caught.value) == "invalid_option: try again"


def test_options_become_form_fields() -> None:
    assert DetectOptions().form() == {}
    assert DetectOptions(0.05, 0.6, 300).form() == {
        "confidence_threshold": "0.05", "iou_threshold": "0.6", "max_detections": "300"}
