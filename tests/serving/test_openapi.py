"""serving.openapi: with an API key, the spec declares an HTTP bearer scheme on every operation
outside security.public_paths (the Swagger UI then shows "Authorize")."""

from __future__ import annotations

import json

import yaml
from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification

from serving.openapi import BEARER, bearer_secured, with_bearer_scheme

PUBLIC = ["/livez", "/", "/static_content/"]


def spec_dict() -> dict:
    return {"paths": {"/livez": {"get": {"responses": {}}},
                      "/static_content/x.js": {"get": {"responses": {}}},
                      "/classify": {"post": {"responses": {}}},
                      "/classify_batch/status": {"get": {"responses": {}}}}}


def test_every_operation_but_the_public_ones_needs_the_bearer_key() -> None:
    spec = with_bearer_scheme(spec_dict(), PUBLIC)
    scheme = spec["components"]["securitySchemes"][BEARER]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    secured = {path for path, item in spec["paths"].items()
               if all(op.get("security") == [{BEARER: []}] for op in item.values())}
    assert secured == {"/classify", "/classify_batch/status"}


def test_the_secured_spec_is_written_with_the_scheme_as_json_and_as_yaml() -> None:
    """/docs.json (asdict) and a bento's openapi.yaml (PyYAML) both carry it."""
    spec = bearer_secured(PUBLIC)(openapi="3.0.2", info=Info(title="t", version="1"),
                                  paths={}, servers=[])
    assert isinstance(spec, OpenAPISpecification)
    assert BEARER in spec.asdict()["components"]["securitySchemes"]
    assert BEARER in yaml.safe_load(yaml.dump(spec))["components"]["securitySchemes"]


def test_the_protocol_route_is_described_as_the_protocol_once() -> None:
    """BentoML keys responses by int: the protocol's 200 replaces it, so that the JSON has one
    "200" (a duplicate key breaks the Swagger UI's parser)."""
    from serving.inference_protocol import ProtocolModel, TensorSpec
    from serving.openapi import with_protocol_schemas

    model = ProtocolModel.of("digits:v1", 1, [TensorSpec("label", "BYTES", (-1,))], 4, 100)
    spec = {"paths": {model.infer_route: {"post": {
        "requestBody": {}, "responses": {200: {"description": "batch"}, 400: {}}}}}}
    written = json.dumps(with_protocol_schemas(spec, model))
    pairs: list[list[str]] = []
    json.loads(written, object_pairs_hook=lambda p: pairs.append([k for k, _ in p]) or dict(p))
    assert all(len(keys) == len(set(keys)) for keys in pairs), "a duplicate key"
    responses = json.loads(written)["paths"][model.infer_route]["post"]["responses"]
    assert set(responses) == {"200", "400"}
    assert "outputs" in responses["200"]["content"]["application/json"]["schema"]["properties"]
