"""The Open Inference Protocol (KServe v2 / Triton HTTP) against a real `bentoml serve`, with the
real clients users call it with: `tritonclient[http]` and KServe's REST client, JSON and binary
tensors; for the classifier (the session's trained model) and the detector. Also `/health`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from PIL import Image
from tritonclient.utils import InferenceServerException

from serving.runtime import gpu_available
from tests.helpers import ROOT, RunningServer, metric_total
from train_export.detection.scenes import heldout_scenes

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "digit_7_00.png"
BINARY_HEADER = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2],
                                        "parameters": {"binary_data_size": 4}}]}).encode()


def digit_seven() -> np.ndarray:
    """The example upload's pixels as a user's code has them: (1, H, W), one channel."""
    return np.asarray(Image.open(EXAMPLE).convert("L"))[np.newaxis]


def name_and_version(tag: str) -> tuple[str, str]:
    name, _, version = tag.partition(":")
    return name, version


def triton_client(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def triton_input(pixels: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


# --- tritonclient --------------------------------------------------------------------------------

def test_tritonclient_health_and_metadata(server: RunningServer, trained_model: str) -> None:
    client = triton_client(server)
    name, version = name_and_version(trained_model)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, version)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["versions"] == [version]
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8",
                                   "shape": [-1, -1, -1, 1]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    assert client.get_model_metadata(name, version)["name"] == name


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_answers_seven(server: RunningServer, trained_model: str,
                                          binary: bool) -> None:
    name, _ = name_and_version(trained_model)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary),
               triton.InferRequestedOutput("label", binary_data=binary)]
    result = triton_client(server).infer(name, [triton_input(digit_seven(), binary)],
                                         outputs=outputs, request_id="seven")
    label = result.as_numpy("label")[0]
    assert (label.decode() if isinstance(label, bytes) else label) == "7"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 10) and probabilities.dtype == np.float32
    assert probabilities.argmax() == 7 and abs(float(probabilities.sum()) - 1) < 1e-4
    response = result.get_response()
    assert response["id"] == "seven" and response["model_version"] == trained_model.split(":")[1]
    # The same pixels uploaded as a PNG to /classify: the same preprocessing, the same answer.
    upload = httpx.post(f"{server.url}/classify", files={"images": EXAMPLE.open("rb")}).json()[0]
    assert abs(float(probabilities[0, 7]) - upload["confidence"]) < 1e-6


def test_tritonclient_many_images_of_any_size_and_channels(server: RunningServer,
                                                           trained_model: str) -> None:
    """A batch of three RGB images twice the example's size: each is preprocessed as an upload."""
    name, _ = name_and_version(trained_model)
    seven = Image.open(EXAMPLE).convert("RGB").resize((56, 56))
    pixels = np.stack([np.asarray(seven)] * 3)
    result = triton_client(server).infer(name, [triton_input(pixels, True)])
    assert [v.decode() for v in result.as_numpy("label")] == ["7", "7", "7"]
    assert result.as_numpy("probabilities").shape == (3, 10)


def test_tritonclient_versioned_route_and_unknown_models(server: RunningServer,
                                                         trained_model: str) -> None:
    client = triton_client(server)
    name, version = name_and_version(trained_model)
    result = client.infer(name, [triton_input(digit_seven(), True)], model_version=version)
    assert result.as_numpy("label")[0] == b"7"
    for model, model_version in (("no-such-model", ""), (name, "no-such-version")):
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [triton_input(digit_seven(), False)], model_version=model_version)
        assert error.value.status() == "404" and "unknown_model" in error.value.message()
    assert not client.is_model_ready("no-such-model")


@pytest.mark.parametrize(("tensor", "status", "code"), [
    ({"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 4}, 422,
     "invalid_tensor"),
    ({"name": "images", "datatype": "FP32", "shape": [1, 2, 2], "data": [0.0] * 4}, 422,
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0] * 3}, 422,
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0, 1, 2, 256]}, 422,
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 2], "data": [0] * 8}, 422,
     "invalid_tensor"),
    ({"name": "images", "datatype": "UINT8", "shape": [99, 2, 2], "data": [0] * 396}, 413,
     "too_many_images"),
    ({"name": "images", "datatype": "UINT8", "shape": [1, 100000, 100000]}, 413,
     "image_too_large"),
], ids=["wrong-name", "wrong-datatype", "wrong-size", "out-of-range", "two-channels",
        "too-many", "too-large"])
def test_a_wrong_tensor_is_a_4xx_with_the_protocol_error(server: RunningServer, trained_model: str,
                                                         tensor: dict[str, Any], status: int,
                                                         code: str) -> None:
    name, _ = name_and_version(trained_model)
    response = httpx.post(f"{server.url}/v2/models/{name}/infer", json={"inputs": [tensor]})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"].startswith(f"{code}: ") and body["detail"] in body["error"]


