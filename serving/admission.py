"""Admission: what happens to a request before BentoML parses it, and to every refusal after.

An ASGI middleware in front of the API routes. In order, each check cheaper than what it guards:
API key (401) -> method (405) -> route's Content-Type (415) -> declared body size (413) ->
requests held by this worker (429 + Retry-After) -> the gate: past it, what the worker answers in
limits.target_wait_ms at its measured pace; the others wait their turn with their body unread
(503 + Retry-After after limits.max_queue_wait_ms) -> then, while BentoML parses and the batcher
runs: body size while streaming (413) and the request timeout (504). Every refusal, ours
or BentoML's (its 400 for a validation error, the batcher's 503), leaves as `{"error": <code>,
"detail": <what to fix>}` with the code's status (serving/errors.py) and is counted in
`image_classifier_rejected_requests_total`.
The other routes' 4xx answers take the same shape: another method (405), an unknown path (404),
and the job routes (`<task route>/status|get|retry|cancel`: a missing or unknown task id, a job
not done yet, a cancel, which BentoML does not support).

Why our own concurrency limit and timeout rather than BentoML's `traffic.max_concurrency` and
`traffic.timeout`: BentoML's middlewares sit outside user middlewares, answer in their own format,
and its 429 has no Retry-After. BentoML's timeout stays on behind ours as a backstop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from .asgi import ASGIApp, Headers, Message, Receive, Scope, Send, bearer_token, header
from .errors import STATUS, error_body, from_bentoml_validation
from .metrics import admission_gate, labelled, rejected_requests
from .settings import LimitsSettings


@dataclass(frozen=True)
class Route:
    """An API route: the one Content-Type it takes and, for error messages, what to send.
    `timed`: False for a task's submit route, whose job runs on after the answer is sent."""

    media_type: str
    how_to_send: str
    timed: bool = True
    # Through the gate (Budget.enter), and its answers teach the pace: the batched routes. The
    # others (/model_info, /drift) answer at once and would teach it waits no upload has.
    gated: bool = True
    # Other types it takes ("": none given): the protocol's infer route, whose clients send
    # the binary extension as application/octet-stream, or with no Content-Type at all.
    also_accepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobRoute:
    """A route about one job of a task (`<route>/status`, `/get`, `/retry`, `/cancel`): its
    method, and the route that submits jobs, for error messages."""

    method: str
    submit: str
    how_to_send: str  # what the job's submit takes, for a stored refusal of its body

    def refusal(self, scope: Scope) -> tuple[str, str, Headers] | None:
        """Refused before BentoML: another method, no task id, or a cancel (BentoML 1.4.39
        answers 400 to every cancel, after marking the job cancelled although it runs on)."""
        path, task_id = scope["path"], task_id_of(scope)
        if scope["method"] != self.method and (scope["method"], self.method) != ("HEAD", "GET"):
            return ("method_not_allowed", f"{path} takes {self.method}, not {scope['method']}",
                    [(b"allow", self.method.encode())])
        if not task_id:
            return ("missing_input", f"task_id is required: {self.method} "
                    f"{path}?task_id=<the task_id that POST {self.submit} answered>", [])
        if path.endswith("/cancel"):
            return ("cancel_not_supported",
                    f"a job cannot be cancelled: it runs to its end; poll "
                    f"{path.removesuffix('/cancel')}/status and ignore its result", [])
        return None


def task_id_of(scope: Scope) -> str:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return str((query.get("task_id") or [""])[0]).strip()


def job_routes(apis: Mapping[str, Any], how_to_send: Callable[[Any], str]
               ) -> dict[str, JobRoute]:
    """The job routes BentoML adds for each task (`@bentoml.task`) of the service."""
    routes = {}
    for api in apis.values():
        if api.is_task:
            for name, method in (("status", "GET"), ("get", "GET"), ("retry", "POST"),
                                 ("cancel", "PUT")):
                routes[f"{api.route}/{name}"] = JobRoute(method, f"{api.route}/submit",
                                                         how_to_send(api))
    return routes


