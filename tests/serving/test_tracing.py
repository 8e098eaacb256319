"""serving.tracing: BentoML's OpenTelemetry middleware left out only where nothing is exported
(the real server's side: tests/test_observability.py)."""

from __future__ import annotations

from starlette.middleware import Middleware

from serving import tracing


class OpenTelemetryMiddleware:  # named as OpenTelemetry's ASGI class, which is matched by name
    def __init__(self, app: object) -> None:
        self.app = app


class TimeoutMiddleware:
    def __init__(self, app: object) -> None:
        self.app = app


def test_the_opentelemetry_middleware_is_left_out_only_when_nothing_exports() -> None:
    stack = [Middleware(TimeoutMiddleware), Middleware(OpenTelemetryMiddleware)]
    assert [m.cls for m in tracing.without_idle_tracing(stack, exporting=False)] == [
        TimeoutMiddleware]
    assert tracing.without_idle_tracing(stack, exporting=True) == stack


def test_bentoml_names_the_class_we_leave_out() -> None:
    """If OpenTelemetry renamed its ASGI middleware, nothing would be left out, silently."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as Real

    assert Real.__name__ == tracing.OTEL_MIDDLEWARE


def test_installing_twice_wraps_bentoml_once() -> None:
    from _bentoml_impl.server.app import ServiceAppFactory

    tracing.install()
    once = ServiceAppFactory.middlewares
    tracing.install()
    assert ServiceAppFactory.middlewares is once
    assert once.fget.idle_tracing_left_out


def test_the_default_configuration_exports_nothing() -> None:
    assert tracing.exporter_configured() is False
