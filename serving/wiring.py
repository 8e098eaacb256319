"""What turns a service class into a served BentoML service, the same way for every task: the
models it packs, the OpenAPI description, batching options, and the ASGI middlewares in one
order (the request log outside admission, so that refusals are logged with their code)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import bentoml

from . import batcher, tracing
from .admission import Admission, admission_routes, job_routes, quiet_client_error_tracebacks
from .asgi import PathAliases
from .balance import ConnectionBalance
from .fast_lane import FastLane
from .inference_protocol import (
    ProtocolModel,
    ProtocolPaths,
    ProtocolRoutes,
    declared_protocol,
    install_parser,
)
from .inputs import how_to_send
from .openapi import described_service
from .rate_limit import install_rate_limit, worker_count
from .request_log import RequestLog
from .settings import LimitsSettings, ServiceSettings, SharedSettings
from .uploads import install_parsers


def batching(settings: ServiceSettings) -> dict[str, Any]:
    """`@bentoml.api` options of a batchable endpoint."""
    return {"batchable": True, "max_batch_size": settings.batching.max_batch_size,
            "max_latency_ms": settings.batching.max_latency_ms}


def as_service(cls: type, *, settings: SharedSettings, bentoml_config: dict[str, Any],
               models: dict[str, bentoml.models.BentoModel], description_file: str,
               version: str, protocols: Sequence[ProtocolModel],
               route_limits: dict[str, tuple[LimitsSettings, str]] | None = None,
               aliases: dict[str, str] | None = None,
               inner: Sequence[tuple[type, dict[str, Any]]] = ()) -> bentoml.Service[Any]:
    """`cls` as a BentoML service with its models packed, its description and middlewares.
    `protocols`: the Open Inference Protocol's view of each served model (the default first);
    `route_limits`: routes with limits of their own (a model's, in a multi-model deployment);
    `aliases`: paths answered as other paths (a default model's routes); `inner`: middlewares
    (class, options) of the service's own, inside admission."""
    # `bentoml build` packs the models named by the service's class attributes: one per tag.
    for number, model in enumerate(models.values()):
        setattr(cls, f"model_{number}", model)
    api_key = settings.api_key()
    # With a key, the OpenAPI spec declares it, so that the Swagger UI offers "Authorize".
    secured_except = settings.security.public_paths if api_key else None
    described = described_service(description_file, version, secured_except, protocols)
    service: bentoml.Service[Any] = bentoml.service(
        service_class=patched_when_built(described, settings.batching_dispatch),
        **bentoml_config)(cls)
    install_middlewares(service, settings, api_key, protocols, route_limits, aliases, inner)
    return service


def patched_when_built(base: type[bentoml.Service[Any]],
                       dispatch: str) -> type[bentoml.Service[Any]]:
    """`base`, whose ASGI app is built with the project's changes to BentoML's service app:
    serving/batcher.py's dispatcher (batching.dispatch) and serving/tracing.py's idle tracing left
    out. They are made when a worker builds its app (Service.to_asgi), not when the service
    module is imported: `bentoml serve`'s main process, which imports the service only to read
    its configuration and start the workers, never builds one, and importing BentoML's service
    app (_bentoml_impl.server.app, with aiohttp) there cost it 10 MB (101 -> 91 MB in
    `make bench`'s idle-RSS row, docs/performance.md round 9)."""

    class PatchedWhenBuilt(base):  # type: ignore[misc]  # untyped in BentoML
        def to_asgi(self, is_main: bool = True) -> Any:
            batcher.install(dispatch)
            tracing.install()
            return super().to_asgi(is_main)

    return PatchedWhenBuilt


# What the Open Inference Protocol's infer route takes besides JSON: the binary extension, sent
# as application/octet-stream (KServe's client) or with no Content-Type (tritonclient).
PROTOCOL_MEDIA_TYPES = ("application/octet-stream", "")


def install_middlewares(service: bentoml.Service[Any], settings: SharedSettings,
                        api_key: str | None, protocols: Sequence[ProtocolModel],
                        route_limits: dict[str, tuple[LimitsSettings, str]] | None = None,
                        aliases: dict[str, str] | None = None,
                        inner: Sequence[tuple[type, dict[str, Any]]] = ()) -> None:
    install_parsers()
    install_parser()
    quiet_client_error_tracebacks()
    routes = admission_routes(
        service.apis, how_to_send,
        lambda api: PROTOCOL_MEDIA_TYPES if declared_protocol(api.input_spec) else ())
    # Added first, so outermost: the connection balance (it sees every request on every
    # connection), paths that are other paths, then the protocol's paths and error shape,
    # around everything.
    if settings.connections.balance:
        service.add_asgi_middleware(ConnectionBalance, service=service.name,
                                    workers=worker_count(service.config))
    if aliases:
        service.add_asgi_middleware(PathAliases, aliases=aliases)
    service.add_asgi_middleware(ProtocolPaths, models=protocols)
    if settings.request_log.enabled:  # before Admission: outside it
        service.add_asgi_middleware(RequestLog, routes=routes)
    install_rate_limit(service, settings, routes)  # outside Admission: serving/rate_limit.py
    service.add_asgi_middleware(
        Admission,
        routes=routes,
        limits=settings.limits,
        public_paths=settings.security.public_paths,
        api_key=api_key,
        limits_key=settings.where.key("limits"),
        jobs=job_routes(service.apis, how_to_send),
        route_limits=route_limits,
    )
    # Inside admission: the key and the limits apply (the health routes are public paths).
    service.add_asgi_middleware(ProtocolRoutes, models=protocols, service_name=service.name)
    for middleware, options in inner:
        service.add_asgi_middleware(middleware, **options)
    if settings.batching_fast_lane:  # innermost: everything above applies to its answers
        service.add_asgi_middleware(FastLane, service=service)