def admission_routes(apis: Mapping[str, Any], how_to_send: Callable[[Any], str],
                     also_accepts: Callable[[Any], tuple[str, ...]] = lambda api: ()
                     ) -> dict[str, Route]:
    """The service's API routes (BentoML APIMethods by name), each with what to send
    (`how_to_send(api)`) and the media types it takes besides its own (`also_accepts(api)`);
    a task's job is submitted to `<route>/submit`, and BentoML runs it, after answering, inside
    the same ASGI call."""
    routes = {}
    for api in apis.values():
        route = Route(api.input_spec.mime_type(), how_to_send(api), also_accepts=also_accepts(api),
                      gated=api.batchable)
        routes[api.route] = route
        if api.is_task:
            routes[f"{api.route}/submit"] = Route(route.media_type, route.how_to_send, timed=False,
                                                  gated=False)
    return routes


def split_public_paths(public_paths: list[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """security.public_paths as exact paths and prefixes (the entries ending in '/', but '/')."""
    return (frozenset(p for p in public_paths if not p.endswith("/") or p == "/"),
            tuple(p for p in public_paths if p.endswith("/") and p != "/"))


def is_public_path(path: str, exact: frozenset[str], prefixes: tuple[str, ...]) -> bool:
    return path in exact or path.startswith(prefixes)


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: dict[str, Route],
        limits: LimitsSettings,
        public_paths: list[str],
        api_key: str | None,
        limits_key: str = "limits",
        jobs: dict[str, JobRoute] | None = None,
        route_limits: dict[str, tuple[LimitsSettings, str]] | None = None,
    ) -> None:
        self.app = app
        self.routes = routes
        self.jobs = jobs or {}
        self.default = Budget(limits, limits_key)
        # A route with limits of its own (a model of several in one deployment: its limits and
        # requests in flight); routes that name the same limits key share one budget.
        budgets: dict[str, Budget] = {}
        self.budgets = {path: budgets.setdefault(key, Budget(route_limit, key))
                        for path, (route_limit, key) in (route_limits or {}).items()}
        self.public_exact, self.public_prefixes = split_public_paths(public_paths)
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # CORS preflights carry no credentials and reach no model: BentoML's CORS middleware
        # (inside this one) answers them.
        if scope["method"] == "OPTIONS" or self._is_public(scope):
            return await self.app(scope, receive, ErrorAnswers(send, scope).send)
        if self.api_key is not None and not self._has_api_key(scope):
            return await refuse(send, "unauthorized",
                                "this endpoint needs the API key: send `Authorization: Bearer "
                                "<key>`", [(b"www-authenticate", b"Bearer")])
        route = self.routes.get(scope["path"])
        if route is None:  # a job route, or not an API route (404, 405, docs assets)
            job = self.jobs.get(scope["path"])
            if job is not None and (job_refusal := job.refusal(scope)):
                return await refuse(send, *job_refusal)
            return await self.app(scope, receive, ErrorAnswers(send, scope, job).send)
        if scope["method"] != "POST":
            return await refuse(send, "method_not_allowed",
                                f"{scope['path']} takes POST with {route.how_to_send}",
                                [(b"allow", b"POST")])
        budget = self.budgets.get(scope["path"], self.default)
        if refusal := self._check_headers(scope, route, budget):
            return await refuse(send, *refusal)
        if budget.held >= budget.limits.max_concurrency:
            return await refuse(
                send, "too_many_requests",
                f"this worker holds {budget.held} requests (at its gate or past it), its limit "
                f"({budget.key}.max_concurrency); retry after the time in Retry-After",
                budget.retry_after())
        if route.gated and not await budget.enter():
            # Not the body's turn within the wait: refused with a few headers read, not after
            # an upload was decoded and then dropped by the batcher's max_latency_ms.
            return await refuse(
                send, "overloaded",
                f"no turn within {budget.gate_wait_s * 1000:.0f} ms "
                f"({budget.key}.max_queue_wait_ms): this worker takes {budget.pace_limit()} "
                "requests at a time at its measured pace and more were waiting; retry after "
                "the time in Retry-After", budget.retry_after())
        if not route.gated:
            budget.in_flight += 1  # counted, not queued: a job's submit, /model_info
        scope.setdefault("state", {})[BUDGET_STATE] = budget  # for the fast lane
        try:
            await self._admitted(scope, receive, send, route, budget)
        finally:
            budget.leave()

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, route: Route,
                        budget: Budget) -> None:
        limits = budget.limits
        exchange = Exchange(receive, send, limits.max_request_bytes, route,
                            budget.retry_after(), budget.key)
        if not route.timed:
            return await self.app(scope, exchange.receive, exchange.send)
        try:
            async with asyncio.timeout(limits.request_timeout_s):
                await self.app(scope, exchange.receive, exchange.send)
            if route.gated and budget.pace is not None:
                if exchange.status == HTTPStatus.SERVICE_UNAVAILABLE:
                    budget.pace.back_off(budget.in_flight + 1, time.monotonic())  # + itself
                elif (wait := exchange.server_wait_s()) is not None:
                    budget.pace.record(wait, budget.in_flight)
        except TimeoutError:
            if exchange.response_started:
                raise  # part of an answer is out: nothing better to do than close the connection
            await refuse(send, "timeout",
                         f"no answer within {limits.request_timeout_s:g} s "
                         f"({budget.key}.request_timeout_s); the service is busy or the "
                         "input is slow to process: retry later or send smaller images")

    def _is_public(self, scope: Scope) -> bool:
        return is_public_path(scope["path"], self.public_exact, self.public_prefixes)

    def _has_api_key(self, scope: Scope) -> bool:
        token = bearer_token(scope)
        # compare_digest: the time taken does not tell how much of a guess was right.
        return bool(token) and hmac.compare_digest(token.encode(), self.api_key or b"")

    def _check_headers(self, scope: Scope, route: Route, budget: Budget
                       ) -> tuple[str, str] | None:
        length = header(scope, b"content-length")
        chunked = "chunked" in header(scope, b"transfer-encoding").lower()
        has_body = chunked or (length.isdigit() and int(length) > 0)
        media_type = header(scope, b"content-type").split(";")[0].strip().lower()
        if has_body and media_type != route.media_type and media_type not in route.also_accepts:
            return ("unsupported_media_type",
                    f"{scope['path']} takes {route.media_type}, not {media_type or 'no type'}: "
                    f"send {route.how_to_send}")
        limit = budget.limits.max_request_bytes
        if length.isdigit() and int(length) > limit:
            return ("request_too_large", body_too_large(f"{int(length)} bytes", limit, budget.key))
        return None


