"""Structured request logs: one JSON line per API request, on the worker's stdout.

    {"ts": "2026-11-21T20:50:01.123Z", "request_id": "4f1c...", "method": "POST",
     "route": "/classify", "status": 200, "outcome": "ok", "latency_ms": 12.4, "images": 2,
     "models": ["digits-classifier:nlq..."], "predictions": [{"label": "7",
     "confidence": 0.998, "model": "digits-classifier:nlq..."}, ...]}

A detector's line has `detections` instead of `predictions`: per image, how many objects and of
which labels (`[{"count": 3, "labels": ["1", "7"], "model": ...}]`).

`outcome` is "ok" or the refusal's error code (`invalid_image`, `too_many_requests`, ...).
`request_id` is the caller's X-Request-ID, or a new one; either way it is sent back in the
X-Request-ID response header, so a client can quote it. Image bytes are never logged: the line is
built from the status and the JSON answer only.

An ASGI middleware outside `serving.admission`, so that refusals are logged with their code. The
answer's body is read as it is sent (answers are a few hundred bytes per image), not buffered.
Lines go to stdout through the `image_classifier.requests` logger, apart from BentoML's
own log lines on stderr: a container runtime, `kubectl logs` or a log shipper (Vector, Fluent
Bit, Promtail) collects them as they are.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from .asgi import ASGIApp, Message, Receive, Scope, Send, header

LOGGER_NAME = "image_classifier.requests"
MAX_BODY_READ = 256 * 1024  # answers larger than this are logged without their predictions


LINE_ONLY = logging.Formatter("%(message)s")  # the line is the whole record


def request_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:  # once per worker process
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(LINE_ONLY)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not BentoML's format, not on stderr
    return logger


def write_line(logger: logging.Logger, line: str) -> None:
    """One line through the request logger. Where the logger is as request_logger() set it up
    (its one handler, on a stream, writing the message alone; no filter; INFO on), the line
    goes straight to that handler's stream: the same bytes, without building a LogRecord and
    looking up the caller's frame for it (docs/request-path.md: what the request log costs a
    request). Configured any other way, the line goes through logging as configured."""
    handlers = logger.handlers
    if len(handlers) == 1 and not logger.filters and logger.isEnabledFor(logging.INFO):
        handler = handlers[0]
        if type(handler) is logging.StreamHandler and handler.formatter is LINE_ONLY \
                and not handler.filters and handler.level <= logging.INFO:
            handler.stream.write(line + handler.terminator)
            handler.flush()
            return
    logger.info(line)


class RequestLog:
    def __init__(self, app: ASGIApp, routes: Iterable[str]) -> None:
        self.app = app
        self.routes = set(routes)
        self.logger = request_logger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = header(scope, b"x-request-id") or uuid.uuid4().hex
        status, body = 500, bytearray()

        async def send_and_read(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body" and len(body) < MAX_BODY_READ:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_read)
        finally:
            write_line(self.logger, json.dumps(log_line(
                scope, request_id, status, bytes(body), (time.perf_counter() - started) * 1000.0)))


def log_line(scope: Scope, request_id: str, status: int, body: bytes,
             latency_ms: float) -> dict[str, Any]:
    line = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request_id,
        "method": scope["method"],
        "route": scope["path"],
        "status": status,
        "outcome": "ok" if status < 400 else "error",
        "latency_ms": round(latency_ms, 3),
    }
    try:
        answer = json.loads(body) if body else None
    except ValueError:
        answer = None
    if status >= 400 and isinstance(answer, dict) and "error" in answer:
        line["outcome"] = answer["error"]
    elif isinstance(answer, list) and answer and isinstance(answer[0], dict) \
            and "model" in answer[0]:
        line["images"] = len(answer)
        line["models"] = sorted({str(p.get("model")) for p in answer})
        if "confidence" in answer[0]:  # a classifier's answers
            line["predictions"] = [{"label": p.get("label"), "confidence": p.get("confidence"),
                                    "model": p.get("model")} for p in answer]
        elif "detections" in answer[0]:  # a detector's: how many objects of which classes
            line["detections"] = [{"count": len(p.get("detections") or []),
                                   "labels": sorted({d.get("label") for d in
                                                     p.get("detections") or []}),
                                   "model": p.get("model")} for p in answer]
    elif isinstance(answer, dict) and "task_id" in answer:
        line["task_id"] = answer["task_id"]
    return line
