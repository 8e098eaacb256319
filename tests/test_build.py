"""`bentoml build`: a torch-free bento that carries the model and serves from anywhere, for the
classifier (bentofile.yaml) and the detector (bentofile.detector.yaml), each with only its own
serving code and model; and a bad configuration stops startup with a message that says what to
fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import yaml

from tests.helpers import BIN, ROOT, bentoml_build, start_server

pytestmark = pytest.mark.e2e

# The serving package, every module of it, as the bentofiles' `serving/*.py` packs it.
SERVING_SOURCES = {p.relative_to(ROOT).as_posix() for p in (ROOT / "serving").glob("*.py")}


@pytest.fixture(scope="module")
def built_bento(trained_model: str) -> bentoml.Bento:
    return bentoml.get(bentoml_build(ROOT))


@pytest.fixture(scope="module")
def built_detector_bento(trained_detector: str, trained_model: str) -> bentoml.Bento:
    """The detector's bento, built while the store also holds a classifier (which it must not
    pack)."""
    return bentoml.get(bentoml_build(ROOT, "-f", "bentofile.detector.yaml"))


def requirements_of(bento: bentoml.Bento) -> set[str]:
    """The package names in the bento's env/python/requirements.txt, lower case."""
    lines = (Path(bento.path) / "env/python/requirements.txt").read_text().lower().splitlines()
    return {re.split(r"[=<>~\[ ;]", ln.strip())[0] for ln in lines
            if ln.strip() and not ln.startswith(("#", "-"))}


def sources_of(bento: bentoml.Bento) -> set[str]:
    """Every file under the bento's src/, relative to it."""
    src = Path(bento.path) / "src"
    return {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}


def assert_serving_requirements_only(bento: bentoml.Bento) -> None:
    packages = requirements_of(bento)
    # ONNX Runtime's CPU build (requirements/serving-cpu.txt): the GPU one is its own image.
    assert {"bentoml", "onnxruntime", "pillow"} <= packages
    assert "onnxruntime-gpu" not in packages, "both ONNX Runtime builds in one environment"
    leaked = packages & {"torch", "torchvision", "onnxscript", "onnx", "scikit-learn"}
    assert not leaked, f"training packages in the serving requirements: {leaked}"


def test_bento_carries_the_model_and_no_training_code(built_bento, trained_model) -> None:
    assert_serving_requirements_only(built_bento)
    sources = sources_of(built_bento)
    assert {"service.py", "classifier_service.py", "configuration.yaml",
            "serving/preprocess.py"} <= sources
    assert "detector_service.py" not in sources, "the detector's service in the classifier bento"
    assert not any(s.startswith(("train_export", "tests", "bench", "devtools")) for s in sources), \
        f"training, test or development code in the bento: {sorted(sources)}"
    packed = {str(m.tag) for m in built_bento.info.all_models}
    assert trained_model in packed


def test_both_bentos_containerize_with_the_slim_dockerfile(built_bento,
                                                           built_detector_bento) -> None:
    """Each bento keeps deploy/container/Dockerfile.template, which `bentoml containerize`
    renders (tests/test_container.py checks what it renders)."""
    for bento in (built_bento, built_detector_bento):
        docker = Path(bento.path) / "env" / "docker"
        assert (docker / "Dockerfile.template").read_text() == \
            (ROOT / "deploy" / "container" / "Dockerfile.template").read_text(), bento.tag
        assert "AS bento-venv" in (docker / "Dockerfile").read_text(), bento.tag


def test_detector_bento_carries_only_the_detector_and_its_serving_code(
        built_detector_bento, trained_detector) -> None:
    assert built_detector_bento.info.name == "object-detector"
    assert_serving_requirements_only(built_detector_bento)
    # bentofile.yaml: BentoML's copy of the build configuration (bentofile.detector.yaml).
    expected = {"service.py", "detector_service.py", "configuration.yaml", "bentofile.yaml",
                *SERVING_SOURCES}
    sources = sources_of(built_detector_bento)
    assert sources == expected, (f"unexpected: {sorted(sources - expected)}; "
                                 f"missing: {sorted(expected - sources)}")
    packed = {str(m.tag) for m in built_detector_bento.info.all_models}
    assert packed == {trained_detector}, "the detector bento packs the detector and nothing else"
    readme = (Path(built_detector_bento.path) / "README.md").read_text()
    assert readme.startswith("# object-detector"), "the bento's description: service-detector.md"


