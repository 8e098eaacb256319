"""serving.request_log: the JSON line built from an answer (never from the upload), and the
RequestLog middleware called with raw ASGI messages: one line per API request, and the request
id sent back in X-Request-ID."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from serving.asgi import ASGIApp, Receive, Scope, Send
from serving.request_log import RequestLog, log_line, request_logger, write_line
from tests.helpers import http_scope, run_asgi

TAG = "digits-classifier:v1"
PREDICTIONS = [
    {"label": "7", "class_id": 7, "confidence": 0.98, "model": TAG, "processing_ms": 3.1,
     "top_k": [{"label": "7", "confidence": 0.98}]},
    {"label": "1", "class_id": 1, "confidence": 0.91, "model": "digits-classifier:v2",
     "processing_ms": 2.9, "top_k": [{"label": "1", "confidence": 0.91}]},
]


def line_for(status: int, body: bytes, path: str = "/classify") -> dict:
    return log_line(http_scope(path), "req-1", status, body, latency_ms=12.3456)


def test_a_classification_answer_logs_each_prediction_and_its_model() -> None:
    line = line_for(200, json.dumps(PREDICTIONS).encode())
    assert (line["method"], line["route"], line["status"], line["outcome"]) == \
        ("POST", "/classify", 200, "ok")
    assert line["request_id"] == "req-1" and line["latency_ms"] == 12.346
    assert line["images"] == 2
    assert line["models"] == sorted([TAG, "digits-classifier:v2"])
    assert line["predictions"] == [{"label": "7", "confidence": 0.98, "model": TAG},
                                   {"label": "1", "confidence": 0.91,
                                    "model": "digits-classifier:v2"}], \
        "label, confidence and model only: top_k and timings stay out of the log"


def test_the_timestamp_is_utc_in_milliseconds() -> None:
    stamp = line_for(200, b"[]")["ts"]
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-21T20:50:01.123Z"), stamp


def test_a_refusal_logs_its_error_code_as_the_outcome() -> None:
    body = json.dumps({"error": "too_many_images", "detail": "33 images"}).encode()
    line = line_for(413, body)
    assert (line["status"], line["outcome"]) == (413, "too_many_images")
    assert "predictions" not in line and "images" not in line


def test_a_task_submit_answer_logs_the_task_id() -> None:
    body = json.dumps({"task_id": "0f1e2d", "status": "in_progress"}).encode()
    line = line_for(200, body, path="/classify_batch/submit")
    assert (line["route"], line["outcome"], line["task_id"]) == \
        ("/classify_batch/submit", "ok", "0f1e2d")


def test_a_body_that_is_not_json_logs_the_status_only() -> None:
    line = line_for(500, b"Internal Server Error")
    assert (line["status"], line["outcome"]) == (500, "error")
    assert not {"images", "predictions", "task_id"} & set(line), line


# --- the middleware -------------------------------------------------------------------------

def answering(status: int, body: bytes) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture
def logged() -> Iterator[list[dict]]:
    """The request log lines written while the test runs, parsed."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    logger = request_logger()  # as RequestLog sets it up: INFO, its own handler
    handler = Collect()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def request_log(status: int = 200, body: bytes = b"[]") -> RequestLog:
    return RequestLog(answering(status, body), routes=["/classify", "/classify_tensor"])


def test_the_callers_request_id_is_sent_back_and_logged(logged: list[dict]) -> None:
    answer = run_asgi(request_log(), http_scope(headers={"X-Request-ID": "caller-42"}))
    assert answer.headers["x-request-id"] == "caller-42"
    assert [line["request_id"] for line in logged] == ["caller-42"]


def test_a_request_without_an_id_gets_a_new_one(logged: list[dict]) -> None:
    answer = run_asgi(request_log(), http_scope())
    request_id = answer.headers["x-request-id"]
    assert len(request_id) == 32 and set(request_id) <= set("0123456789abcdef"), \
        f"not a uuid4 in hex: {request_id}"
    assert [line["request_id"] for line in logged] == [request_id]


def test_the_line_carries_the_status_and_outcome_sent(logged: list[dict]) -> None:
    body = json.dumps({"error": "invalid_image", "detail": "not an image"}).encode()
    answer = run_asgi(request_log(400, body), http_scope())
    assert answer.body == body, "the answer is passed on untouched"
    (line,) = logged
    assert (line["status"], line["outcome"]) == (400, "invalid_image")


def test_paths_that_are_not_api_routes_are_not_logged(logged: list[dict]) -> None:
    answer = run_asgi(request_log(), http_scope("/metrics", method="GET"))
    assert answer.status == 200 and "x-request-id" not in answer.headers
    assert logged == []


def test_a_line_written_past_logging_is_what_logging_would_have_written() -> None:
    """write_line: with the logger as request_logger() sets it up, the line goes straight to its
    handler's stream; once anyone adds a handler (here, a second stream), it goes through
    logging, and both streams hold the same bytes as the direct write did."""
    logger = request_logger()
    handler = logger.handlers[0]
    direct, through_logging, other = io.StringIO(), io.StringIO(), io.StringIO()
    records: list[int] = []  # LogRecords made: none on the direct way
    make_record = logging.getLogRecordFactory()

    def counted(*args: object, **kwargs: object) -> logging.LogRecord:
        records.append(1)
        return make_record(*args, **kwargs)

    previous, handlers = handler.setStream(direct), logger.handlers
    logger.handlers = [handler]  # as a worker has it (pytest may have added its own here)
    logging.setLogRecordFactory(counted)
    try:
        write_line(logger, '{"status": 200}')
        assert records == []
        handler.setStream(through_logging)
        added = logging.StreamHandler(other)
        added.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(added)
        try:
            write_line(logger, '{"status": 200}')
        finally:
            logger.removeHandler(added)
        assert records == [1]
    finally:
        logging.setLogRecordFactory(make_record)
        handler.setStream(previous)
        logger.handlers = handlers
    assert direct.getvalue() == through_logging.getvalue() == other.getvalue() == \
        '{"status": 200}\n'


def test_a_silenced_request_logger_writes_nothing() -> None:
    """An operator who raises the logger's level (or disables logging) is obeyed."""
    logger = request_logger()
    handler = logger.handlers[0]
    stream = io.StringIO()
    previous, level = handler.setStream(stream), logger.level
    logger.setLevel(logging.WARNING)
    try:
        write_line(logger, '{"status": 200}')
    finally:
        logger.setLevel(level)
        handler.setStream(previous)
    assert stream.getvalue() == ""
