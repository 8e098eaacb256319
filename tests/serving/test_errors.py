"""serving/errors.py: BentoML's validation answer becomes one code and a reason to act on."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from serving.errors import STATUS, RejectedInput, as_validation_error, from_bentoml_validation

HOW = "a multipart form"


class Oversized(RejectedInput):
    code = "image_too_large"


class Upload(BaseModel):
    images: list[int]

    @field_validator("images")
    @classmethod
    def _refuse(cls, value: list[int]) -> list[int]:
        if len(value) > 2:
            raise as_validation_error(Oversized("3 is over {the} limit of 2"))
        return value


def bentoml_body(error: ValidationError) -> dict:
    """What BentoML 1.4.39 answers for a ValidationError (app.py, api_endpoint_wrapper)."""
    return {"error": f"{error.error_count()} validation error for {error.title}",
            "detail": error.errors(include_context=False, include_input=False)}


def validation_error(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Upload.model_validate(data)
    return caught.value


def test_our_code_and_message_survive_pydantic_and_bentoml() -> None:
    code, detail = from_bentoml_validation(bentoml_body(validation_error({"images": [1, 2, 3]})),
                                           HOW)
    assert (code, detail) == ("image_too_large", "3 is over {the} limit of 2")
    assert STATUS[code] == 413


def test_a_missing_field_names_it_and_what_to_send() -> None:
    code, detail = from_bentoml_validation(bentoml_body(validation_error({})), HOW)
    assert code == "missing_input" and detail == f"images is required: send {HOW}"


def test_other_pydantic_errors_give_the_location() -> None:
    code, detail = from_bentoml_validation(bentoml_body(validation_error({"images": ["x"]})), HOW)
    assert code == "invalid_input" and detail.startswith("images[0]: ")


def test_invalid_json() -> None:
    with pytest.raises(ValidationError) as caught:
        Upload.model_validate_json("{")
    code, detail = from_bentoml_validation(bentoml_body(caught.value), HOW)
    assert code == "invalid_json" and "not valid JSON" in detail


def test_every_code_has_a_4xx_or_an_overload_status() -> None:
    assert all(400 <= status < 500 or status in (503, 504) for status in STATUS.values())
