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
openapi.yaml). The same subclass shows the Open Inference Protocol's infer route with the
protocol's request and answer, not the batch types BentoML derives from the API's signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import bentoml
import yaml
from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification

from .admission import is_public_path, split_public_paths
from .inference_protocol import ProtocolModel, openapi_schemas

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


def rewritten(transforms: Sequence[Callable[[dict[str, Any]], dict[str, Any]]]
              ) -> type[OpenAPISpecification]:
    """An OpenAPISpecification class whose written-out form (/docs.json, a bento's openapi.yaml)
    is BentoML's passed through `transforms`."""

    class RewrittenSpecification(OpenAPISpecification):
        __slots__ = ()

        def asdict(self) -> dict[str, Any]:
            spec: dict[str, Any] = super().asdict()
            for transform in transforms:
                spec = transform(spec)
            return spec

    # `bentoml build` writes the spec with PyYAML, whose representers match the exact class.
    yaml.add_representer(RewrittenSpecification,
                         lambda dumper, spec: dumper.represent_dict(spec.asdict()))
    return RewrittenSpecification


def bearer_secured(public_paths: list[str]) -> type[OpenAPISpecification]:
    """An OpenAPISpecification class whose written-out form declares the bearer scheme."""
    return rewritten([lambda spec: with_bearer_scheme(spec, public_paths)])


def with_protocol_schemas(spec: dict[str, Any], model: ProtocolModel) -> dict[str, Any]:
    """`spec` (a dict) with the infer route's body and answer as the Open Inference Protocol's
    (BentoML derives them from the API's Python types: the batch's, not the protocol's)."""
    operation = spec.get("paths", {}).get(model.infer_route, {}).get("post")
    if isinstance(operation, dict):
        request, answer = openapi_schemas(model)
        operation["requestBody"] = {"content": {"application/json": {"schema": request}}}
        responses = operation.setdefault("responses", {})
        # BentoML keys its responses by int: replace its 200, never add a second "200".
        for status in [key for key in responses if str(key) == "200"]:
            del responses[status]
        responses[200] = {"description": "Successful Response",
                          "content": {"application/json": {"schema": answer}}}
    return spec


def described_service(description_file: str, version: str,
                      secured_except: list[str] | None = None,
                      protocols: Sequence[ProtocolModel] = ()) -> type[bentoml.Service[Any]]:
    """A BentoML Service class whose OpenAPI `info` is its own: the Markdown file
    `docs/<description_file>` from source (the bentofile's description, the bento's README,
    once built), and `version`, the served model's tag. `secured_except`: the service needs an
    API key on every path but these (security.public_paths); None: no key. `protocols`: the
    served models' Open Inference Protocol routes, described as the protocol's."""
    transforms: list[Callable[[dict[str, Any]], dict[str, Any]]] = []
    for protocol in protocols:
        transforms.append(functools.partial(with_protocol_schemas, model=protocol))
    if secured_except is not None:
        transforms.append(lambda spec: with_bearer_scheme(spec, secured_except))
    written = rewritten(transforms) if transforms else None

    class DescribedService(bentoml.Service[Any]):  # type: ignore[misc]  # untyped in BentoML
        @property
        def openapi_spec(self) -> OpenAPISpecification:
            info = Info(title=self.name, version=version, description=self._description())
            spec: OpenAPISpecification = attrs.evolve(super().openapi_spec, info=info)
            if written is None:
                return spec
            return written(**{f.name: getattr(spec, f.name)
                              for f in attrs.fields(OpenAPISpecification)})

        def _description(self) -> str:
            if self.bento is not None:
                return str(self.bento.doc)
            path = DOCS / description_file
            return path.read_text() if path.is_file() else (self.inner.__doc__ or self.name)

    return DescribedService
