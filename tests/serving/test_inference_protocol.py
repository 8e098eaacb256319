"""serving/inference_protocol.py without a server: the protocol's bodies, read and written (the
binary ones checked with tritonclient's own decoder), and the routes' answers over a fake app."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor

from serving.errors import RejectedInput
from serving.inference_protocol import (
    InferRequest,
    ProtocolModel,
    ProtocolPaths,
    ProtocolRoutes,
    TensorSpec,
    infer_response,
    read_infer_request,
)
from serving.runtime import gpu_available
from tests.helpers import http_scope, run_asgi

MODEL = ProtocolModel.of(
    "digits:v1", 1, [TensorSpec("probabilities", "FP32", (-1, 3)),
                     TensorSpec("label", "BYTES", (-1,))], max_images=4, max_pixels=10_000)


def request_body(tensor: dict[str, Any], binary: bytes = b"", **document: Any
                 ) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [tensor], **document}).encode()
    return header + binary, str(len(header)) if binary else ""


def test_json_data_flat_or_nested() -> None:
    for data in ([0, 255, 10, 20], [[[0, 255], [10, 20]]]):
        body, length = request_body({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2],
                                     "data": data})
        request = read_infer_request(body, length, MODEL)
        assert len(request.images) == 1
        assert np.asarray(request.images[0]).tolist() == [[0, 255], [10, 20]]


def test_binary_data_and_channels() -> None:
    pixels = np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)
    body, length = request_body({"name": "images", "datatype": "UINT8", "shape": [2, 3, 2, 3],
                                 "parameters": {"binary_data_size": pixels.size}},
                                pixels.tobytes(), id="r1", parameters={"x": 1})
    request = read_infer_request(body, length, MODEL)
    assert [image.mode for image in request.images] == ["RGB", "RGB"]
    assert np.array_equal(np.asarray(request.images[1]), pixels[1])
    assert request.id == "r1" and request.parameters == {"x": 1}


@pytest.mark.parametrize(("tensor", "binary", "code"), [
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1.5, 0, 0, 0]}, b"",
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [[0, 0], [0]]}, b"",
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 0, 2], "data": []}, b"",
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, True], "data": [0, 0]}, b"",
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": "0000"}, b"",
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [5, 2, 2]}, b"", "too_many_images"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 200, 200]}, b"", "image_too_large"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2],
      "parameters": {"binary_data_size": 4}}, bytes(5), "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 4}, bytes(1),
     "invalid_json"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 4,
      "parameters": []}, b"", "invalid_json"),
], ids=["float", "ragged", "zero-dim", "bool-dim", "string-data", "too-many", "too-large",
        "binary-size-mismatch", "binary-undeclared", "parameters-not-object"])
def test_malformed_tensors_are_refused_with_their_code(tensor: dict[str, Any], binary: bytes,
                                                       code: str) -> None:
    body, length = request_body(tensor, binary)
    with pytest.raises(RejectedInput) as refused:
        read_infer_request(body, length, MODEL)
    assert refused.value.code == code


def test_unknown_outputs_are_refused() -> None:
    body, _ = request_body({"name": "images", "datatype": "UINT8", "shape": [1, 1, 1],
                            "data": [0]}, outputs=[{"name": "logits"}])
    with pytest.raises(RejectedInput, match="no output 'logits'"):
        read_infer_request(body, "", MODEL)


ROWS = [{"probabilities": np.array([0.1, 0.7, 0.2], np.float32), "label": "1",
         "model": "digits:v1"},
        {"probabilities": np.array([0.5, 0.25, 0.25], np.float32), "label": "zéro",
         "model": "digits:v1"}]


def test_json_response() -> None:
    body, headers = infer_response(InferRequest(images=[], id="a"), MODEL, ROWS)
    assert headers == {"content-type": "application/json"}
    document = json.loads(body)
    assert document["id"] == "a" and document["model_version"] == "v1"
    probabilities, label = document["outputs"]
    assert probabilities["shape"] == [2, 3] and probabilities["data"][1] == pytest.approx(0.7)
    assert label == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["1", "zéro"]}


def test_binary_response_decodes_with_tritonclient() -> None:
    request = InferRequest(images=[], outputs={"label": True, "probabilities": None},
                           binary_output=False)
    body, headers = infer_response(request, MODEL, ROWS)
    size = int(headers["inference-header-content-length"])
    document = json.loads(body[:size])
    probabilities, label = document["outputs"]
    assert "data" in probabilities and label["parameters"]["binary_data_size"] == len(body) - size
    decoded = deserialize_bytes_tensor(body[size:])
    assert [v.decode() for v in decoded] == ["1", "zéro"]
    assert body[size:size + 4] == struct.pack("<I", 1)


def test_binary_output_for_every_output() -> None:
    body, headers = infer_response(InferRequest(images=[], binary_output=True), MODEL, ROWS)
    size = int(headers["inference-header-content-length"])
    blob = body[size:size + 24]
    assert np.frombuffer(blob, np.float32).reshape(2, 3)[0, 1] == pytest.approx(0.7)


# --- the routes, over a fake app that answers /readyz -------------------------------------------

def fake_app(ready: bool):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        status = 200 if (scope["path"] != "/readyz" or ready) else 503
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})
    return app


def routes(ready: bool = True) -> ProtocolRoutes:
    return ProtocolRoutes(fake_app(ready), models=[MODEL], service_name="Digits")


def test_health_before_the_model_is_ready() -> None:
    answer = run_asgi(routes(ready=False), http_scope("/health", "GET"))
    assert answer.status == 503
    assert answer.json() == {"status": "unavailable", "model_loaded": False,
                             "gpu_available": gpu_available(), "model": "digits:v1"}
    assert run_asgi(routes(ready=False), http_scope("/v2/health/ready", "GET")).status == 503
    assert run_asgi(routes(ready=False), http_scope("/v2/health/live", "GET")).json() == \
        {"live": True}
    ready = run_asgi(routes(), http_scope("/v2/models/digits/versions/v1/ready", "GET"))
    assert ready.json() == {"name": "digits", "ready": True}


def test_metadata_and_refusals() -> None:
    metadata = run_asgi(routes(), http_scope("/v2/models/digits", "GET")).json()
    assert metadata["inputs"][0] == {"name": "images", "datatype": "UINT8",
                                     "shape": [-1, -1, -1, 1]}
    for path, method, status in (("/v2/models/other", "GET", 404),
                                 ("/v2/models/digits/versions/v2", "GET", 404),
                                 ("/v2/models/digits", "POST", 405),
                                 ("/v2/anything", "GET", 404)):
        answer = run_asgi(routes(), http_scope(path, method))
        assert answer.status == status and set(answer.json()) == {"error", "detail"}, path


def test_other_paths_and_the_infer_route_pass_through() -> None:
    for path in ("/classify", MODEL.infer_route):
        assert run_asgi(routes(), http_scope(path, "POST")).body == b"inner"


def test_versioned_infer_path_and_error_shape() -> None:
    seen: list[str] = []

    async def refusing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        body = json.dumps({"error": "invalid_tensor", "detail": "send UINT8"}).encode()
        await send({"type": "http.response.start", "status": 422,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    answer = run_asgi(ProtocolPaths(refusing, models=[MODEL]),
                      http_scope("/v2/models/digits/versions/v1/infer"))
    assert seen == [MODEL.infer_route]
    assert answer.json() == {"error": "invalid_tensor: send UINT8", "detail": "send UINT8"}
    assert int(answer.headers["content-length"]) == len(answer.body)
    run_asgi(ProtocolPaths(refusing, models=[MODEL]),
             http_scope("/v2/models/digits/versions/v9/infer"))
    assert seen[-1] == "/v2/models/digits/versions/v9/infer"  # answered 404 further in
