"""serving.uploads: the files-only multipart parser, on Starlette requests built from raw ASGI.
A file part is parsed as BentoML parses it; text in a file field (a URL BentoML would fetch) and
a body that is not multipart are refused with our codes."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, ClassVar

import pytest
from _bentoml_impl import serde
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request

from serving.uploads import (
    FilesOnlyMultipartSerde,
    RequestOptions,
    install_parsers,
    request_fields,
)
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


class Threshold(BaseModel):
    confidence_threshold: float | None = None


class UploadWithOptions(Upload):
    """An input that declares options (a detector's), as serving/inputs.py does."""

    images: Annotated[list[UploadFile], RequestOptions(Threshold)]


def test_declared_option_fields_beside_the_files_are_kept() -> None:
    body = form(("images", "a.png", b"x"), ("confidence_threshold", None, b"0.7"))
    req = request(body)
    asyncio.run(FilesOnlyMultipartSerde().parse_request(req, UploadWithOptions))
    assert request_fields(req) == {"confidence_threshold": "0.7"}


@pytest.mark.parametrize("model, parts, code, named", [
    (Upload, [("images", "a.png", b"x"), ("confidence_threshold", None, b"0.7")],
     "unexpected_part", "text field named 'confidence_threshold'"),
    (UploadWithOptions, [("images", "a.png", b"x"), ("confidence_treshold", None, b"0.7")],
     "unexpected_part", "text field named 'confidence_treshold'"),
    (Upload, [("note", None, b"\xff\xfe not UTF-8")], "missing_input", "text field named 'note'"),
    (UploadWithOptions, [("images", "a.png", b"x"), ("confidence_threshold", None, b"0.7"),
                         ("confidence_threshold", None, b"0.2")],
     "unexpected_part", "'confidence_threshold' 2 times"),
], ids=["option-the-endpoint-lacks", "misspelt-option", "non-utf8-text-only", "option-twice"])
def test_a_text_field_the_endpoint_does_not_take_is_refused_by_its_name(
        model: type[Upload], parts: list[tuple[str, str | None, bytes]], code: str,
        named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        asyncio.run(FilesOnlyMultipartSerde().parse_request(request(form(*parts)), model))
    assert refusal_code(caught) == code, caught.value
    assert named in str(caught.value), caught.value


def part(headers: bytes, content: bytes = b"x") -> bytes:
    return f"--{BOUNDARY}\r\n".encode() + headers + b"\r\n\r\n" + content + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()
IMAGE_PART = part(b'Content-Disposition: form-data; name="images"; filename="a.png"')


@pytest.mark.parametrize("body, reason", [
    (part(b'Content-Disposition: form-data; filename="a.png"') + END, '"name" must be provided'),
    (part(b"Content-Type: image/png") + END, '"name" must be provided'),
    (IMAGE_PART, "ends before its closing boundary"),
    (IMAGE_PART + IMAGE_PART[:40], "ends before its closing boundary"),
    (part(b'Content-Disposition: form-data; name="images"; filename="a.png"\r\nX-Long: '
          + b"a" * 100_000) + END, "Maximum header size exceeded"),
    (IMAGE_PART * 1001 + END, "Too many files"),
    (b"not multipart at all", "Expected boundary character"),
], ids=["no-name", "no-content-disposition", "no-closing-boundary", "cut-in-a-part",
        "very-long-header", "thousands-of-parts", "no-boundary-in-the-body"])
def test_a_malformed_body_is_refused_as_invalid_multipart_with_the_reason(
        body: bytes, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(body)
    assert refusal_code(caught) == "invalid_multipart", caught.value
    assert reason in str(caught.value), caught.value


def test_odd_encodings_in_a_filename_and_a_nested_multipart_file_are_kept_as_bytes() -> None:
    nested = b"--inner\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\ny\r\n--inner--"
    body = (part(b'Content-Disposition: form-data; name="images"; filename="\xff\xfe.png"')
            + part(b'Content-Disposition: form-data; name="images"; filename="n.bin"\r\n'
                   b"Content-Type: multipart/mixed; boundary=inner", nested) + END)
    upload = parse(body)
    assert [f.filename for f in upload.images] == ["\xff\xfe.png", "n.bin"]  # as Latin-1
    assert upload.images[1].file.read() == nested, "a file's bytes are never parsed here"


def test_a_body_that_is_not_multipart_is_refused_as_invalid_multipart() -> None:
    with pytest.raises(ValidationError) as caught:
        parse(b"--x\r\n", content_type="multipart/form-data")  # no boundary
    assert refusal_code(caught) == "invalid_multipart", caught.value
    assert "could not be parsed" in str(caught.value)


def test_the_parser_replaces_bentomls_for_multipart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serde, "ALL_SERDE", dict(serde.ALL_SERDE))  # restored after the test
    install_parsers()
    assert serde.ALL_SERDE["multipart/form-data"] is FilesOnlyMultipartSerde
