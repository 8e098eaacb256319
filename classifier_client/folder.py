"""`folder`: every image under a folder through a running service, concurrently. A classifier's
answers become rows (CSV or JSON Lines, resumable); a detector's, COCO results. Which one the
service is, its /model_info says (`task`)."""

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

from .coco import Answered, check_out, image_ids, write_coco
from .detector import DetectOptions, DetectorClient, model_info
from .files import Failures, Output, images_in, row
from .retry import RetryingClient


def run_folder(url: str, folder: Path, out: Path, *, concurrency: int = 8,
               api_key: str | None = None, options: DetectOptions = DetectOptions()
               ) -> tuple[int, int]:
    """Asks the service its task, then runs the folder through it; (answered, failed)."""
    info = service_info(url, api_key)
    if info.get("task", "classification") == "detection":
        return detect_folder(url, folder, out, info, concurrency=concurrency, api_key=api_key,
                             options=options)
    if options.form():
        raise SystemExit(f"{url} serves a classifier ({info.get('tag')}): the threshold options "
                         "are for detectors")
    return classify_folder(url, folder, out, concurrency=concurrency, api_key=api_key)


def service_info(url: str, api_key: str | None) -> dict[str, Any]:
    try:
        return model_info(url, api_key)
    except httpx.HTTPError as exc:
        raise SystemExit(f"could not ask {url}/model_info which task the service runs: "
                         f"{reason_of(exc)}") from None


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

        answered = run_each(todo, classify, concurrency,
                            lambda path, answer: output.write(row(path, answer)), output.fail)
        return answered, output.failures


def detect_folder(url: str, folder: Path, out: Path, info: dict[str, Any], *,
                  concurrency: int = 8, api_key: str | None = None,
                  options: DetectOptions = DetectOptions()) -> tuple[int, int]:
    """Every image under `folder`, one request each; COCO results in `out` (classifier_client/
    coco.py), written whole at the end of the run. (answered, failed)."""
    check_out(out)
    paths = images_in(folder)
    ids = image_ids(paths, folder)
    answered: list[Answered] = []
    clients: list[DetectorClient] = []
    local = threading.local()

    def detect(path: Path) -> dict[str, Any]:
        if not hasattr(local, "client"):  # one HTTP client (connection pool) per thread
            local.client = DetectorClient(url, api_key=api_key)
            clients.append(local.client)
        client: DetectorClient = local.client
        return client.detect([path], options)[0]

    with Failures(out) as failures:
        try:
            run_each(paths, detect, concurrency,
                     lambda path, answer: answered.append(Answered(*ids[path], answer)),
                     failures.fail)
        finally:
            for client in clients:
                client.close()
    thresholds = {**info.get("detection", {}), **{k: v for k, v in vars(options).items()
                                                   if v is not None}}
    write_coco(out, answered, info["labels"],
               {"model": info["tag"], "folder": str(folder), "thresholds": thresholds})
    return len(answered), failures.count


def run_each(todo: list[Path], call: Callable[[Path], dict[str, Any]], concurrency: int,
             answered: Callable[[Path, dict[str, Any]], None],
             failed: Callable[[Path, str], None]) -> int:
    """`call` on each path, `concurrency` at a time, with a progress bar; each answer to
    `answered`, each failure (this file only) to `failed`. Returns how many were answered."""
    count = 0
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(todo), unit="img") as bar:
        futures = {pool.submit(call, path): path for path in todo}
        for future in as_completed(futures):
            path = futures[future]
            try:
                answered(path, future.result())
                count += 1
            except (BentoMLException, httpx.HTTPError, OSError) as exc:  # this file only
                failed(path, reason_of(exc))
            bar.update()
    return count


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
