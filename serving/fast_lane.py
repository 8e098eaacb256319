"""The fast lane: batched routes answered without BentoML's per-request endpoint machinery.

Why: that machinery costs more than a whole request does in a plain ASGI app. Measured on 2
cores with the digits model (`make bench`, docs/benchmarks.md): a route our own middleware
answers, 0.17 ms at p50; a BentoML API that does nothing (/model_info), 1.17 ms; the FastAPI
peer's whole /classify, 0.9 ms. The difference is BentoML's router, context and exception
middlewares, its endpoint wrapper and, for a request alone, the batcher's queue and controller
task and the thread hand-off of each batch, not work. The levers table there has the lane's
worth: digits at 1, 64 and 128 connections, 654 / 1,531 / 1,669 answers/s with it, 442 / 1,347 /
1,434 without.

What runs: the pieces BentoML's endpoint runs, in its order. The API's input model reads and
validates the body with the service's own validators (parsing, decoding, limits, options, the
cache); the service's own method answers it; the API's output model writes the answer, with
BentoML's error bodies for each failure. Admission, limits, error bodies, the request log and
BentoML's request metrics sit outside this middleware and apply unchanged.

How the method is called:
- alone: the request is the only one its model's limits hold in this worker (serving/admission.py's
  budget: nothing else past the gate or waiting at it), so no batch could form around it. The
  method runs at once on its items, counted as a batch of one in BentoML's batch-size histogram.
  In the event loop when its calls have been short (under INLINE_MAX_S: a thread hand-off would
  cost more than the call), else in a thread; always under serving/predictor.RUNNING, so that
  service code still runs one call at a time in a worker. Its runtime call may take every core
  the other workers leave idle (serving/cores.py).
- batched: any other request is handed to BentoML's own batcher for the API (the app's
  `batch_infer`: the same queue, dispatcher, batch-size histogram and overload answer as a request
  that came through BentoML's endpoint), which batches it with the others.
Both are counted in image_classifier_fast_lane_answers_total{how}. A browser's request (it names
its Origin) takes BentoML's whole path, for the CORS middleware BentoML places inside ours.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import bentoml
from _bentoml_impl.serde import ALL_SERDE
from bentoml._internal.server.http_app import log_exception
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .admission import alone_in_its_budget
from .asgi import ASGIApp, Receive, Scope, Send, header
from .cores import REQUEST_ALONE
from .metrics import fast_lane_answers, labelled
from .predictor import RUNNING

# A call this short runs in the event loop: a thread hand-off and back costs about as much.
INLINE_MAX_S = 0.001
# Weight of the newest call in the running estimate of a route's call time.
SMOOTHING = 0.2
UNEXPECTED = "An unexpected error has occurred, please check the server log."  # BentoML's words


@dataclass
class Lane:
    """One API route the lane may answer: the BentoML API, and how long its calls take."""

    name: str  # the API's name: the service method
    api: Any  # BentoML's APIMethod
    field: str  # its one input parameter
    call_s: float = 4 * INLINE_MAX_S  # in a thread until calls have been measured short
    method: Callable[[Any], Any] | None = None  # the service instance's, once it exists
    batch_sizes: Any = None  # its series of BentoML's batch-size histogram; False: metrics off

    def timed(self, call: Callable[[Any], Any], value: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(value)
        finally:
            elapsed = time.perf_counter() - started
            self.call_s += SMOOTHING * (elapsed - self.call_s)


@dataclass(frozen=True)
class BentoHeaders:
    """The headers BentoML's endpoints add to every answer (1.4.39's
    ServiceAppFactory._add_response_headers: Server, the request id, the trace id where
    configured), with the configuration read once. BentoML's method resolves its injected
    logging format on every call (simple_di binds its signature), on every answer."""

    server: str
    request_id_format: str
    trace_id_format: str | None  # None: BentoML's http.response.trace_id is off

    @classmethod
    def of(cls, service_name: str) -> BentoHeaders:
        from bentoml._internal.configuration.containers import BentoMLContainer

        formats = BentoMLContainer.logging_formatting.get()
        trace_on = BentoMLContainer.http.response.trace_id.get()
        return cls(f"BentoML Service/{service_name}", formats["span_id"],
                   formats["trace_id"] if trace_on else None)

    def add_to(self, response: Response) -> None:
        from bentoml._internal.context import trace_context

        response.headers["Server"] = self.server
        if trace_context.request_id is not None:
            response.headers["X-BentoML-Request-ID"] = format(trace_context.request_id,
                                                              self.request_id_format)
        if self.trace_id_format is not None and trace_context.trace_id is not None:
            response.headers["X-BentoML-Trace-ID"] = format(trace_context.trace_id,
                                                            self.trace_id_format)


def lanes_of(apis: Mapping[str, Any]) -> dict[str, Lane]:
    """The routes the lane may answer: batchable APIs of one parameter and no context (what
    BentoML's batcher would run as a batch of this request's items), written as plain functions
    (the lane calls them as BentoML's batcher thread does)."""
    lanes = {}
    for name, api in apis.items():
        fields = list(api.input_spec.model_fields)
        if api.batchable and api.ctx_param is None and len(fields) == 1 and \
                not getattr(api.input_spec, "__root_input__", False) and \
                not inspect.iscoroutinefunction(api.func):
            lanes[api.route] = Lane(name, api, fields[0])
    return lanes


def bentoml_service_app(app: Any) -> Any | None:
    """BentoML's app factory for this worker (1.4.39's ServiceAppFactory), found through the
    app below this middleware: its router's API routes are bound to it. It owns the batchers
    (`batch_infer`) and the batch-size histogram. None where it cannot be found."""
    while not hasattr(app, "routes") and hasattr(app, "app"):
        app = app.app
    for route in getattr(app, "routes", []):
        factory = getattr(getattr(getattr(route, "endpoint", None), "func", None), "__self__",
                          None)
        if factory is not None and hasattr(factory, "batch_infer"):
            return factory
    return None


class FastLane:
    """The ASGI middleware, innermost of the service's own: the routes of `lanes_of`."""

    def __init__(self, app: ASGIApp, *, service: Any) -> None:
        self.app = app
        self.service = service
        self.lanes = lanes_of(service.apis)
        self._service_app: Any = None  # BentoML's app factory (its batchers), looked up once
        self.headers = BentoHeaders.of(service.name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lanes.get(scope["path"]) if scope["type"] == "http" else None
        # A browser's request (it names its Origin) goes BentoML's way, through the CORS
        # middleware BentoML places inside every user middleware.
        if lane is None or scope["method"] != "POST" or header(scope, b"origin"):
            return await self.app(scope, receive, send)
        alone = alone_in_its_budget(scope)
        if self._service_app is None:  # the app below is built after the middlewares
            self._service_app = bentoml_service_app(self.app) or False
        if not alone and not self._service_app:  # not found: BentoML's own path batches it
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            with self.service.context.in_request(request):  # as BentoML's ContextMiddleware
                response = await self._respond(lane, request, alone)
            self.headers.add_to(response)
            await response(scope, receive, send)
        finally:
            await request.close()  # the uploads' spooled files, as BentoML's endpoint does

    async def _respond(self, lane: Lane, request: Request, alone: bool) -> Response:
        """BentoML's endpoint for one request (_bentoml_impl/server/app.py api_endpoint and
        api_endpoint_wrapper, 1.4.39): the same parsing, the same answers for each failure."""
        media_type = request.headers.get("content-type", "application/json").split(";")[0]
        serde = ALL_SERDE.get(media_type.strip(), ALL_SERDE["application/json"])()
        try:
            data = await lane.api.input_spec.from_http_request(request, serde)
            value = getattr(data, lane.field)
            output = await (self._run(lane, value) if alone else self._batched(lane, value))
            response: Response = await lane.api.output_spec.to_http_response(output, serde)
        except ValidationError as exc:
            log_exception(request)  # dropped by admission's filter: counted, not logged
            return JSONResponse({
                "error": f"{exc.error_count()} validation error for {exc.title}",
                "detail": exc.errors(include_context=False, include_input=False),
            }, status_code=400)
        except BentoMLException as exc:
            log_exception(request)
            status = exc.error_code.value
            if status >= 500:
                return JSONResponse({"error": UNEXPECTED}, status_code=status)
            return JSONResponse([{"error": str(exc)}], status_code=status)
        except Exception:  # a body cut at the size limit too: admission answers 413 instead
            log_exception(request)
            return JSONResponse({"error": UNEXPECTED}, status_code=500)
        if alone:
            self._count_a_batch_of_one(lane)
        labelled(fast_lane_answers(), lane.api.route, "alone" if alone else "batched").inc()
        return response

    def _count_a_batch_of_one(self, lane: Lane) -> None:
        """In BentoML's batch-size histogram, with BentoML's labels (its batcher counts the
        batches it forms). BentoML's own object: a histogram of ours under that name would be a
        second object on one multiprocess series, and each would overwrite the other's total."""
        from bentoml._internal.context import server_context

        if lane.batch_sizes is None:
            batch_sizes = self._service_app.adaptive_batch_size_hist \
                if self._service_app and self._service_app.enable_metrics else None
            lane.batch_sizes = False if batch_sizes is None else batch_sizes.labels(
                runner_name=self.service.name, worker_index=server_context.worker_index,
                method_name=lane.name, service_version=server_context.bento_version,
                service_name=server_context.bento_name)
        if lane.batch_sizes:
            lane.batch_sizes.observe(1)

    async def _batched(self, lane: Lane, value: Any) -> Any:
        """The answer BentoML's batcher gives this request's items, batched with the others."""
        return await self._service_app.batch_infer(lane.name, (), {lane.field: value})

    async def _run(self, lane: Lane, value: Any) -> Any:
        """The service's method on this request's items: the batch BentoML's batcher would have
        formed of it alone."""
        if lane.method is None:  # BentoML builds this wrapper anew on every attribute access
            lane.method = getattr(bentoml.get_current_service(), lane.name).local
        method = lane.method
        marked = REQUEST_ALONE.set(True)  # its runtime call may take every idle core
        try:
            if lane.call_s < INLINE_MAX_S and RUNNING.acquire(blocking=False):
                try:
                    return lane.timed(method, value)
                finally:
                    RUNNING.release()
            return await asyncio.to_thread(lane.timed, method, value)
        finally:
            REQUEST_ALONE.reset(marked)
