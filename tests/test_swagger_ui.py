"""The Swagger UI at / in a real headless Chromium: a user uploads an example and reads the
label (ImageClassifier), or a composed scene and reads its detections (ObjectDetector)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, start_server

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLE = ROOT / "examples" / "digit_7_00.png"


@dataclass
class SwaggerAnswer:
    status: str
    body: str
    info: str  # the page's information block: title, version, the service's description
    headings: list[str]  # the description's top-level headings


def try_it_out(url: str, operation_id: str, upload: Path, screenshot: Path,
               api_key: str | None = None) -> SwaggerAnswer:
    """In the Swagger UI at `url`: with `api_key`, "Authorize" with it first; open the
    operation, "Try it out", add one file item, upload `upload`, "Execute"; what the page then
    shows."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        "Chromium is missing: `apt-get install chromium` (make test does)")
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            info = page.locator(".information-container .info")
            info.wait_for()
            if api_key is not None:
                authorize(page, api_key)
            operation = page.locator(f"#operations-Service_APIs-{operation_id}")
            operation.locator(".opblock-summary").click()
            operation.get_by_role("button", name="Try it out").click()
            operation.get_by_role("button", name="Add string item").click()  # one file per item
            operation.locator("input[type=file]").first.set_input_files(str(upload))
            operation.get_by_role("button", name="Execute").click()
            response = operation.locator(".live-responses-table .response").first
            response.locator(".microlight").first.wait_for()
            answer = SwaggerAnswer(
                status=response.locator(".response-col_status").inner_text().strip(),
                body=response.locator(".microlight").first.inner_text(),  # headers: the next one
                info=info.inner_text(),
                headings=info.locator(".description h1").all_inner_texts())
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
    return answer


def authorize(page: Any, api_key: str) -> None:
    """The "Authorize" dialog of an HTTP bearer scheme: enter the key, authorize, close."""
    page.locator(".scheme-container button.authorize").click()
    dialog = page.locator(".dialog-ux .modal-ux")
    dialog.locator("input").first.fill(api_key)
    dialog.locator(".auth-btn-wrapper button.authorize").click()
    dialog.get_by_role("button", name="Close").click()


def test_classify_from_the_swagger_ui(server, tmp_path: Path) -> None:
    answer = try_it_out(server.url, "ImageClassifier__classify", EXAMPLE,
                        tmp_path / "swagger.png")
    assert answer.status == "200", answer.body
    assert '"label": "7"' in answer.body
    assert answer.headings[:1] == ["image-classifier"], answer.info  # docs/service.md


def test_classify_from_the_swagger_ui_with_an_api_key(trained_model, tmp_path: Path) -> None:
    """With a key set, the spec declares a bearer scheme: "Authorize" with the key, and "Try it
    out" gets a 200 (and without it, a 401)."""
    api_key = secrets.token_urlsafe(24)
    env = {**os.environ, "IMAGE_CLASSIFIER_API_KEY": api_key}
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path, env=env) as server:
        refused = try_it_out(server.url, "ImageClassifier__classify", EXAMPLE,
                             tmp_path / "swagger-no-key.png")
        answer = try_it_out(server.url, "ImageClassifier__classify", EXAMPLE,
                            tmp_path / "swagger-key.png", api_key=api_key)
    assert refused.status.startswith("401") and '"unauthorized"' in refused.body, refused.body
    assert answer.status == "200", answer.body
    assert '"label": "7"' in answer.body


def test_detect_from_the_swagger_ui(detector_server, trained_detector, tmp_path: Path) -> None:
    """A composed held-out scene uploaded on /detect: the answer lists its digits; the page
    describes the detector (docs/service-detector.md, the served tag), not BentoML's
    boilerplate."""
    from PIL import Image

    from train_export.detection.scenes import heldout_scenes

    scene = next(s for s in heldout_scenes(16) if len(s.boxes) >= 3)
    upload = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(upload)
    answer = try_it_out(detector_server.url, "ObjectDetector__detect", upload,
                        tmp_path / "swagger-detector.png")
    assert answer.status == "200", answer.body
    (result,) = json.loads(answer.body)
    labels = [d["label"] for d in result["detections"]]
    assert labels, f"no detections for a scene of {len(scene.boxes)} digits: {answer.body}"
    assert set(labels) <= {str(d) for d in range(10)}
    assert set(labels) & {str(c) for c in scene.class_ids}, (
        f"none of the scene's digits {sorted(scene.class_ids)} found: {labels}")
    assert (result["width"], result["height"]) == (scene.width, scene.height)
    assert answer.headings[:1] == ["object-detector"], answer.info
    assert trained_detector in answer.info, "the page names the served model"
    assert "created with BentoML" not in answer.info, answer.info


def test_every_endpoint_explains_itself(server) -> None:
    spec = httpx.get(f"{server.url}/docs.json").json()
    for path in ("/classify", "/classify_tensor", "/model_info"):
        assert len(spec["paths"][path]["post"]["description"]) > 40, path
    schemas = spec["components"]["schemas"]
    assert schemas["Prediction"].get("example"), "answers show an example"
    tensor_input = schemas["classify_tensor__Input"]["properties"]["pixels"]
    assert tensor_input.get("examples"), "the tensor input shows an example"
