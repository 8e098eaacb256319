"""Many models in one deployment (`service:ModelServer`), against a real `bentoml serve`: the
session's digits classifier, a 64x64 RGB classifier with three labels of its own (an imported
torchvision mobilenet_v3_small with random weights) and the session's detector, served together;
each answers with its own labels, under its own limits, metrics and drift; and the bento built
with bentofile.models.yaml serves both shipped models from an empty directory."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from PIL import Image

from tests.helpers import (
    ROOT,
    RunningServer,
    bentoml_build,
    metric_total,
    python,
    start_server,
)

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "digit_7_00.png"
SCENE = ROOT / "examples" / "scene_example.png"
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def shapes_model(trained_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second classifier with other labels and another input size, imported as a user does."""
    directory = tmp_path_factory.mktemp("shapes")
    checkpoint = directory / "shapes.pth"
    result = python("-c", textwrap.dedent(f"""
        import torch, torchvision
        torch.manual_seed(0)
        model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3)
        torch.save(model.state_dict(), {str(checkpoint)!r})
    """))
    assert result.returncode == 0, result.stderr
    (directory / "labels.txt").write_text("\n".join(SHAPES) + "\n")
    (directory / "spec.yaml").write_text("input_size: [64, 64]\ncolor_mode: RGB\n"
                                         "mean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\n")
    result = python("-m", "train_export", "import-torchvision", "--architecture",
                    "mobilenet_v3_small", "--checkpoint", str(checkpoint), "--labels",
                    str(directory / "labels.txt"), "--spec", str(directory / "spec.yaml"),
                    "--name", "shapes-classifier", timeout=600)
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout.strip().splitlines()[-1])["tag"])


