"""Admission: what happens to a request before BentoML parses it, and to every refusal after.

An ASGI middleware in front of the API routes. In order, each check cheaper than what it guards:
API key (401) -> route's Content-Type (415) -> declared body size (413) -> requests in flight in
this worker (429 + Retry-After) -> then, while BentoML parses and the batcher runs: body size while
streaming (413) and the request timeout (504). Every refusal, ours or BentoML's (its 400 for a
validation error, the batcher's 503), leaves as `{"error": <code>, "detail": <what to fix>}` with
the code's status (serving/errors.py) and is counted in `image_classifier_rejected_requests_total`.

Why our own concurrency limit and timeout rather than BentoML's `traffic.max_concurrency` and
`traffic.timeout`: BentoML's middlewares sit outside user middlewares, answer in their own format,
and its 429 has no Retry-After. BentoML's timeout stays on behind ours as a backstop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from .asgi import ASGIApp, Headers, Message, Receive, Scope, Send, header
from .errors import STATUS, error_body, from_bentoml_validation
from .metrics import rejected_requests
from .settings import LimitsSettings


@dataclass(frozen=True)
class Route:
    """An API route: the one Content-Type it takes and, for error messages, what to send.
    `timed`: False for a task's submit route, whose job runs on after the answer is sent."""

    media_type: str
    how_to_send: str
    timed: bool = True


def admission_routes(apis: Mapping[str, Any], how_to_send: Callable[[Any], str]
                     ) -> dict[str, Route]:
    """The service's API routes (BentoML APIMethods by name), each with what to send
    (`how_to_send(api)`); a task's job is submitted to `<route>/submit`, and BentoML runs it,
    after answering, inside the same ASGI call."""
    routes = {}
    for api in apis.values():
        route = Route(api.input_spec.mime_type(), how_to_send(api))
        routes[api.route] = route
        if api.is_task:
            routes[f"{api.route}/submit"] = Route(route.media_type, route.how_to_send, timed=False)
    return routes


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
    ) -> None:
        self.app = app
        self.routes = routes
        self.limits = limits
        self.limits_key = limits_key  # where the limits live in configuration.yaml, for messages
        self.public_exact = frozenset(p for p in public_paths if not p.endswith("/") or p == "/")
        self.public_prefixes = tuple(p for p in public_paths if p.endswith("/") and p != "/")
        self.api_key = api_key.encode() if api_key else None
        self.in_flight = 0  # one event loop per worker process: a plain counter is enough

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # CORS preflights carry no credentials and reach no model: BentoML's CORS middleware
        # (inside this one) answers them.
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._is_public(scope):
            return await self.app(scope, receive, send)
        if self.api_key is not None and not self._has_api_key(scope):
            return await refuse(send, "unauthorized",
                                "this endpoint needs the API key: send `Authorization: Bearer "
                                "<key>`", [(b"www-authenticate", b"Bearer")])
        route = self.routes.get(scope["path"])
        if route is None:  # not an API route: Starlette answers (404, 405, docs assets)
            return await self.app(scope, receive, send)
        if refusal := self._check_headers(scope, route):
            return await refuse(send, *refusal)
        if self.in_flight >= self.limits.max_concurrency:
            return await refuse(
                send, "too_many_requests",
                f"this worker has {self.in_flight} requests in flight, its limit "
                f"({self.limits_key}.max_concurrency); retry after the time in Retry-After",
                self._retry_after())
        self.in_flight += 1
        try:
            await self._admitted(scope, receive, send, route)
        finally:
            self.in_flight -= 1

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        exchange = Exchange(receive, send, self.limits.max_request_bytes, route,
                            self._retry_after(), self.limits_key)
        if not route.timed:
            return await self.app(scope, exchange.receive, exchange.send)
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                await self.app(scope, exchange.receive, exchange.send)
        except TimeoutError:
            if exchange.response_started:
                raise  # part of an answer is out: nothing better to do than close the connection
            await refuse(send, "timeout",
                         f"no answer within {self.limits.request_timeout_s:g} s "
                         f"({self.limits_key}.request_timeout_s); the service is busy or the "
                         "input is slow to process: retry later or send smaller images")

    def _is_public(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in self.public_exact or path.startswith(self.public_prefixes)

    def _has_api_key(self, scope: Scope) -> bool:
        scheme, _, token = header(scope, b"authorization").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key or b"")

    def _check_headers(self, scope: Scope, route: Route) -> tuple[str, str] | None:
        length = header(scope, b"content-length")
        chunked = "chunked" in header(scope, b"transfer-encoding").lower()
        has_body = chunked or (length.isdigit() and int(length) > 0)
        media_type = header(scope, b"content-type").split(";")[0].strip().lower()
        if has_body and media_type != route.media_type:
            return ("unsupported_media_type",
                    f"{scope['path']} takes {route.media_type}, not {media_type or 'no type'}: "
                    f"send {route.how_to_send}")
        if length.isdigit() and int(length) > self.limits.max_request_bytes:
            return ("request_too_large",
                    body_too_large(f"{int(length)} bytes", self.limits.max_request_bytes,
                                   self.limits_key))
        return None

    def _retry_after(self) -> Headers:
        return [(b"retry-after", str(self.limits.retry_after_s).encode())]


class Exchange:
    """One admitted request: counts the body as it streams in, and reshapes error answers."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int, route: Route,
                 retry_after: Headers, limits_key: str = "limits") -> None:
        self._receive, self._send = receive, send
        self.max_bytes, self.route, self.retry_after = max_bytes, route, retry_after
        self.limits_key = limits_key
        self.received = 0
        self.too_large = False
        self.response_started = False
        self._held: Message | None = None  # an error's start message, until its body is in
        self._held_body = b""

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                # Stop reading here: BentoML sees a disconnect, and its answer is replaced by ours.
                self.too_large = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
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
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            return ("method_not_allowed", f"use POST with {self.route.how_to_send}", [])
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
        if isinstance(document, list) and document and isinstance(document[0], dict):
            document = document[0]  # BentoML's body for a BentoMLException below 500
        reason = (document.get("error") if isinstance(document, dict)
                  else body.decode(errors="replace"))
        # Anything else keeps its status, named by it ("method_not_allowed"); a 500 stays a 500:
        # a bug to fix, not to hide.
        return (HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_"),
                str(reason), [])


async def refuse(
    send: Send, code: str, detail: str, headers: Headers | None = None, status: int | None = None,
) -> None:
    """Answer `{"error": code, "detail": detail}` with the code's status (or `status`)."""
    status = status or int(STATUS[code])
    rejected_requests().labels(reason=code, status=str(status)).inc()
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
    invalid input, or the body we stopped reading at the size limit): under hostile traffic they
    would bury real errors. Those requests are counted in image_classifier_rejected_requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (ValidationError, ClientDisconnect))


def quiet_client_error_tracebacks() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorTracebacks())
