"""BentoML's OpenTelemetry middleware, only where its traces go somewhere.

BentoML 1.4.39 wraps every request of a service in OpenTelemetry's ASGI middleware whatever its
`tracing` configuration: with no exporter (the default) each request still builds a server span
and a span per message sent and received, and drops them. On this project's request path that
was the largest cost not doing work: digits on 2 cores with the shipped configuration, 1,531 vs
984 answers/s at 64 connections without and with it, 1,669 vs 1,041 at 128 (`make bench`'s
levers table, docs/benchmarks.md).

So the middleware is left out of the app where no exporter is configured
(`tracing.exporter_type`, in the service's block of configuration.yaml or BentoML's own
configuration: https://docs.bentoml.com/en/latest/guides/tracing.html). Configure one and the
middleware is there, unchanged. What goes with it when none is: BentoML's X-BentoML-Request-ID
response header and the span ids in BentoML's own log lines, ids of spans nothing collects; our
request log's X-Request-ID (serving/request_log.py) is unaffected.
"""

from __future__ import annotations

from typing import Any

# The class BentoML adds (_bentoml_impl/server/app.py, ServiceAppFactory.middlewares), by name:
# importing it here would load OpenTelemetry's ASGI instrumentation in every process that reads
# this module.
OTEL_MIDDLEWARE = "OpenTelemetryMiddleware"


def exporter_configured() -> bool:
    """Whether traces go anywhere: BentoML's merged configuration names an exporter (the
    service's block is merged into it before its app is built)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.config.tracing.exporter_type.get() is not None


def without_idle_tracing(middlewares: list[Any], exporting: bool) -> list[Any]:
    """BentoML's middlewares, less OpenTelemetry's where nothing is exported."""
    if exporting:
        return middlewares
    return [m for m in middlewares if getattr(m.cls, "__name__", "") != OTEL_MIDDLEWARE]


def install() -> None:
    """Make BentoML's service app leave the middleware out where no exporter is configured,
    decided when a worker builds its app (after the configuration is loaded)."""
    from _bentoml_impl.server.app import ServiceAppFactory

    built = ServiceAppFactory.middlewares
    if getattr(built.fget, "idle_tracing_left_out", False):
        return  # installed already (a second service module in this process)

    def middlewares(self: ServiceAppFactory) -> list[Any]:
        return without_idle_tracing(built.fget(self), exporter_configured())

    middlewares.idle_tracing_left_out = True  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)
