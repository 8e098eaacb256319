"""A client for the ObjectDetector service: /detect over plain HTTP (httpx), with the same
retries as the classifier's client.

Plain HTTP because /detect's threshold fields travel as form fields beside the images, and
BentoML's SyncHTTPClient sends only an endpoint's typed parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .retry import call_with_retries


@dataclass(frozen=True)
class DetectOptions:
    """A request's thresholds; None leaves the service's configured default."""

    confidence_threshold: float | None = None
    iou_threshold: float | None = None
    max_detections: int | None = None

    def form(self) -> dict[str, str]:
        """The form fields /detect takes: only those set."""
        return {name: str(value) for name, value in vars(self).items() if value is not None}


class ServiceError(httpx.HTTPStatusError):
    """A refusal from the service; its text holds the answer's `{"error", "detail"}` body."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code} from {response.request.url.path}: "
                         f"{response.text}", request=response.request, response=response)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def post(http: httpx.Client, route: str, attempts: int = 6, **content: Any) -> Any:
    """POST `route`, retried on 429 and 503; the decoded JSON answer, or ServiceError."""

    def once() -> Any:
        response = http.post(route, **content)
        if response.is_error:
            raise ServiceError(response)
        return response.json()

    return call_with_retries(once, attempts=attempts)


def model_info(url: str, api_key: str | None = None, timeout_s: float = 30) -> dict[str, Any]:
    """POST /model_info of either service: its `task` ("classification" or "detection"),
    labels, tag, ..."""
    with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout_s) as http:
        info: dict[str, Any] = post(http, "/model_info", json={})
        return info


class DetectorClient:
    """POST /detect; 429 and 503 are retried (classifier_client.retry)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60,
                 attempts: int = 6, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout_s,
                                  transport=transport)
        self.attempts = attempts

    def detect(self, images: Sequence[Path], options: DetectOptions = DetectOptions()
               ) -> list[dict[str, Any]]:
        """One request with every image; per image, in order, the service's answer."""
        files = [("images", (path.name, path.read_bytes(), "application/octet-stream"))
                 for path in images]
        answers: list[dict[str, Any]] = post(self._http, "/detect", self.attempts, files=files,
                                             data=options.form())
        return answers

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
