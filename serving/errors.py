"""Every refusal the service answers, as one catalog: a code, its HTTP status, and the JSON body
`{"error": <code>, "detail": <what to fix>}`.

Input checks raise `RejectedInput` subclasses (plain Python, usable offline too); the service turns
them into pydantic errors that carry the code, and `serving.admission` turns BentoML's 400 for those
into this body with the code's status.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from pydantic_core import PydanticCustomError

# code -> status. 400: the bytes are not what they claim (undecodable image, invalid JSON,
# malformed multipart); 404/405: no such route, or not with this method (every route, Starlette's
# answers included); 409: the job is not done yet; 413: over a configured limit; 415: wrong
# Content-Type for the route; 422: well-formed but not what the model takes (shape, range,
# missing or unexpected field).
STATUS: dict[str, HTTPStatus] = {
    "invalid_image": HTTPStatus.BAD_REQUEST,
    "invalid_json": HTTPStatus.BAD_REQUEST,
    "invalid_multipart": HTTPStatus.BAD_REQUEST,
    "cancel_not_supported": HTTPStatus.BAD_REQUEST,
    "unauthorized": HTTPStatus.UNAUTHORIZED,
    "not_found": HTTPStatus.NOT_FOUND,
    "unknown_task": HTTPStatus.NOT_FOUND,
    "unknown_model": HTTPStatus.NOT_FOUND,
    "method_not_allowed": HTTPStatus.METHOD_NOT_ALLOWED,
    "job_not_done": HTTPStatus.CONFLICT,
    "request_too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "image_too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "too_many_images": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "unsupported_media_type": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    "invalid_tensor": HTTPStatus.UNPROCESSABLE_ENTITY,
    "not_a_file": HTTPStatus.UNPROCESSABLE_ENTITY,
    "missing_input": HTTPStatus.UNPROCESSABLE_ENTITY,
    "unexpected_part": HTTPStatus.UNPROCESSABLE_ENTITY,
    "invalid_option": HTTPStatus.UNPROCESSABLE_ENTITY,
    "invalid_input": HTTPStatus.UNPROCESSABLE_ENTITY,
    "too_many_requests": HTTPStatus.TOO_MANY_REQUESTS,
    "rate_limited": HTTPStatus.TOO_MANY_REQUESTS,
    "overloaded": HTTPStatus.SERVICE_UNAVAILABLE,
    "timeout": HTTPStatus.GATEWAY_TIMEOUT,
}


class RejectedInput(ValueError):
    """An input the service refuses; `code` is a key of STATUS, the message says how to fix it."""

    code = "invalid_input"


def as_validation_error(exc: RejectedInput) -> PydanticCustomError:
    """Raise this from a pydantic validator: the error's `type` carries our code through BentoML."""
    # The message goes in the context, not the template: a '{' in it must not be formatted.
    return PydanticCustomError(exc.code, "{reason}", {"reason": str(exc)})


def error_body(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": detail}).encode()


def from_bentoml_validation(body: dict[str, Any], route_fields: str) -> tuple[str, str]:
    """BentoML's 400 for a pydantic ValidationError -> (code, detail) of the first error."""
    errors = body.get("detail") or [{}]
    first = errors[0] if isinstance(errors, list) and errors else {}
    kind, message = str(first.get("type", "")), str(first.get("msg", ""))
    where = _location(first.get("loc") or [])
    if kind in STATUS:
        return kind, message
    if kind == "json_invalid":
        return "invalid_json", f"the body is not valid JSON ({message}); send {route_fields}"
    if kind == "missing":
        return "missing_input", f"{where or 'a field'} is required: send {route_fields}"
    return "invalid_input", f"{where}: {message}" if where else message


def _location(loc: list[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
