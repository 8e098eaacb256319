"""Hostile and broken input against a real `bentoml serve`: each case gets its status and a JSON
`{"error": <code>, "detail": ...}`, reaches no runtime, crashes no worker, and a valid request
sent at the same time is answered."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.helpers import BIN, ROOT, metric_total

pytestmark = pytest.mark.e2e

PNG, JPEG = "image/png", "image/jpeg"


def image_bytes(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def digit(size: int = 28) -> Image.Image:
    """A held-out 7 from examples/, the way the training data looks."""
    with Image.open(ROOT / "examples" / "digit_7_00.png") as image:
        return image.convert("L").resize((size, size))


def animated_gif() -> bytes:
    frames = [digit().convert("P"), Image.new("P", (28, 28))]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def png_16_bit() -> bytes:
    return image_bytes(Image.fromarray(np.asarray(digit(), np.uint16) * 257), "PNG")


def palette_with_transparency() -> bytes:
    image = digit().convert("P")
    return image_bytes(image, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    return image_bytes(digit().rotate(90, expand=True).convert("RGB"), "JPEG", exif=exif)


def huge_blank_png(width: int, height: int) -> bytes:
    """A decompression bomb: a few hundred kB on the wire, billions of bytes decoded."""
    return image_bytes(Image.new("1", (width, height)), "PNG")


def multipart(*files: tuple[str, bytes, str]) -> dict:
    return {"files": [("images", f) for f in files]}


def tensor(pixels: object) -> dict:
    return {"json": {"pixels": pixels}}


def raw_json(text: str) -> dict:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


@dataclass
class Case:
    route: str
    request: Callable[[], dict]
    status: int
    code: str = ""
    detail: str = ""
    answers: int = 1  # valid cases: predictions expected
    label: str | None = None  # valid cases: the label expected (None: blank images, any label)


TRUNCATED_JPEG = lambda: image_bytes(digit(64).convert("RGB"), "JPEG")[:300]  # noqa: E731
TRUNCATED_PNG = lambda: image_bytes(digit(64), "PNG")[:60]  # noqa: E731
ZEROS = np.zeros((28, 28), int).tolist()

BAD_INPUT = {
    # /classify: what a multipart upload can get wrong
    "zero-bytes": Case("/classify", lambda: multipart(("a.png", b"", PNG)),
                       400, "invalid_image", "empty (0 bytes)"),
    "random-bytes": Case("/classify", lambda: multipart(
        ("a.jpg", np.random.default_rng(0).bytes(4096), JPEG)), 400, "invalid_image",
        "not an image"),
    "text-file": Case("/classify", lambda: multipart(("a.png", b"hello, not an image\n", PNG)),
                      400, "invalid_image", "not an image"),
    "pdf-renamed-jpg": Case("/classify", lambda: multipart(
        ("scan.jpg", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", JPEG)),
        400, "invalid_image", "not an image"),
    "truncated-jpeg": Case("/classify", lambda: multipart(("a.jpg", TRUNCATED_JPEG(), JPEG)),
                           400, "invalid_image", "send a complete"),
    "truncated-png": Case("/classify", lambda: multipart(("a.png", TRUNCATED_PNG(), PNG)),
                          400, "invalid_image", "send a complete"),
    "60-megapixels": Case("/classify", lambda: multipart(("b.png", huge_blank_png(10000, 6000),
                                                          PNG)),
                          413, "image_too_large", "over the limit of 40000000"),
    "400-megapixels": Case("/classify", lambda: multipart(("b.png", huge_blank_png(20000, 20000),
                                                           PNG)),
                           413, "image_too_large", "too large to decode safely"),
    "33-images": Case("/classify", lambda: multipart(
        *[("d.png", image_bytes(digit(), "PNG"), PNG)] * 33),
        413, "too_many_images", "over the limit of 32"),
    "no-file": Case("/classify", lambda: {"files": [("other", ("a.png", b"x", PNG))]},
                    422, "missing_input", "images is required"),
    "text-instead-of-file": Case("/classify", lambda: {"data": {"images": "digit.png"}, "files": [
        ("unrelated", ("a", b"x", PNG))]}, 422, "not_a_file", "file part"),
    "url-instead-of-file": Case("/classify", lambda: {
        "data": {"images": "http://example.com/digit.png"},
        "files": [("unrelated", ("a", b"x", PNG))]}, 422, "not_a_file", "URLs are not accepted"),
    "json-to-classify": Case("/classify", lambda: {"json": {"images": []}},
                             415, "unsupported_media_type", "takes multipart/form-data"),
    "multipart-without-boundary": Case("/classify", lambda: {
        "content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        400, "invalid_multipart", "could not be parsed"),
    # /classify_tensor: what JSON pixels can get wrong
    "tensor-wrong-rank": Case("/classify_tensor", lambda: tensor(ZEROS),
                              422, "invalid_tensor", "expects (N, 28, 28) or (N, 28, 28, 1)"),
    "tensor-wrong-size": Case("/classify_tensor", lambda: tensor(np.zeros((1, 8, 8)).tolist()),
                              422, "invalid_tensor", "expects (N, 28, 28) or (N, 28, 28, 1)"),
    "tensor-wrong-channels": Case("/classify_tensor", lambda: tensor(
        np.zeros((1, 28, 28, 3)).tolist()), 422, "invalid_tensor", "(N, 28, 28, 1)"),
    "tensor-ragged": Case("/classify_tensor", lambda: tensor([[[1, 2], [3]]]),
                          422, "invalid_tensor", "rectangular array"),
    "tensor-strings": Case("/classify_tensor", lambda: tensor([[["a"] * 28] * 28]),
                           422, "invalid_tensor", "numbers 0-255"),
    "tensor-nan": Case("/classify_tensor", lambda: raw_json(
        '{"pixels": [' + json.dumps(ZEROS).replace("0", "NaN", 1) + "]}"),
        422, "invalid_tensor", "finite numbers from 0 to 255"),
    "tensor-infinity": Case("/classify_tensor", lambda: raw_json(
        '{"pixels": [' + json.dumps(ZEROS).replace("0", "Infinity", 1) + "]}"),
        422, "invalid_tensor", "finite numbers from 0 to 255"),
    "tensor-out-of-range": Case("/classify_tensor", lambda: tensor([[[300] * 28] * 28]),
                                422, "invalid_tensor", "from 0 to 255"),
    "tensor-not-integer": Case("/classify_tensor", lambda: tensor([[[0.5] * 28] * 28]),
                               422, "invalid_tensor", "whole numbers"),
    "tensor-33-rows": Case("/classify_tensor", lambda: tensor([ZEROS] * 33),
                           413, "too_many_images", "over the limit of 32"),
    "tensor-missing-field": Case("/classify_tensor", lambda: {"json": {"pixel": ZEROS}},
                                 422, "missing_input", "pixels is required"),
    "tensor-invalid-json": Case("/classify_tensor", lambda: raw_json('{"pixels": [[1, 2'),
                                400, "invalid_json", "not valid JSON"),
    "tensor-as-text-plain": Case("/classify_tensor", lambda: {
        "content": json.dumps({"pixels": [ZEROS]}), "headers": {"Content-Type": "text/plain"}},
        415, "unsupported_media_type", "takes application/json"),
}

VALID_ODDITIES = {
    "animated-gif": Case("/classify", lambda: multipart(("a.gif", animated_gif(), "image/gif")),
                         200, label="7"),
    "16-bit-png": Case("/classify", lambda: multipart(("a.png", png_16_bit(), PNG)), 200,
                       label="7"),
    "cmyk-jpeg": Case("/classify", lambda: multipart(
        ("a.jpg", image_bytes(digit().convert("CMYK"), "JPEG"), JPEG)), 200, label="7"),
    "palette-with-transparency": Case("/classify", lambda: multipart(
        ("a.png", palette_with_transparency(), PNG)), 200, label="7"),
    "exif-rotated-jpeg": Case("/classify", lambda: multipart(
        ("a.jpg", exif_rotated_jpeg(), JPEG)), 200, label="7"),
    "1x1": Case("/classify", lambda: multipart(
        ("a.png", image_bytes(Image.new("L", (1, 1), 255), "PNG"), PNG)), 200),
    "very-wide": Case("/classify", lambda: multipart(
        ("a.png", image_bytes(Image.new("L", (20000, 3), 255), "PNG"), PNG)), 200),
    "png-named-jpg": Case("/classify", lambda: multipart(
        ("a.jpg", image_bytes(digit(), "PNG"), JPEG)), 200, label="7"),
    "jpeg-declared-png": Case("/classify", lambda: multipart(
        ("a.png", image_bytes(digit().convert("RGB"), "JPEG"), PNG)), 200, label="7"),
    "octet-stream": Case("/classify", lambda: multipart(
        ("blob", image_bytes(digit(), "PNG"), "application/octet-stream")), 200, label="7"),
    "32-images": Case("/classify", lambda: multipart(
        *[("d.png", image_bytes(digit(), "PNG"), PNG)] * 32), 200, answers=32, label="7"),
}


def send(url: str, case: Case) -> httpx.Response:
    return httpx.post(url + case.route, timeout=60, **case.request())


def send_valid(url: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", files=[("images", ("7.png", image_bytes(digit(), "PNG"),
                                                            PNG))], timeout=60)


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_gets_its_status_and_reason_while_others_are_served(server, name) -> None:
    case = BAD_INPUT[name]
    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.submit(send, server.url, case), pool.submit(send_valid, server.url)
        bad, good = bad.result(), good.result()
    assert bad.status_code == case.status, bad.text
    body = bad.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == case.code and case.detail in body["detail"], body
    assert good.status_code == 200 and good.json()[0]["label"] == "7", good.text


@pytest.fixture(scope="module")
def labels(server) -> list[str]:
    return httpx.post(f"{server.url}/model_info", json={}, timeout=30).json()["labels"]


@pytest.mark.parametrize("name", list(VALID_ODDITIES))
def test_unusual_but_valid_images_are_classified(server, labels, name) -> None:
    case = VALID_ODDITIES[name]
    response = send(server.url, case)
    assert response.status_code == 200, response.text
    answered = [a["label"] for a in response.json()]
    assert len(answered) == case.answers, f"{len(answered)} answers for {case.answers} images"
    if case.label is not None:
        assert answered == [case.label] * case.answers, f"a {case.label} read as {answered}"
    else:
        assert set(answered) <= set(labels), f"labels {answered} are not among {labels}"


def worker_pids(server) -> set[int]:
    return {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}


def test_bad_input_reaches_no_runtime_and_crashes_no_worker(server) -> None:
    workers = worker_pids(server)
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = metric_total(metrics, "bentoml_service_adaptive_batch_size_count")
    refused = metric_total(metrics, "image_classifier_rejected_requests_total")
    for case in BAD_INPUT.values():
        assert send(server.url, case).status_code == case.status
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_total(metrics, "bentoml_service_adaptive_batch_size_count") == batches, \
        "a refused request reached the batcher and the runtime"
    assert metric_total(metrics, "image_classifier_rejected_requests_total") == \
        refused + len(BAD_INPUT), "every refusal is counted in /metrics"
    assert worker_pids(server) == workers, "a worker process died or was replaced"
    assert send_valid(server.url).status_code == 200


@pytest.mark.parametrize("which", ["server", "detector_server"])
def test_schemathesis_finds_no_server_error(which: str, request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    """Property-based fuzzing of every operation in the OpenAPI spec at /docs.json, the job
    routes (`<task>/submit|status|get|retry|cancel`) included: no 5xx, and every 4xx is
    `{"error", "detail"}` (tests/schemathesis_checks.py)."""
    running = request.getfixturevalue(which)
    spec = httpx.get(f"{running.url}/docs.json", timeout=30).json()
    task = "/classify_batch" if which == "server" else "/detect_batch"
    job_routes = {f"{task}/{name}" for name in ("submit", "status", "get", "retry", "cancel")}
    assert job_routes <= set(spec["paths"]), "the spec lists the job routes"
    result = subprocess.run(
        [str(BIN / "schemathesis"), "run", f"{running.url}/docs.json",
         "--checks", "not_a_server_error,error_body_shape", "--max-examples", "150",
         "--seed", "4"],
        cwd=tmp_path,  # its example database and cache
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_checks",
             "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in result.stdout and "failed" not in summary, result.stdout[-3000:]
    operations = len(spec["paths"])
    assert f"Tested: {operations}" in result.stdout, result.stdout[-3000:]
