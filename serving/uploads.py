"""Upload: what a request may carry before anything is decoded. Files, never URLs; a bounded count.

BentoML's multipart parser (1.4.39) treats a text field sent where a file is expected as a URL and
downloads it on the server, reading the whole response into memory: a way to make the service
fetch anything public, without a size limit, and a 500 when the text is not a URL. The service
replaces that parser with one that refuses text in file fields with a 422 saying how to send a file.
"""

from __future__ import annotations

from typing import Any

from _bentoml_impl import serde
from pydantic import ValidationError
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


class FilesOnlyMultipartSerde(serde.MultipartSerde):  # type: ignore[misc]  # untyped in BentoML
    async def parse_request(self, request: Request, cls: type[Any]) -> Any:
        try:
            return await super().parse_request(request, cls)
        except HTTPException as exc:  # Starlette's 400 for a malformed body; BentoML answers 500
            raise _validation_error(MalformedForm(
                f"the multipart body could not be parsed ({exc.detail}); let your HTTP client "
                f"build it, e.g. `curl -F images=@digit.png`"
            )) from None

    @staticmethod
    async def ensure_file(obj: str | UploadFile) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise _validation_error(NotAFile(NOT_A_FILE))


def _validation_error(exc: RejectedInput) -> ValidationError:
    """Outside a validator, a RejectedInput becomes the ValidationError BentoML answers as 4xx."""
    error = InitErrorDetails(type=as_validation_error(exc), loc=(), input="")
    return ValidationError.from_exception_data("Input", [error])


def refuse_urls_in_file_fields() -> None:
    """Install the parser for both media types BentoML parses as forms."""
    table: Any = serde.ALL_SERDE  # a plain dict typed as a Mapping
    for media_type, parser in list(table.items()):
        if parser is serde.MultipartSerde:
            table[media_type] = FilesOnlyMultipartSerde
