"""serving.admission: the Admission middleware called with raw ASGI messages, in front of a fake
app. Each refusal has its status, `{"error", "detail"}` body and headers, and never reaches the
app; the app's own error answers are reshaped into the same body."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
import pytest
from bentoml.exceptions import ServiceUnavailable
from starlette.requests import ClientDisconnect

from serving.admission import Admission, ClientErrorTracebacks, Pace, Route
from serving.asgi import Receive, Scope, Send
from serving.settings import LimitsSettings
from tests.helpers import AsgiAnswer, call_asgi, http_scope, run_asgi

API_KEY = "unit-test-key-" + "k" * 20
MULTIPART = "multipart/form-data; boundary=x"
ROUTES = {
    "/classify": Route("multipart/form-data", "image files in the `images` field"),
    "/classify_tensor": Route("application/json", '{"pixels": [...]}'),
    "/classify_batch/submit": Route("multipart/form-data", "image files", timed=False,
                                    gated=False),
    "/model_info": Route("application/json", "an empty JSON object {}", gated=False),
}
PUBLIC_PATHS = ["/livez", "/metrics", "/", "/static_content/"]
# BentoML 1.4.39's 400 for a pydantic ValidationError (app.py, api_endpoint_wrapper).
BENTOML_VALIDATION = {"error": "1 validation error for Input", "detail": [
    {"type": "missing", "loc": ["images"], "msg": "Field required"}]}


@dataclass
class FakeApp:
    """What sits behind Admission (BentoML's app): records each request it gets, reads the body
    when told to, waits for `release` when given one, then answers `status` with `body`."""

    status: int = 200
    body: bytes = b'[{"label": "7"}]'
    read_body: bool = False
    release: asyncio.Event | None = None
    scopes: list[Scope] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if self.read_body:
            while (message := await receive())["type"] == "http.request":
                self.received += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            else:  # the client went away (as Admission tells it at the size limit)
                await respond(send, 400, b'{"error": "client disconnected"}')
                return
        if self.release is not None:
            await self.release.wait()
        await respond(send, self.status, self.body)


async def respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def upload_headers(length: int = 100, key: str | None = API_KEY) -> dict[str, str]:
    headers = {"content-type": MULTIPART, "content-length": str(length)}
    return {**headers, "authorization": f"Bearer {key}"} if key else headers


def admission(inner: FakeApp, api_key: str | None = API_KEY, **limits: Any) -> Admission:
    return Admission(inner, routes=ROUTES, limits=LimitsSettings(**limits),
                     public_paths=PUBLIC_PATHS, api_key=api_key)


def rejected(reason: str, status: int) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "image_classifier_rejected_requests_total", {"reason": reason, "status": str(status)})
    return value or 0.0


# --- API key --------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-" + "w" * 20, API_KEY,
                                           f"Basic {API_KEY}"],
                         ids=["none", "wrong", "no-scheme", "basic-scheme"])
def test_a_request_without_the_api_key_gets_401(authorization: str | None) -> None:
    inner = FakeApp()
    headers = {"content-type": MULTIPART, "content-length": "100"}
    if authorization is not None:
        headers["authorization"] = authorization
    answer = run_asgi(admission(inner), http_scope(headers=headers))
    assert answer.status == 401, answer
    assert answer.json()["error"] == "unauthorized", answer.json()
    assert "Authorization: Bearer" in answer.json()["detail"], "the detail says how to send it"
    assert answer.headers["www-authenticate"] == "Bearer"
    assert inner.scopes == [], "a refused request reached the app"


def test_the_right_api_key_is_let_through() -> None:
    inner = FakeApp()
    answer = run_asgi(admission(inner), http_scope(headers=upload_headers()))
    assert answer.status == 200 and len(inner.scopes) == 1, answer


@pytest.mark.parametrize("path", ["/livez", "/metrics", "/", "/static_content/index.css"])
def test_public_paths_need_no_key(path: str) -> None:
    inner = FakeApp()
    answer = run_asgi(admission(inner), http_scope(path, method="GET"))
    assert answer.status == 200 and len(inner.scopes) == 1, f"{path} was refused: {answer}"


def test_a_cors_preflight_needs_no_key() -> None:
    inner = FakeApp()
    answer = run_asgi(admission(inner), http_scope(method="OPTIONS"))
    assert answer.status == 200 and len(inner.scopes) == 1, answer


def test_without_a_configured_key_every_path_is_open() -> None:
    inner = FakeApp()
    app = admission(inner, api_key=None)
    answer = run_asgi(app, http_scope(headers=upload_headers(key=None)))
    assert answer.status == 200, answer


# --- headers: Content-Type and Content-Length -------------------------------------------------

def test_a_wrong_content_type_gets_415_that_says_what_to_send() -> None:
    inner = FakeApp()
    headers = {**upload_headers(), "content-type": "text/plain"}
    answer = run_asgi(admission(inner), http_scope("/classify_tensor", headers=headers))
    assert answer.status == 415, answer
    assert answer.json()["error"] == "unsupported_media_type"
    detail = answer.json()["detail"]
    assert "application/json" in detail and ROUTES["/classify_tensor"].how_to_send in detail, detail
    assert inner.scopes == [], "a refused request reached the app"


def test_a_declared_length_over_the_limit_gets_413_before_the_body_is_read() -> None:
    inner = FakeApp(read_body=True)
    app = admission(inner, max_request_bytes=1000)
    answer = run_asgi(app, http_scope(headers=upload_headers(length=5000)))
    assert answer.status == 413, answer
    assert answer.json()["error"] == "request_too_large"
    assert "1000" in answer.json()["detail"], "the detail names the limit"
    assert inner.scopes == [], "a refused request reached the app"


def test_a_streamed_body_over_the_limit_gets_413_and_is_not_read_to_the_end() -> None:
    inner = FakeApp(read_body=True)
    app = admission(inner, max_request_bytes=1000)
    headers = {**upload_headers(), "transfer-encoding": "chunked"}
    del headers["content-length"]
    answer = run_asgi(app, http_scope(headers=headers), chunks=(b"x" * 400,) * 5)
    assert answer.status == 413, answer
    assert answer.json()["error"] == "request_too_large"
    assert len(inner.received) <= 1000, f"the app was given {len(inner.received)} bytes"


# --- requests in flight and the timeout -------------------------------------------------------

def test_requests_over_max_concurrency_get_429_with_retry_after() -> None:
    async def scenario() -> tuple[AsgiAnswer, list[AsgiAnswer]]:
        release = asyncio.Event()
        inner = FakeApp(release=release)
        app = admission(inner, max_concurrency=2, retry_after_s=7)
        held = [asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
                for _ in range(2)]
        while len(inner.scopes) < 2:  # both are inside the app, waiting for `release`
            await asyncio.sleep(0)
        refused = await call_asgi(app, http_scope(headers=upload_headers()))
        release.set()
        return refused, list(await asyncio.gather(*held))

    refused, held = asyncio.run(scenario())
    assert refused.status == 429, refused
    assert refused.json()["error"] == "too_many_requests"
    assert refused.headers["retry-after"] == "7", "Retry-After is limits.retry_after_s"
    assert [a.status for a in held] == [200, 200], "the requests in flight are still answered"


# --- the gate: what a worker answers in limits.target_wait_ms at its measured pace ------------

def test_lightly_loaded_the_pace_lets_every_request_in() -> None:
    pace = Pace(target_s=0.5, ceiling=512)
    for _ in range(100):
        pace.record(wait_s=0.005, held=3)  # answers in 5 ms with 3 held
    assert pace.limit > 250, "100 times what it holds: 3 x 0.5 s / 5 ms"
    for _ in range(100):
        pace.record(wait_s=0.0005, held=3)
    assert pace.limit == 512, "never above max_concurrency"


def test_saturated_the_pace_settles_at_what_the_worker_answers_in_the_target() -> None:
    """A worker that answers 20 requests/s: whatever it holds, each waits held / 20 s. The limit
    converges to 20 x 0.5 s = 10, from above and from below."""
    for start in (512.0, 2.0):
        pace = Pace(target_s=0.5, ceiling=512)
        pace.limit = start
        held = int(start)
        for _ in range(300):
            held = max(1, min(held, int(pace.limit)))
            pace.record(wait_s=held / 20, held=held)
            held += 1  # the clients press for more
        assert 9 <= pace.limit <= 11, (start, pace.limit)


def test_the_pace_keeps_at_least_two_requests_going() -> None:
    pace = Pace(target_s=0.01, ceiling=512)
    for _ in range(200):
        pace.record(wait_s=30.0, held=1)
    assert pace.limit == Pace.FLOOR and pace.admits(1) and not pace.admits(2)


def test_the_batchers_refusal_backs_the_pace_off_once_per_target() -> None:
    pace = Pace(target_s=0.5, ceiling=512)
    pace.limit = 40
    pace.back_off(held=30, now=100.0)
    assert pace.limit == 30 * Pace.BACK_OFF, "below what was held when the batcher refused"
    pace.back_off(held=24, now=100.3)
    assert pace.limit == 30 * Pace.BACK_OFF, "the refusals of one overload cut it once"
    pace.back_off(held=24, now=100.6)
    assert pace.limit == 24 * Pace.BACK_OFF, "a target later, below what was held then"
    for now in range(200, 230):
        pace.back_off(held=2, now=float(now))
    assert pace.limit == Pace.FLOOR


def test_a_batchers_503_lowers_the_gate_and_teaches_no_pace() -> None:
    """The batcher refuses the oldest queued request, often young: as a wait it would read as
    a fast answer and raise the limit, letting in more of what it refuses."""
    app = gated(FakeApp(status=503, body=b'{"error": "process is overloaded"}',
                        read_body=True), limit=40)
    assert app.default.pace is not None
    for _ in range(20):
        assert run_asgi(app, http_scope(headers=upload_headers())).status == 503
    assert app.default.pace.limit == Pace.FLOOR, "held 1 at each refusal: the limit goes down"
    app = gated(FakeApp(read_body=True), limit=40)
    assert app.default.pace is not None
    run_asgi(app, http_scope(headers=upload_headers()))
    assert app.default.pace.limit > 40, "a fast 200 still raises it"


def gated(inner: FakeApp, limit: int, **limits: Any) -> Admission:
    """Admission whose pace has measured `limit` requests at a time."""
    app = admission(inner, **limits)
    assert app.default.pace is not None
    app.default.pace.limit = limit
    return app


def test_requests_over_the_pace_wait_their_turn_unread_and_go_in_oldest_first() -> None:
    async def scenario() -> tuple[list[AsgiAnswer], list[str]]:
        release = asyncio.Event()
        inner = FakeApp(release=release, read_body=True)
        app = gated(inner, limit=2, max_queue_wait_ms=5000)
        requests = []
        for number in range(5):
            requests.append(asyncio.create_task(call_asgi(
                app, http_scope(headers=upload_headers()), [f"body {number}".encode()])))
            await asyncio.sleep(0.01)
        assert len(inner.scopes) == 2, "past the gate: what the pace admits"
        assert bytes(inner.received) == b"body 0body 1", "the waiting bodies are not read"
        assert app.default.held == 5 and len(app.default.waiting) == 3
        release.set()
        answers = list(await asyncio.gather(*requests))
        return answers, [inner.received.decode()]

    answers, received = asyncio.run(scenario())
    assert [a.status for a in answers] == [200] * 5, "every waiting request got its turn"
    assert received == ["body 0body 1body 2body 3body 4"], "turns in arrival order"


def test_a_request_without_a_turn_in_max_queue_wait_ms_gets_503_with_retry_after() -> None:
    async def scenario() -> tuple[AsgiAnswer, list[AsgiAnswer], Admission]:
        release = asyncio.Event()
        inner = FakeApp(release=release, read_body=True)
        app = gated(inner, limit=2, max_queue_wait_ms=50, retry_after_s=3)
        held = [asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers()),
                                              [b"held"])) for _ in range(2)]
        while len(inner.scopes) < 2:
            await asyncio.sleep(0)
        refused = await call_asgi(app, http_scope(headers=upload_headers()), [b"never read"])
        release.set()
        return refused, list(await asyncio.gather(*held)), app

    before = rejected("overloaded", 503)
    refused, held, app = asyncio.run(scenario())
    assert refused.status == 503, refused
    assert refused.json()["error"] == "overloaded"
    assert "max_queue_wait_ms" in refused.json()["detail"], "the detail names the setting"
    assert refused.headers["retry-after"] == "3"
    assert [a.status for a in held] == [200, 200], "the requests past the gate are answered"
    assert rejected("overloaded", 503) == before + 1
    assert app.default.held == 0 and not app.default.waiting, "nothing left counted"


def test_a_waiting_request_that_goes_away_gives_up_its_place() -> None:
    async def scenario() -> tuple[list[AsgiAnswer], Admission]:
        release = asyncio.Event()
        inner = FakeApp(release=release)
        app = gated(inner, limit=1, max_queue_wait_ms=5000)
        first = asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
        last = asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
        await asyncio.sleep(0.01)
        gone.cancel()  # its server task was cancelled while it waited
        await asyncio.sleep(0.01)
        release.set()
        return list(await asyncio.gather(first, last)), app

    answers, app = asyncio.run(scenario())
    assert [a.status for a in answers] == [200, 200]
    assert app.default.held == 0 and not app.default.waiting


def test_routes_that_batch_nothing_pass_a_full_gate() -> None:
    async def scenario() -> AsgiAnswer:
        release = asyncio.Event()
        inner = FakeApp(release=release)
        app = gated(inner, limit=1, max_queue_wait_ms=5000)
        held = asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
        waiting = asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
        await asyncio.sleep(0.01)
        assert len(app.default.waiting) == 1
        info = asyncio.create_task(call_asgi(app, http_scope(
            "/model_info", headers={"content-type": "application/json", "content-length": "2",
                                    "authorization": f"Bearer {API_KEY}"}), [b"{}"]))
        await asyncio.sleep(0.01)
        assert len(inner.scopes) == 2, "/model_info went past the waiting upload"
        release.set()
        await asyncio.gather(held, waiting)
        return await info

    assert asyncio.run(scenario()).status == 200


def test_only_batched_routes_are_gated() -> None:
    from types import SimpleNamespace

    from serving.admission import admission_routes

    def api(route: str, batchable: bool, is_task: bool = False) -> SimpleNamespace:
        return SimpleNamespace(route=route, batchable=batchable, is_task=is_task,
                               input_spec=SimpleNamespace(mime_type=lambda: "application/json"))

    routes = admission_routes({"a": api("/classify", True), "b": api("/model_info", False),
                               "c": api("/classify_batch", False, is_task=True)},
                              lambda api: "what to send")
    assert {path: r.gated for path, r in routes.items()} == {
        "/classify": True, "/model_info": False, "/classify_batch": False,
        "/classify_batch/submit": False}


def test_without_a_gate_every_request_goes_in_at_once() -> None:
    async def scenario() -> int:
        release = asyncio.Event()
        inner = FakeApp(release=release)
        app = admission(inner, target_wait_ms=0)
        assert app.default.pace is None
        requests = [asyncio.create_task(call_asgi(app, http_scope(headers=upload_headers())))
                    for _ in range(6)]
        await asyncio.sleep(0.05)
        inside = len(inner.scopes)
        release.set()
        await asyncio.gather(*requests)
        return inside

    assert asyncio.run(scenario()) == 6


def test_an_answer_teaches_the_pace_how_long_it_waited_once_its_body_was_in() -> None:
    async def scenario() -> float:
        inner = FakeApp(read_body=True)
        app = admission(inner, target_wait_ms=100)
        assert app.default.pace is not None
        app.default.pace.limit = 10.0
        await call_asgi(app, http_scope(headers=upload_headers()), [b"x"])
        return app.default.pace.limit

    # Answered in well under a millisecond with one held: the estimate is far above 10.
    assert asyncio.run(scenario()) > 10.0


def test_a_request_not_answered_within_the_timeout_gets_504() -> None:
    inner = FakeApp(release=asyncio.Event())  # never released
    app = admission(inner, request_timeout_s=0.05)
    answer = run_asgi(app, http_scope(headers=upload_headers()))
    assert answer.status == 504, answer
    assert answer.json()["error"] == "timeout"
    assert "request_timeout_s" in answer.json()["detail"], "the detail names the setting"


def test_a_job_submit_route_is_not_cut_at_the_request_timeout() -> None:
    async def scenario() -> AsgiAnswer:
        release = asyncio.Event()
        app = admission(FakeApp(release=release), request_timeout_s=0.05)
        submitted = asyncio.create_task(
            call_asgi(app, http_scope("/classify_batch/submit", headers=upload_headers())))
        await asyncio.sleep(0.2)  # past the request timeout
        release.set()
        return await submitted

    assert asyncio.run(scenario()).status == 200


# --- the app's own error answers ----------------------------------------------------------------

@pytest.mark.parametrize("error, code, status", [
    ({"type": "missing", "loc": ["images"], "msg": "Field required"}, "missing_input", 422),
    ({"type": "image_too_large", "loc": ["images", 0], "msg": "over the limit"},
     "image_too_large", 413),
], ids=["pydantic-missing", "our-code"])
def test_bentomls_validation_400_becomes_our_error_body(error: dict, code: str,
                                                        status: int) -> None:
    body = json.dumps({**BENTOML_VALIDATION, "detail": [error]}).encode()
    answer = run_asgi(admission(FakeApp(status=400, body=body)),
                      http_scope(headers=upload_headers()))
    assert answer.status == status, answer
    assert set(answer.json()) == {"error", "detail"}, answer.json()
    assert answer.json()["error"] == code, answer.json()


def test_the_batchers_503_becomes_overloaded_with_retry_after() -> None:
    inner = FakeApp(status=503, body=b'{"error": "process is overloaded"}')
    answer = run_asgi(admission(inner), http_scope(headers=upload_headers()))
    assert answer.status == 503, answer
    assert answer.json()["error"] == "overloaded"
    assert answer.headers["retry-after"] == "1"


def test_a_server_error_stays_a_500() -> None:
    inner = FakeApp(status=500, body=b"Internal Server Error")
    answer = run_asgi(admission(inner), http_scope(headers=upload_headers()))
    assert answer.status == 500, "a bug must not be hidden behind a client error"
    assert answer.json() == {"error": "internal_server_error", "detail": "Internal Server Error"}


def test_a_client_gone_before_its_body_ended_is_logged_as_499_not_as_a_server_error() -> None:
    """BentoML's endpoint reads a disconnect where the body should go on and answers 500; no
    one reads that answer, and a 500 would page an operator for a client that hung up."""
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.disconnect"
        await respond(send, 500, b'{"error": "An unexpected error has occurred"}')

    before = rejected("client_closed_request", 499)
    answer = run_asgi(admission(endpoint), http_scope(headers=upload_headers()), chunks=())
    assert answer.status == 499, answer
    assert answer.json()["error"] == "client_closed_request"
    assert rejected("client_closed_request", 499) == before + 1


def test_a_server_error_with_the_body_read_stays_a_500() -> None:
    inner = FakeApp(status=500, body=b"Internal Server Error", read_body=True)
    answer = run_asgi(admission(inner), http_scope(headers=upload_headers()), chunks=(b"x",))
    assert answer.status == 500


def test_a_success_is_passed_on_untouched() -> None:
    inner = FakeApp(body=b'[{"label": "3"}]')
    answer = run_asgi(admission(inner), http_scope(headers=upload_headers()))
    assert (answer.status, answer.body) == (200, b'[{"label": "3"}]')


def test_every_refusal_is_counted_with_its_reason_and_status() -> None:
    before = rejected("unauthorized", 401)
    run_asgi(admission(FakeApp()), http_scope(headers=upload_headers(key=None)))
    assert rejected("unauthorized", 401) == before + 1


@pytest.mark.parametrize(("error", "kept"), [
    (ValueError("a bug"), True), (ClientDisconnect(), False),
    (ServiceUnavailable("process is overloaded"), False)])
def test_refusals_tracebacks_are_dropped_and_bugs_kept(error: Exception, kept: bool) -> None:
    try:
        raise error
    except Exception:
        record = logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__,
                                   1, "Exception on /classify [POST]", None, sys.exc_info())
    assert ClientErrorTracebacks().filter(record) is kept
