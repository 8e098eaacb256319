"""The ASGI middlewares every service gets, in the same order: the request log outside (so that
refusals are logged with their code), admission inside it (serving/admission.py)."""

from __future__ import annotations

from typing import Any

import bentoml

from .admission import Admission, admission_routes, quiet_client_error_tracebacks
from .inputs import how_to_send
from .request_log import RequestLog
from .settings import ServiceSettings
from .uploads import refuse_urls_in_file_fields


def install(service: bentoml.Service[Any], settings: ServiceSettings) -> None:
    refuse_urls_in_file_fields()
    quiet_client_error_tracebacks()
    routes = admission_routes(service.apis, how_to_send)
    if settings.request_log.enabled:  # added first: outside Admission
        service.add_asgi_middleware(RequestLog, routes=routes)
    service.add_asgi_middleware(
        Admission,
        routes=routes,
        limits=settings.limits,
        public_paths=settings.security.public_paths,
        api_key=settings.api_key(),
        limits_key=settings.where.key("limits"),
    )
