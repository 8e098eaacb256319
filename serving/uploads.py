"""Upload: what a request body may carry before anything is decoded. Files, never URLs.

BentoML's multipart parser (1.4.39) treats a text field sent where a file is expected as a URL and
downloads it on the server, reading the whole response into memory: a way to make the service
fetch anything public, without a size limit, and a 500 when the text is not a URL. The service
replaces that parser with one that refuses text in file fields with a 422 saying how to send a file.

Both parsers here also keep a request's *options*, for an endpoint that declares them
(`RequestOptions` in its input's metadata): the text fields of a form under those names (a
detector's `confidence_threshold` beside its `images`), and the JSON keys beside its input. A
form part under any other name, file or text, is refused by its name; so is a body cut before
its closing boundary (docs/limits-and-security.md#multipart-forms). They
are left on the request (`request_fields`) for the endpoint's validators: BentoML's batchable
APIs take exactly one parameter, the batch, so per-request options cannot be parameters.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from _bentoml_impl import serde
from _bentoml_sdk.typing_utils import is_list_type, is_union_type
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
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


def keep_fields(request: Request, fields: dict[str, Any]) -> None:
    request.scope.setdefault("state", {})[REQUEST_FIELDS] = fields


class _CheckedMultiPartParser(MultiPartParser):
    """Starlette's parser, which also notes whether the body reached its closing boundary: a
    body cut short otherwise loses its last part silently (one image fewer answered)."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def read_form(request: Request) -> FormData:
    """The request's form; a body that is not a complete multipart form is refused as
    `invalid_multipart` (Starlette's 400, which BentoML answers as 500), with what is wrong."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":  # url-encoded: text fields only, Starlette's parser
        try:
            return await request.form()
        except HTTPException as exc:
            raise validation_error(_malformed(str(exc.detail))) from None
    received = 0

    async def counted() -> AsyncGenerator[bytes, None]:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            yield chunk

    parser = _CheckedMultiPartParser(request.headers, counted())
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # python-multipart's own reason, when it gave one
        reason = exc.message if exc.__cause__ is None else \
            f"{exc.message.rstrip('.')}: {exc.__cause__}"
        raise validation_error(_malformed(reason)) from None
    request._form = form  # as request.form() does: BentoML closes its files after the answer
    if received and not parser.complete:
        raise validation_error(_malformed(
            "the body ends before its closing boundary, `--<boundary>--`: it was cut short"))
    return form


def _malformed(reason: str) -> MalformedForm:
    return MalformedForm(f"the multipart body could not be parsed ({reason}); let your HTTP "
                         "client build it, e.g. `curl -F images=@digit.png`")


class FilesOnlyMultipartSerde(serde.MultipartSerde):  # type: ignore[misc]  # untyped in BentoML
    """Files under the endpoint's file fields, and its declared options as text fields; any
    other part is refused by its name rather than ignored, so that a misspelt part (a file, or
    an option such as `confidence_treshold`) never passes unnoticed: `missing_input` when the
    file field is absent, `unexpected_part` beside it. A field twice is allowed only for files."""

    async def parse_request(self, request: Request, cls: type[Any]) -> Any:
        form = await read_form(request)
        options_model = declared_options(cls)
        option_names = set(options_model.model_fields) if options_model else set()
        data: dict[str, Any] = {}
        options: dict[str, Any] = {}
        unexpected: list[str] = []
        for key in form:
            values = form.getlist(key)
            if key in cls.multipart_fields:
                files = [await self.ensure_file(v) for v in values]
                data[key] = files if _is_list_field(cls, key) else files[0]
            elif any(isinstance(v, UploadFile) for v in values):
                unexpected.append(f"a file part named {key!r}")
            elif key not in cls.model_fields and key not in option_names:
                unexpected.append(f"a text field named {key!r}")
            elif len(values) > 1:
                raise validation_error(UnexpectedPart(
                    f"the form has the text field {key!r} {len(values)} times; send it once"))
            elif key in cls.model_fields:  # a declared non-file field: JSON, or plain text
                data[key] = _json_or_text(str(values[0]))
            else:
                options[key] = str(values[0])
        if unexpected:
            raise validation_error(_unexpected_parts(cls, data, unexpected, option_names))
        keep_fields(request, options)
        return cls.model_validate(data)

    @staticmethod
    async def ensure_file(obj: str | UploadFile) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise validation_error(NotAFile(NOT_A_FILE))


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
            keep_fields(request, {k: v for k, v in document.items()
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


def _unexpected_parts(cls: type[Any], data: dict[str, Any], unexpected: list[str],
                      option_names: set[str]) -> RejectedInput:
    """`missing_input` when a file field is absent (the code a client sees for a form without
    it), `unexpected_part` beside it; both name the part and what the endpoint takes."""
    takes = "the file part " + (", ".join(f"`{f}`" for f in sorted(cls.multipart_fields))
                                or "(none)")
    if option_names:
        takes += " and the text fields " + ", ".join(f"`{o}`" for o in sorted(option_names))
    found = f"the form has {unexpected[0]}; this endpoint takes {takes} only"
    example = "(e.g. `curl -F images=@digit.png`)"
    missing = sorted(f for f in cls.multipart_fields if f not in data)
    if missing:
        return MissingPart(f"{missing[0]} is required: {found} {example}")
    return UnexpectedPart(f"{found} {example}")


def validation_error(exc: RejectedInput) -> ValidationError:
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