@pytest.mark.parametrize(("body", "headers"), [
    (b"not json", {"content-type": "application/json"}),
    (b'{"inputs": {}}', {"content-type": "application/json"}),
    (b"{}" + bytes(4), {"inference-header-content-length": "2"}),
    (b"{}", {"inference-header-content-length": "20"}),
    (b"{}", {"inference-header-content-length": "-1"}),
    (BINARY_HEADER + bytes(3),
     {"content-type": "application/octet-stream",
      "inference-header-content-length": str(len(BINARY_HEADER))}),
], ids=["not-json", "inputs-not-a-list", "binary-without-size", "header-length-too-long",
        "header-length-negative", "binary-too-short"])
def test_a_malformed_body_is_a_4xx(server: RunningServer, trained_model: str, body: bytes,
                                   headers: dict[str, str]) -> None:
    name, _ = name_and_version(trained_model)
    response = httpx.post(f"{server.url}/v2/models/{name}/infer", content=body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error", "detail"}


def test_protocol_requests_go_through_the_batcher_and_metrics(server: RunningServer,
                                                              trained_model: str) -> None:
    """One at a time, each request is a batch of its own: the batcher's, or the fast lane's
    when it finds the model idle (serving/fast_lane.py), counted the same way."""
    name, _ = name_and_version(trained_model)
    before = httpx.get(f"{server.url}/metrics").text
    client = triton_client(server)
    for _ in range(3):
        client.infer(name, [triton_input(digit_seven(), True)])
    after = httpx.get(f"{server.url}/metrics").text

    def counted(metric: str, **labels: str) -> float:
        return metric_total(after, metric, **labels) - metric_total(before, metric, **labels)

    assert counted("bentoml_service_adaptive_batch_size_count", method_name="infer") == 3
    answered = "image_classifier_predictions_total"
    assert metric_total(after, answered, label="7") - metric_total(before, answered, label="7") \
        >= 3


# --- KServe's client -----------------------------------------------------------------------------

async def kserve_round(url: str, name: str, binary: bool) -> tuple[bool, bool, bool, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        live = await client.is_server_live(url)
        ready = await client.is_server_ready(url)
        model_ready = await client.is_model_ready(url, name)
        tensor = InferInput("images", list(digit_seven().shape), "UINT8")
        tensor.set_data_from_numpy(digit_seven(), binary_data=binary)
        request = InferRequest(model_name=name, infer_inputs=[tensor], request_id="k",
                               parameters={"binary_data_output": True} if binary else None)
        return live, ready, model_ready, await client.infer(url, request, model_name=name)
    finally:
        await client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_client_answers_seven(server: RunningServer, trained_model: str,
                                     binary: bool) -> None:
    name, _ = name_and_version(trained_model)
    live, ready, model_ready, response = asyncio.run(kserve_round(server.url, name, binary))
    assert live and ready and model_ready
    outputs = {output.name: output.as_numpy() for output in response.outputs}
    label = outputs["label"][0]
    assert (label.decode() if isinstance(label, bytes) else label) == "7"
    assert outputs["probabilities"].argmax() == 7 and response.id == "k"


# --- /health (seed 002's clients) ----------------------------------------------------------------

def test_health_says_the_model_is_loaded(server: RunningServer, trained_model: str) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "model_loaded": True,
                               "gpu_available": gpu_available(), "model": trained_model}


def test_protocol_routes_refuse_other_methods_and_paths(server: RunningServer,
                                                        trained_model: str) -> None:
    name, _ = name_and_version(trained_model)
    for method, path, status in (("GET", f"/v2/models/{name}/infer", 405),
                                 ("POST", f"/v2/models/{name}", 405),
                                 ("DELETE", "/v2/health/ready", 405),
                                 ("GET", f"/v2/models/{name}/nothing", 404),
                                 ("GET", "/v2/repository/index", 404)):
        response = httpx.request(method, server.url + path)
        assert response.status_code == status, (method, path, response.text)
        assert set(response.json()) == {"error", "detail"}


# --- the detector ------------------------------------------------------------------------------

def test_detector_answers_as_on_detect(detector_server: RunningServer,
                                       trained_detector: str) -> None:
    """Scenes as tensors through tritonclient: padded to max_detections, boxes in the image's
    pixels, the same detections as /detect gives for the same pixels as a PNG."""
    name, _ = name_and_version(trained_detector)
    client = triton_client(detector_server)
    metadata = client.get_model_metadata(name)
    assert [o["name"] for o in metadata["outputs"]] == ["boxes", "scores", "labels",
                                                        "num_detections"]
    scene = heldout_scenes(1, seed=3)[0]
    pixels = np.asarray(scene.image)[np.newaxis]
    result = client.infer(name, [triton_input(pixels, True)], parameters={"max_detections": 12})
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    labels, count = result.as_numpy("labels"), int(result.as_numpy("num_detections")[0])
    assert boxes.shape == (1, 12, 4) and scores.shape == (1, 12) and labels.dtype == np.int64
    assert count > 0 and (labels[0, count:] == -1).all() and (scores[0, count:] == 0).all()
    png = json.loads(httpx.post(f"{detector_server.url}/detect",
                                files={"images": ("scene.png", encode_png(scene.image))}).text)
    served = png[0]["detections"]
    assert count == len(served)
    assert labels[0, :count].tolist() == [d["class_id"] for d in served]
    assert np.allclose(boxes[0, :count], [d["box"] for d in served], atol=0.01)


def encode_png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buffer, "PNG")
    return buffer.getvalue()
