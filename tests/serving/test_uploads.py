"""serving.uploads: the files-only multipart parser, on Starlette requests built from raw ASGI.
A file part is parsed as BentoML parses it; text in a file field (a URL BentoML would fetch) and
a body that is not multipart are refused with our codes."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
from _bentoml_impl import serde
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request

from serving.uploads import FilesOnlyMultipartSerde, install_parsers, request_fields
from tests.helpers import http_scope

BOUNDARY = "unit-test-boundary"


class Upload(BaseModel):
    """An API input as BentoML's serde sees it: `multipart_fields` names the file fields."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    multipart_fields: ClassVar[set[str]] = {"images"}
    images: list[UploadFile]


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (field name, filename or None for a text value, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def request(body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}",
            ) -> Request:
    scope = http_scope(headers={"content-type": content_type, "content-length": str(len(body))})
    scope["app"] = Starlette()  # as under BentoML: a malformed form is then an HTTPException(400)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def parse(body: bytes, **kwargs: str) -> Upload:
    return asyncio.run(FilesOnlyMultipartSerde().parse_request(request(body, **kwargs), Upload))


def refusal_code(caught: pytest.ExceptionInfo[ValidationError]) -> str:
    (error,) = caught.value.errors()
    return str(error["type"])


def test_file_parts_are_parsed() -> None:
    upload = parse(form(("images", "a.png", b"\x89PNG..."), ("images", "b.jpg", b"\xff\xd8")))
    assert [f.filename for f in upload.images] == ["a.png", "b.jpg"]


@pytest.mark.parametrize("value", [b"digit.png", b"http://127.0.0.1:9/digit.png"],
                         ids=["text", "url"])
def test_a_text_value_in_a_file_field_is_refused_as_not_a_file(value: bytes) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(form(("images", None, value)))
    assert refusal_code(caught) == "not_a_file", caught.value
    assert "curl -F images=@" in str(caught.value), "the message shows how to send a file"


@pytest.mark.parametrize("parts, code", [
    ([("image", "a.png", b"x")], "missing_input"),
    ([("images", "a.png", b"x"), ("mask", "m.png", b"y")], "unexpected_part"),
], ids=["instead-of-images", "beside-images"])
def test_a_file_under_another_name_is_refused_by_its_name(
        parts: list[tuple[str, str | None, bytes]], code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(form(*parts))
    assert refusal_code(caught) == code, caught.value
    assert f"file part named {parts[-1][0]!r}" in str(caught.value), "the message names it"


def test_text_fields_beside_the_files_are_kept_as_options() -> None:
    body = form(("images", "a.png", b"x"), ("confidence_threshold", None, b"0.7"))
    req = request(body)
    asyncio.run(FilesOnlyMultipartSerde().parse_request(req, Upload))
    assert request_fields(req) == {"confidence_threshold": "0.7"}


def test_a_body_that_is_not_multipart_is_refused_as_invalid_multipart() -> None:
    with pytest.raises(ValidationError) as caught:
        parse(b"--x\r\n", content_type="multipart/form-data")  # no boundary
    assert refusal_code(caught) == "invalid_multipart", caught.value
    assert "could not be parsed" in str(caught.value)


def test_the_parser_replaces_bentomls_for_multipart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serde, "ALL_SERDE", dict(serde.ALL_SERDE))  # restored after the test
    install_parsers()
    assert serde.ALL_SERDE["multipart/form-data"] is FilesOnlyMultipartSerde
