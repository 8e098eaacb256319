"""The Swagger UI at / in a real headless Chromium: a user uploads an example and reads the
label."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLE = ROOT / "examples" / "digit_7_00.png"


def test_classify_from_the_swagger_ui(server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        "Chromium is missing: `apt-get install chromium` (make test does)")
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            operation = page.locator("#operations-Service_APIs-ImageClassifier__classify")
            operation.locator(".opblock-summary").click()
            operation.get_by_role("button", name="Try it out").click()
            operation.get_by_role("button", name="Add string item").click()  # one file per item
            operation.locator("input[type=file]").first.set_input_files(str(EXAMPLE))
            operation.get_by_role("button", name="Execute").click()
            response = operation.locator(".live-responses-table .response").first
            response.locator(".microlight").first.wait_for()
            status = response.locator(".response-col_status").inner_text().strip()
            body = response.locator(".microlight").first.inner_text()  # the body, then headers
            page.screenshot(path=str(tmp_path / "swagger.png"), full_page=True)
        finally:
            browser.close()
    assert status == "200", body
    assert '"label": "7"' in body
    assert (tmp_path / "swagger.png").stat().st_size > 0


def test_every_endpoint_explains_itself(server) -> None:
    spec = httpx.get(f"{server.url}/docs.json").json()
    for path in ("/classify", "/classify_tensor", "/model_info"):
        assert len(spec["paths"][path]["post"]["description"]) > 40, path
    schemas = spec["components"]["schemas"]
    assert schemas["Prediction"].get("example"), "answers show an example"
    tensor_input = schemas["classify_tensor__Input"]["properties"]["pixels"]
    assert tensor_input.get("examples"), "the tensor input shows an example"