def test_built_detector_bento_serves_from_an_empty_directory(built_detector_bento,
                                                            trained_detector, tmp_path) -> None:
    """`bentoml serve object-detector:<version>` from an empty directory finds the digits of a
    held-out scene composed for the test."""
    from PIL import Image

    from serving.detection import box_iou
    from train_export.detection.scenes import heldout_scenes

    scene = next(s for s in heldout_scenes(16) if len(s.boxes) >= 3)
    upload = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(upload)
    empty = tmp_path / "empty"
    empty.mkdir()
    with start_server([str(built_detector_bento.tag)], cwd=empty, log_dir=tmp_path) as server:
        response = httpx.post(f"{server.url}/detect",
                              files=[("images", (upload.name, upload.read_bytes(), "image/png"))],
                              timeout=30)
    assert response.status_code == 200, response.text
    (result,) = response.json()
    assert result["model"] == trained_detector
    assert (result["width"], result["height"]) == (scene.width, scene.height)
    found = [any(d["class_id"] == c and box_iou(np.asarray(d["box"]), box) >= 0.5
                 for d in result["detections"])
             for box, c in zip(scene.boxes, scene.class_ids)]
    # The detector's mAP@0.5 is about 0.9: most, not necessarily all, digits of one scene.
    assert sum(found) * 2 >= len(found), (
        f"found {sum(found)} of the digits {scene.class_ids.tolist()}: {result['detections']}")


def test_built_bento_serves_from_an_empty_directory(built_bento, examples_dir, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    example = sorted(examples_dir.glob("*.jpg"))[0]
    with start_server([str(built_bento.tag)], cwd=empty, log_dir=tmp_path) as server:
        response = httpx.post(f"{server.url}/classify",
                              files=[("images", (example.name, example.read_bytes()))], timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] == example.name.split("_")[1]


def test_exported_bento_serves_in_a_clean_room(built_bento, examples_dir, tmp_path) -> None:
    """No source tree, no training code, no torch: a fresh venv with only the bento's own
    requirements (and our pins), an empty BentoML home, and an empty working directory."""
    archive = tmp_path / "image-classifier.bento"
    exported = subprocess.run([str(BIN / "bentoml"), "export", str(built_bento.tag), str(archive)],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    requirements = Path(built_bento.path) / "env" / "python" / "requirements.txt"
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-qq", "--disable-pip-version-check",
         "-c", str(ROOT / "requirements" / "constraints.txt"), "-r", str(requirements)],
        capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr
    home, empty = tmp_path / "home", tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "BENTOML_HOME": str(home)}
    imported = subprocess.run([str(venv / "bin" / "bentoml"), "import", str(archive)], env=env,
                              cwd=empty, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], env=env,
                              cwd=empty, capture_output=True, text=True)
    assert "No module named 'torch'" in no_torch.stderr
    example = sorted(examples_dir.glob("*.png"))[0]
    with start_server([str(built_bento.tag)], cwd=empty, log_dir=tmp_path, env=env,
                      bentoml=venv / "bin" / "bentoml", home=home) as server:
        response = httpx.post(f"{server.url}/classify",
                              files=[("images", (example.name, example.read_bytes()))], timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] == example.name.split("_")[1]


@pytest.mark.parametrize("service, section, bad, key, allowed", [
    ("ImageClassifier", "image_classifier", {"model": {"providers": ["gpu"]}},
     "services.ImageClassifier.image_classifier.model.providers.0",
     "'tensorrt', 'cuda' or 'cpu' (got 'gpu')"),
    ("ObjectDetector", "object_detector", {"detection": {"iou_treshold": 0.4}},
     "services.ObjectDetector.object_detector.detection.iou_treshold",
     "Extra inputs are not permitted"),
], ids=["classifier-bad-value", "detector-misspelt-key"])
def test_invalid_configuration_stops_startup_with_one_message_and_no_traceback(
        service: str, section: str, bad: dict, key: str, allowed: str, tmp_path) -> None:
    """`bentoml serve` with a wrong value in $BENTOML_CONFIG: exit 1 and one message that names
    the key and what is allowed, no Python traceback. (The file is read before the model store,
    so no trained model is needed.)"""
    document = yaml.safe_load((ROOT / "configuration.yaml").read_text())
    document["services"].setdefault(service, {}).setdefault(section, {}).update(bad)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(document))
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    result = subprocess.run(
        [str(BIN / "bentoml"), "serve", f"service:{service}", "--host", "127.0.0.1",
         "--port", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, f"a traceback above the message:\n{output}"
    problem = next((line for line in result.stderr.splitlines() if key in line), "")
    assert allowed in problem, f"no line names {key} and {allowed}:\n{output}"
    assert result.stderr.startswith(f"Error: [serve] `serve` failed: invalid settings in {config}")


def test_a_damaged_store_entry_stops_startup_and_names_the_file(trained_model, bentoml_home,
                                                                tmp_path) -> None:
    """A copy of the store whose graph lost bytes: `bentoml serve` refuses to start."""
    home = tmp_path / "home"
    shutil.copytree(bentoml_home / "models", home / "models")
    name, version = trained_model.split(":")
    graph = home / "models" / name / version / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    env = {**os.environ, "BENTOML_HOME": str(home)}
    result = subprocess.run(
        [str(BIN / "bentoml"), "serve", "service:ImageClassifier", "--host", "127.0.0.1",
         "--port", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"{graph} does not match the SHA-256" in result.stderr
    assert "Re-export the model" in result.stderr
