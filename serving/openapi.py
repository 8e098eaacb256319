"""The OpenAPI spec (Swagger UI at /, /docs.json) as our service describes itself.

BentoML 1.4.39 fills the spec's `info` with its own boilerplate when the service runs from source
("This is a Machine Learning Service created with BentoML", version None, "Contact BentoML
Team"); only a built bento shows the bentofile's description. A BentoML `Service` subclass
(passed as `service_class=` to `@bentoml.service`) puts the service's own description and the
served model's tag there in both cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import bentoml
from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification

DOCS = Path(__file__).resolve().parent.parent / "docs"


def described_service(description_file: str, version: str) -> type[bentoml.Service[Any]]:
    """A BentoML Service class whose OpenAPI `info` is its own: the Markdown file
    `docs/<description_file>` from source (the bentofile's description, the bento's README,
    once built), and `version`, the served model's tag."""

    class DescribedService(bentoml.Service[Any]):  # type: ignore[misc]  # untyped in BentoML
        @property
        def openapi_spec(self) -> OpenAPISpecification:
            info = Info(title=self.name, version=version, description=self._description())
            spec: OpenAPISpecification = attrs.evolve(super().openapi_spec, info=info)
            return spec

        def _description(self) -> str:
            if self.bento is not None:
                return str(self.bento.doc)
            path = DOCS / description_file
            return path.read_text() if path.is_file() else (self.inner.__doc__ or self.name)

    return DescribedService
