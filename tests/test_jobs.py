"""Asynchronous jobs (`@bentoml.task`): submit many images, poll, get one entry per image."""

from __future__ import annotations

import asyncio
import time

import bentoml
import httpx
import pytest

from tests.helpers import JOB_TIMEOUT_S, ROOT, wait_for_job

pytestmark = pytest.mark.e2e

EXAMPLES = sorted((ROOT / "examples").glob("digit_*"))


async def wait_done(task, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """As wait_for_job (tests/helpers.py), through the task handle of BentoML's client."""
    deadline = time.monotonic() + timeout_s
    while (status := (await task.get_status()).value) == "in_progress" \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return status


def test_a_job_answers_every_image_in_order_with_the_bentoml_client(server, tmp_path) -> None:
    """AsyncHTTPClient: BentoML 1.4.39's SyncHTTPClient raises AttributeError ('_opened_files')
    after submitting a task."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [*EXAMPLES, broken, *EXAMPLES]  # 21 images, one of them bad

    async def run_job() -> tuple[str, list[dict]]:
        async with bentoml.AsyncHTTPClient(server.url) as client:
            task = await client.classify_batch.submit(images=files)
            return await wait_done(task), await task.get()

    status, items = asyncio.run(run_job())
    assert status == "completed"
    assert [item["file"] for item in items] == [p.name for p in files]
    labels = [item["prediction"]["label"] for item in items if item["prediction"]]
    assert labels == [p.name.split("_")[1] for p in files if p != broken]
    (refused,) = [item for item in items if item["error"]]
    assert refused["file"] == "broken.png" and refused["error"] == "invalid_image"


def test_job_status_and_result_over_plain_http(server) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in EXAMPLES[:2]]
    submitted = httpx.post(f"{server.url}/classify_batch/submit", files=files, timeout=30).json()
    task_id = submitted["task_id"]
    status = wait_for_job(server.url, task_id)
    assert status == "completed", f"the job ended {status}"
    result = httpx.get(f"{server.url}/classify_batch/get", params={"task_id": task_id}).json()
    assert ([r["prediction"]["label"] for r in result]
            == [p.name.split("_")[1] for p in EXAMPLES[:2]])


def test_a_submit_with_a_wrong_content_type_is_refused_at_once(server) -> None:
    response = httpx.post(f"{server.url}/classify_batch/submit", json={"images": []})
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"
