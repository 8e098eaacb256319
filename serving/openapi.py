"""The OpenAPI spec (Swagger UI at /, /docs.json) as our service describes itself.

BentoML 1.4.39 fills the spec's `info` with its own boilerplate when the service runs from source
("This is a Machine Learning Service created with BentoML", version None, "Contact BentoML
Team"); only a built bento shows the bentofile's description. A BentoML `Service` subclass
(passed as `service_class=` to `@bentoml.service`) puts the service's own description and the
served model's tag there in both cases.

With an API key configured, the spec declares it as an HTTP bearer scheme required by every
operation outside `security.public_paths`: the Swagger UI then shows "Authorize", and its "Try it
out" sends `Authorization: Bearer <key>`. BentoML 1.4.39's spec classes have no field for
security, so a subclass adds it when the spec is written out (/docs.json, a bento's
openapi.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import bentoml
import yaml
from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification

from .admission import is_public_path, split_public_paths

DOCS = Path(__file__).resolve().parent.parent / "docs"
BEARER = "apiKey"  # the security scheme's name in the spec


def with_bearer_scheme(spec: dict[str, Any], public_paths: list[str]) -> dict[str, Any]:
    """`spec` (a dict) with the bearer scheme, required by every operation that is not public."""
    exact, prefixes = split_public_paths(public_paths)
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http", "scheme": "bearer",
        "description": "The service's API key (security.api_key_env or security.api_key_file), "
                       "sent as `Authorization: Bearer <key>`."}
    for path, item in spec.get("paths", {}).items():
        if not is_public_path(path, exact, prefixes):
            for operation in item.values():
                if isinstance(operation, dict):
                    operation["security"] = [{BEARER: []}]
    return spec


def bearer_secured(public_paths: list[str]) -> type[OpenAPISpecification]:
    """An OpenAPISpecification class whose written-out form declares the bearer scheme."""

    class BearerSecuredSpecification(OpenAPISpecification):
        __slots__ = ()

        def asdict(self) -> dict[str, Any]:
            return with_bearer_scheme(super().asdict(), public_paths)

    # `bentoml build` writes the spec with PyYAML, whose representers match the exact class.
    yaml.add_representer(BearerSecuredSpecification,
                         lambda dumper, spec: dumper.represent_dict(spec.asdict()))
    return BearerSecuredSpecification


def described_service(description_file: str, version: str,
                      secured_except: list[str] | None = None) -> type[bentoml.Service[Any]]:
    """A BentoML Service class whose OpenAPI `info` is its own: the Markdown file
    `docs/<description_file>` from source (the bentofile's description, the bento's README,
    once built), and `version`, the served model's tag. `secured_except`: the service needs an
    API key on every path but these (security.public_paths); None: no key."""
    secured = bearer_secured(secured_except) if secured_except is not None else None

    class DescribedService(bentoml.Service[Any]):  # type: ignore[misc]  # untyped in BentoML
        @property
        def openapi_spec(self) -> OpenAPISpecification:
            info = Info(title=self.name, version=version, description=self._description())
            spec: OpenAPISpecification = attrs.evolve(super().openapi_spec, info=info)
            if secured is None:
                return spec
            return secured(**{f.name: getattr(spec, f.name)
                              for f in attrs.fields(OpenAPISpecification)})

        def _description(self) -> str:
            if self.bento is not None:
                return str(self.bento.doc)
            path = DOCS / description_file
            return path.read_text() if path.is_file() else (self.inner.__doc__ or self.name)

    return DescribedService