@pytest.fixture(scope="module")
def models_server(trained_model: str, trained_detector: str, shapes_model: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("model-server")
    config = directory / "models.yaml"
    config.write_text(yaml.safe_dump({"services": {"ModelServer": {
        "workers": 2, "metrics": {"enabled": True},
        "model_server": {"default_model": "digits", "models": [
            {"name": "digits", "task": "classification", "model": {"tag": trained_model}},
            {"name": "shapes", "task": "classification", "model": {"tag": shapes_model},
             "limits": {"max_images_per_request": 2}, "response": {"top_k": 2}},
            {"name": "scenes", "task": "detection", "model": {"tag": trained_detector}},
        ]}}}}))
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    with start_server(["service:ModelServer"], cwd=ROOT, log_dir=directory, env=env) as server:
        yield server


def upload(url: str, path: Path, count: int = 1) -> httpx.Response:
    files = [("images", (path.name, path.read_bytes(), "image/png"))] * count
    return httpx.post(url, files=files, timeout=60)


def test_each_model_answers_with_its_own_labels(models_server: RunningServer) -> None:
    url = models_server.url
    digits = upload(f"{url}/models/digits/classify", EXAMPLE).json()[0]
    assert digits["label"] == "7" and len(digits["top_k"]) == 3
    shapes = upload(f"{url}/models/shapes/classify", EXAMPLE).json()[0]
    assert shapes["label"] in SHAPES and len(shapes["top_k"]) == 2
    assert shapes["model"].startswith("shapes-classifier:")
    scenes = upload(f"{url}/models/scenes/detect", SCENE).json()[0]
    assert {d["label"] for d in scenes["detections"]} <= set("0123456789")
    assert scenes["detections"]


def test_routes_without_a_model_go_to_the_default(models_server: RunningServer,
                                                   trained_model: str,
                                                   trained_detector: str) -> None:
    """Today's clients keep working: /classify is the default model's, /detect the detector's."""
    answer = upload(f"{models_server.url}/classify", EXAMPLE).json()[0]
    assert answer["label"] == "7" and answer["model"] == trained_model
    detected = upload(f"{models_server.url}/detect", SCENE).json()[0]
    assert detected["model"] == trained_detector
    pixels = np.zeros((1, 28, 28), dtype=int).tolist()
    tensor = httpx.post(f"{models_server.url}/classify_tensor", json={"pixels": pixels})
    assert tensor.status_code == 200 and tensor.json()[0]["model"] == trained_model


def test_model_info_lists_every_model(models_server: RunningServer, shapes_model: str) -> None:
    info = httpx.post(f"{models_server.url}/model_info", json={}).json()
    assert info["default_model"] == "digits"
    models = info["models"]
    assert set(models) == {"digits", "shapes", "scenes"}
    assert models["shapes"]["labels"] == SHAPES and models["shapes"]["tag"] == shapes_model
    assert models["shapes"]["input"]["height"] == 64 and models["digits"]["input"]["height"] == 28
    assert models["scenes"]["task"] == "detection" and "detection" in models["scenes"]
    one = httpx.post(f"{models_server.url}/models/shapes/model_info", json={}).json()
    assert one["tag"] == shapes_model and one["top_k"] == 2


def test_each_model_keeps_its_own_limits(models_server: RunningServer) -> None:
    refused = upload(f"{models_server.url}/models/shapes/classify", EXAMPLE, count=3)
    assert refused.status_code == 413, refused.text
    assert "over the limit of 2" in refused.json()["detail"]
    assert upload(f"{models_server.url}/models/digits/classify", EXAMPLE, count=3).status_code \
        == 200


def test_each_model_keeps_its_own_metrics_and_drift(models_server: RunningServer,
                                                    shapes_model: str,
                                                    trained_model: str) -> None:
    before = httpx.get(f"{models_server.url}/metrics").text
    for _ in range(4):
        assert upload(f"{models_server.url}/models/shapes/classify", EXAMPLE).status_code == 200
    after = httpx.get(f"{models_server.url}/metrics").text
    name = "image_classifier_predictions_total"
    assert metric_total(after, name, model=shapes_model) - \
        metric_total(before, name, model=shapes_model) == 4
    assert metric_total(after, name, model=trained_model) == \
        metric_total(before, name, model=trained_model)
    drift = httpx.post(f"{models_server.url}/models/digits/drift", json={}).json()
    assert {m["model"] for m in drift["models"]} <= {trained_model}
    shapes_drift = httpx.post(f"{models_server.url}/models/shapes/drift", json={}).json()
    assert trained_model not in {m["model"] for m in shapes_drift["models"]}


def test_the_protocol_addresses_models_by_name(models_server: RunningServer) -> None:
    client = triton.InferenceServerClient(models_server.url.removeprefix("http://"))
    metadata = client.get_model_metadata("shapes")
    assert metadata["inputs"][0]["shape"] == [-1, -1, -1, 3]
    assert metadata["outputs"][0] == {"name": "probabilities", "datatype": "FP32",
                                      "shape": [-1, 3]}
    pixels = np.asarray(Image.open(EXAMPLE).convert("RGB"))[np.newaxis]
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    assert client.infer("shapes", [tensor]).as_numpy("label")[0].decode() in SHAPES
    assert client.infer("digits", [tensor]).as_numpy("label")[0] == b"7"
    assert client.infer("scenes", [tensor]).as_numpy("num_detections").shape == (1,)
    assert client.is_model_ready("scenes") and not client.is_model_ready("nothing")


def test_an_unknown_model_is_a_404_that_lists_them(models_server: RunningServer) -> None:
    response = upload(f"{models_server.url}/models/nothing/classify", EXAMPLE)
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_model"
    assert "digits, shapes, scenes" in response.json()["detail"]


def test_the_models_bento_serves_from_an_empty_directory(trained_model: str,
                                                         trained_detector: str,
                                                         tmp_path: Path) -> None:
    """`bentoml build -f bentofile.models.yaml` packs both shipped models; served from an empty
    directory, each answers."""
    import bentoml

    bento = bentoml.get(bentoml_build(ROOT, "-f", "bentofile.models.yaml"))
    packed = {str(model.tag).split(":")[0] for model in bento.info.all_models}
    assert {trained_model.split(":")[0], trained_detector.split(":")[0]} <= packed
    empty = tmp_path / "empty"
    empty.mkdir()
    with start_server([str(bento.tag)], cwd=empty, log_dir=tmp_path) as server:
        assert upload(f"{server.url}/models/digits/classify", EXAMPLE).json()[0]["label"] == "7"
        assert upload(f"{server.url}/models/scenes/detect", SCENE).json()[0]["detections"]
