"""`folder`: every image under a folder through a running service, concurrently, resumable."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx
from bentoml.exceptions import BentoMLException
from tqdm import tqdm

from .files import Output, images_in, row
from .retry import RetryingClient


def classify_folder(url: str, folder: Path, out: Path, *, concurrency: int = 8,
                    api_key: str | None = None) -> tuple[int, int]:
    """Returns (answered, failed) for this run; files already in `out` are skipped."""
    with Output(out) as output:
        todo = [p for p in images_in(folder) if str(p) not in output.done]
        clients = threading.local()

        def classify(path: Path) -> dict[str, Any]:
            if not hasattr(clients, "client"):  # one HTTP client (connection pool) per thread
                clients.client = RetryingClient(url, api_key=api_key)
            client: RetryingClient = clients.client
            return client.classify([path])[0]

        return run_each(todo, classify, output, concurrency)


def run_each(todo: list[Path], classify: Callable[[Path], dict[str, Any]], output: Output,
             concurrency: int) -> tuple[int, int]:
    answered = 0
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(todo), unit="img") as bar:
        futures = {pool.submit(classify, path): path for path in todo}
        for future in as_completed(futures):
            path = futures[future]
            try:
                output.write(row(path, future.result()))
                answered += 1
            except (BentoMLException, httpx.HTTPError, OSError) as exc:  # this file only
                output.fail(path, reason_of(exc))
            bar.update()
    return answered, output.failures


def reason_of(exc: Exception) -> str:
    """The service's `{"error", "detail"}` when the exception carries it, else its message."""
    text = str(exc)
    start = text.find("{")
    if start >= 0:
        try:
            body = json.loads(text[start:])
            return f"{body['error']}: {body['detail']}"
        except (ValueError, KeyError, TypeError):
            pass
    return text