# Where admission leaves a request's budget in its scope (the ASGI scope's "state", which
# Starlette's request.state reads).
BUDGET_STATE = "admission_budget"


def alone_in_its_budget(scope: Scope) -> bool:
    """Admitted, and the only request its limits hold in this worker: none other past the gate
    or waiting at it (serving/fast_lane.py)."""
    budget = scope.get("state", {}).get(BUDGET_STATE)
    return budget is not None and budget.in_flight == 1 and not budget.waiting


class Budget:
    """The limits one group of routes answers under, and its requests in this worker (one event
    loop per worker process: plain counters are enough): `in_flight`, past the gate (read,
    decoded, batched, answered), and `waiting` at the gate for their turn, their bodies not yet
    read. The gate lets through what the worker answers in limits.target_wait_ms at its measured
    pace (Pace); the others wait their turn in arrival order, at most limits.max_queue_wait_ms."""

    def __init__(self, limits: LimitsSettings, key: str) -> None:
        self.limits = limits
        self.key = key  # where the limits live in configuration.yaml, for messages
        self.in_flight = 0
        self.waiting: deque[asyncio.Future[bool]] = deque()
        self.pace = Pace(limits.target_wait_ms / 1000, limits.max_concurrency) \
            if limits.target_wait_ms else None
        self.gate_wait_s = min(limits.max_queue_wait_ms / 1000, limits.request_timeout_s)

    @property
    def held(self) -> int:
        """Every request this worker holds, at the gate or past it (what max_concurrency
        bounds)."""
        return self.in_flight + len(self.waiting)

    def pace_limit(self) -> int:
        return int(self.pace.limit) if self.pace else self.limits.max_concurrency

    async def enter(self) -> bool:
        """Past the gate, at once or after waiting in turn; False after max_queue_wait_ms."""
        if self.pace is None or (not self.waiting and self.pace.admits(self.in_flight)):
            self.in_flight += 1
            return True
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        self.waiting.append(turn)
        self.report()
        # A timer rather than asyncio.wait_for: both it and the turn run in this loop, so a turn
        # is either given (in_flight counted by the giver) or expired, never both.
        timer = loop.call_later(self.gate_wait_s, self._expire, turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.leave()  # given the turn, but gone: pass it on
            elif turn in self.waiting:
                self.waiting.remove(turn)
            raise
        finally:
            timer.cancel()

    def leave(self) -> None:
        self.in_flight -= 1
        self.let_in()
        self.report()

    def report(self) -> None:
        """The gate's state in /metrics (image_classifier_admission_gate)."""
        gauge = admission_gate()
        labelled(gauge, self.key, "waiting").set(len(self.waiting))
        labelled(gauge, self.key, "in_flight").set(self.in_flight)
        labelled(gauge, self.key, "limit").set(self.pace_limit())

    def let_in(self) -> None:
        """Give turns, oldest first, while the pace admits more."""
        while self.waiting and (self.pace is None or self.pace.admits(self.in_flight)):
            turn = self.waiting.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(True)

    def _expire(self, turn: asyncio.Future[bool]) -> None:
        if not turn.done():
            self.waiting.remove(turn)
            turn.set_result(False)

    def retry_after(self) -> Headers:
        return [(b"retry-after", str(self.limits.retry_after_s).encode())]


class Pace:
    """How many requests a worker can hold and still answer each within `target_s`: Little's
    law, requests held = answers per second x wait. Each answer gives an estimate from its own
    wait in the server (body received -> answer started) and the requests held when it ends,
    `held x target / wait`; the limit follows the estimates, smoothed, between FLOOR and
    max_concurrency. Lightly loaded, waits are short and the limit sits at max_concurrency;
    saturated, it settles at what the worker answers in `target_s`, whatever the model, the
    images or the machine.

    Why: the batcher's own rule (batching.max_latency_ms) refuses a request only after it was
    read and decoded and has waited; a heavy model at hundreds of connections then spends its
    CPU on uploads it drops. Why requests over the limit wait at the gate (Budget) rather than
    being refused at once: clients that retry at once turn instant refusals into a loop that
    takes the CPU from the answers. Hand-written: a few lines of arithmetic on the request path;
    the adaptive concurrency limiters this follows (Netflix's concurrency-limits, Envoy's adaptive
    concurrency filter) are not Python libraries.
    """

    FLOOR = 2  # one request receiving while one runs
    SMOOTHING = 0.1  # weight of the newest estimate: one slow answer moves the limit 10%
    # On the batcher's 503 (more held than it answers in batching.max_latency_ms): the limit
    # goes to this share of what was held, once per target_s (the refusals of one overload come
    # together, and each would otherwise cut it again); TCP's congestion control halves, but
    # here the answers' estimates pull the limit down as well.
    BACK_OFF = 0.8

    def __init__(self, target_s: float, ceiling: int) -> None:
        self.target_s = target_s
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self._backed_off_at = -float("inf")

    def record(self, wait_s: float, held: int) -> None:
        """An answer waited `wait_s` in the server; `held` requests (itself included) were in
        flight when it ended."""
        estimate = max(held, 1) * self.target_s / max(wait_s, 1e-6)
        smoothed = (1 - self.SMOOTHING) * self.limit + self.SMOOTHING * estimate
        self.limit = min(float(self.ceiling), max(float(self.FLOOR), smoothed))

    def back_off(self, held: int, now: float) -> None:
        """The batcher refused a request while `held` were in flight (itself included): more
        were let in than the worker answers in time. Without this the refusals taught nothing,
        and the limit stayed where it let them happen (resnet18 at 256 connections: 2,131
        refused in one `make bench` run, 57 in another)."""
        if now - self._backed_off_at < self.target_s:
            return
        self._backed_off_at = now
        self.limit = max(float(self.FLOOR), min(self.limit, float(held)) * self.BACK_OFF)

    def admits(self, held: int) -> bool:
        return held < self.limit


class ErrorAnswers:
    """The 4xx answers of every route that is not an API route, as `{"error", "detail"}`:
    Starlette's plain-text 404 and 405, BentoML's `{"error": ...}` on the job routes (an unknown
    task id, a job not done). 5xx answers pass unchanged (/readyz's 503 is its answer)."""

    def __init__(self, send: Send, scope: Scope, job: JobRoute | None = None) -> None:
        self._send, self.scope, self.job = send, scope, job
        self._held: Message | None = None
        self._held_body = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            self._held = message
            return
        if self._held is None or message["type"] != "http.response.body":
            return await self._send(message)
        self._held_body += message.get("body", b"")
        if message.get("more_body", False):
            return
        status, body = self._held["status"], self._held_body
        if is_error_body(body):  # ours already: a failed job's stored answer
            await self._send(self._held)
            return await self._send({"type": "http.response.body", "body": body})
        code, detail = self._reshape(status, body)
        allow = [(k, v) for k, v in self._held.get("headers", []) if k.lower() == b"allow"]
        await refuse(self._send, code, detail, allow, status if code not in STATUS else None)

    def _reshape(self, status: int, body: bytes) -> tuple[str, str]:
        path, method = self.scope["path"], self.scope["method"]
        if self.job is not None and status == HTTPStatus.NOT_FOUND:
            return ("unknown_task", f"no job {task_id_of(self.scope)!r}: use the task_id that "
                    f"POST {self.job.submit} answered (a job is kept 24 h after it ends)")
        document = _json_or_none(body)
        if self.job is not None and isinstance(document, dict) and \
                isinstance(document.get("detail"), list):  # a job whose body was refused
            return from_bentoml_validation(document, self.job.how_to_send)
        if self.job is not None and "not completed" in reason_of(body):
            return ("job_not_done", f"job {task_id_of(self.scope)} is still running: poll "
                    f"{path.rsplit('/', 1)[0]}/status until it is completed or failed")
        if status == HTTPStatus.NOT_FOUND:
            return ("not_found", f"no route {path}: the API is described at /docs.json, and "
                    "shown at /")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            allow = next((v.decode("latin-1") for k, v in self._held.get("headers", [])
                          if k.lower() == b"allow"), "") if self._held else ""
            return ("method_not_allowed", f"{path} does not take {method}"
                    + (f"; it takes {allow}" if allow else ""))
        return status_code_name(status), reason_of(body)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def is_error_body(body: bytes) -> bool:
    """`{"error": <code>, "detail": <text>}`: ours."""
    document = _json_or_none(body)
    return (isinstance(document, dict) and set(document) == {"error", "detail"}
            and all(isinstance(v, str) for v in document.values()))


def reason_of(body: bytes) -> str:
    """The reason in an answer that is not ours: BentoML's `{"error": ...}` (or a list of
    one), else the text."""
    document = _json_or_none(body)
    if isinstance(document, list) and document and isinstance(document[0], dict):
        document = document[0]  # BentoML's body for a BentoMLException below 500
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    return body.decode(errors="replace")


def status_code_name(status: int) -> str:
    """An answer's status as a code: 404 -> "not_found"."""
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


# nginx's status for a request whose client went away first; no HTTPStatus member has it.
CLIENT_CLOSED_REQUEST = 499


class Exchange:
    """One admitted request: counts the body as it streams in, and reshapes error answers."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int, route: Route,
                 retry_after: Headers, limits_key: str = "limits") -> None:
        self._receive, self._send = receive, send
        self.max_bytes, self.route, self.retry_after = max_bytes, route, retry_after
        self.limits_key = limits_key
        self.received = 0
        self.too_large = False
        self.client_gone = False  # the client closed the connection before its answer
        self.response_started = False
        self._held: Message | None = None  # an error's start message, until its body is in
        self._held_body = b""
        # For the worker's pace: when the body was in, and when (and how) it was answered.
        self.body_received_at: float | None = None
        self.answered_at: float | None = None
        self.status = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.client_gone = True
        elif message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                # Stop reading here: BentoML sees a disconnect, and its answer is replaced by ours.
                self.too_large = True
                return {"type": "http.disconnect"}
            if not message.get("more_body", False):
                self.body_received_at = time.monotonic()
        return message

    def server_wait_s(self) -> float | None:
        """How long an answer took once the body was in; None for anything but a 2xx: client
        errors are answered without queueing, and the batcher's 503 leaves the oldest queued
        request at whatever age the queue's fitted cost refuses it, often a short one, which as
        a pace read "fast" exactly when the worker is overloaded (Pace.back_off instead)."""
        if self.body_received_at is None or self.answered_at is None or not (
                200 <= self.status < 300):
            return None
        return self.answered_at - self.body_received_at

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.client_gone and not self.too_large and \
                    message["status"] == HTTPStatus.INTERNAL_SERVER_ERROR:
                # BentoML's endpoint (and the fast lane) answer 500 where the body's end should
                # have been a disconnect. Nobody reads this answer; logged and counted as what it
                # is (nginx's 499), it does not look like a server fault to an operator's alert.
                message = {**message, "status": CLIENT_CLOSED_REQUEST}
            self.answered_at, self.status = time.monotonic(), message["status"]
            if self.too_large or message["status"] >= 400:
                self._held = message
                return
            self.response_started = True
            return await self._send(message)
        if self._held is None or message["type"] != "http.response.body":
            return await self._send(message)
        self._held_body += message.get("body", b"")
        if not message.get("more_body", False):
            self.response_started = True
            code, detail, headers = self._reshape(self._held["status"], self._held_body)
            status = self._held["status"] if code not in STATUS else None
            await refuse(self._send, code, detail, headers, status)

    def _reshape(self, status: int, body: bytes) -> tuple[str, str, Headers]:
        if self.too_large:
            return ("request_too_large", body_too_large(f"over {self.max_bytes} bytes",
                                                        self.max_bytes, self.limits_key), [])
        if status == CLIENT_CLOSED_REQUEST:
            return ("client_closed_request",
                    "the client closed the connection before the whole request was read", [])
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            return ("overloaded",
                    "the batcher cannot answer within batching.max_latency_ms at the current "
                    "load; retry after the time in Retry-After", self.retry_after)
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if status == HTTPStatus.BAD_REQUEST and isinstance(document, dict) and "detail" in document:
            return (*from_bentoml_validation(document, self.route.how_to_send), [])
        # Anything else keeps its status, named by it; a 500 stays a 500: a bug to fix, not to
        # hide.
        return status_code_name(status), reason_of(body), []


async def refuse(
    send: Send, code: str, detail: str, headers: Headers | None = None, status: int | None = None,
) -> None:
    """Answer `{"error": code, "detail": detail}` with the code's status (or `status`)."""
    status = status or int(STATUS[code])
    labelled(rejected_requests(), code, str(status)).inc()
    body = error_body(code, detail)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


def body_too_large(size: str, limit: int, limits_key: str = "limits") -> str:
    return (f"the body is {size}, over the limit of {limit} bytes "
            f"({limits_key}.max_request_bytes): send fewer or smaller images")


class ClientErrorTracebacks(logging.Filter):
    """Drops the traceback BentoML logs at ERROR for every request it answers with a 4xx (an
    invalid input, the body we stopped reading at the size limit, a client that hung up) or with
    its batcher's 503 (`overloaded`): under hostile traffic or overload they would bury real
    errors, and formatting one per refusal costs the CPU an overloaded worker lacks. Those
    requests are counted in image_classifier_rejected_requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import ServiceUnavailable

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (ValidationError, ClientDisconnect, ServiceUnavailable))


def quiet_client_error_tracebacks() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorTracebacks())
