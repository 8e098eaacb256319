"""Upload: what a request body may carry before anything is decoded. Files, never URLs.

BentoML's multipart parser (1.4.39) treats a text field sent where a file is expected as a URL and
downloads it on the server, reading the whole response into memory: a way to make the service
fetch anything public, without a size limit, and a 500 when the text is not a URL. The service
replaces that parser with one that refuses text in file fields with a 422 saying how to send a file.

Both parsers here also keep a request's *options*: the text fields of a form that are not API
parameters (a detector's `confidence_threshold` beside its `images`), and for an endpoint that
declares options (`RequestOptions` in its input's metadata) the JSON keys beside its input. They
are left on the request (`request_fields`) for the endpoint's validators: BentoML's batchable
APIs take exactly one parameter, the batch, so per-request options cannot be parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from _bentoml_impl import serde
from _bentoml_sdk.typing_utils import is_list_type, is_union_type
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .errors import RejectedInput, as_validation_error

NOT_A_FILE = (
    "an image must be sent as a file part of a multipart/form-data body, e.g. "
    "`curl -F images=@digit.png`; text values and URLs are not accepted"
)


class NotAFile(RejectedInput):
    code = "not_a_file"


class TooManyImages(RejectedInput):
    code = "too_many_images"


class MalformedForm(RejectedInput):
    code = "invalid_multipart"


class UnexpectedPart(RejectedInput):
    code = "unexpected_part"


class MissingPart(RejectedInput):
    code = "missing_input"


# Where the parsers leave a request's options, in its ASGI scope's state.
REQUEST_FIELDS = "image_service_request_fields"


@dataclass(frozen=True)
class RequestOptions:
    """Put in an input's Annotated metadata: its endpoint takes these per-request options, as
    form fields beside the files or as JSON keys beside the input. The OpenAPI spec lists
    them."""

    model: type[BaseModel]


def request_fields(request: Request | None) -> dict[str, Any]:
    """The option fields the parser kept for this request ({} when there are none)."""
    if request is None:
        return {}
    fields: dict[str, Any] = (request.scope.get("state") or {}).get(REQUEST_FIELDS, {})
    return fields


def declared_options(cls: type[Any]) -> type[BaseModel] | None:
    """The options model an API's input model declares, if any."""
    for field in cls.model_fields.values():
        for marker in field.metadata:
            if isinstance(marker, RequestOptions):
                return marker.model
    return None


def _keep_fields(request: Request, fields: dict[str, Any]) -> None:
    request.scope.setdefault("state", {})[REQUEST_FIELDS] = fields


class FilesOnlyMultipartSerde(serde.MultipartSerde):  # type: ignore[misc]  # untyped in BentoML
    async def parse_request(self, request: Request, cls: type[Any]) -> Any:
        try:
            form = await request.form()
        except HTTPException as exc:  # Starlette's 400 for a malformed body; BentoML answers 500
            raise _validation_error(MalformedForm(
                f"the multipart body could not be parsed ({exc.detail}); let your HTTP client "
                f"build it, e.g. `curl -F images=@digit.png`"
            )) from None
        data: dict[str, Any] = {}
        options: dict[str, Any] = {}
        unexpected: list[str] = []
        for key in form:
            values = form.getlist(key)
            if key in cls.multipart_fields:
                files = [await self.ensure_file(v) for v in values]
                data[key] = files if _is_list_field(cls, key) else files[0]
            elif any(isinstance(v, UploadFile) for v in values):
                unexpected.append(key)
            elif key in cls.model_fields:  # a declared non-file field: JSON, or plain text
                data[key] = _json_or_text(str(values[-1]))
            else:
                options[key] = str(values[-1])
        # A file part under another name is refused by name rather than ignored, so that a
        # misspelt part never passes unnoticed: `missing_input` when the expected part is absent
        # (the code a client sees for a form without it), `unexpected_part` beside it.
        if unexpected:
            expected = ", ".join(f"`{f}`" for f in sorted(cls.multipart_fields)) or "no file"
            missing = sorted(f for f in cls.multipart_fields if f not in data)
            found = f"the form has a file part named {unexpected[0]!r}; this endpoint takes"
            raise _validation_error(
                MissingPart(f"{missing[0]} is required: {found} {expected} (e.g. "
                            f"`curl -F images=@digit.png`)") if missing else
                UnexpectedPart(f"{found} {expected} (e.g. `curl -F images=@digit.png`)"))
        _keep_fields(request, options)
        return cls.model_validate(data)

    @staticmethod
    async def ensure_file(obj: str | UploadFile) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise _validation_error(NotAFile(NOT_A_FILE))


class OptionsJSONSerde(serde.JSONSerde):  # type: ignore[misc]  # untyped in BentoML
    """BentoML's JSON parser, which also keeps the keys beside the input of an endpoint that
    declares options (the others are parsed exactly as before, without a second pass)."""

    async def parse_request(self, request: Request, cls: type[Any]) -> Any:
        options_model = declared_options(cls)
        if options_model is None:
            return await super().parse_request(request, cls)
        body = await request.body()
        try:
            document = json.loads(body or b"{}")
        except ValueError:  # BentoML's own parse reports it, as invalid JSON
            return await super().parse_request(request, cls)
        if isinstance(document, dict):
            _keep_fields(request, {k: v for k, v in document.items()
                                   if k not in cls.model_fields})
            return cls.model_validate({k: v for k, v in document.items() if k in cls.model_fields})
        return await super().parse_request(request, cls)


def _is_list_field(cls: type[Any], name: str) -> bool:
    annotation = cls.model_fields[name].annotation
    if is_union_type(annotation):
        annotation = annotation.__args__[0]
    return bool(is_list_type(annotation))


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _validation_error(exc: RejectedInput) -> ValidationError:
    """Outside a validator, a RejectedInput becomes the ValidationError BentoML answers as 4xx."""
    error = InitErrorDetails(type=as_validation_error(exc), loc=(), input="")
    return ValidationError.from_exception_data("Input", [error])


def install_parsers() -> None:
    """Our parsers for both media types BentoML parses as forms, and for JSON."""
    table: Any = serde.ALL_SERDE  # a plain dict typed as a Mapping
    for media_type, parser in list(table.items()):
        if parser is serde.MultipartSerde:
            table[media_type] = FilesOnlyMultipartSerde
        elif parser is serde.JSONSerde:
            table[media_type] = OptionsJSONSerde


