"""`bentoml build`: a torch-free bento that carries the model and serves from anywhere; and a bad
configuration stops startup with a message that says what to fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import pytest
import yaml

from tests.helpers import BIN, ROOT, bentoml_build, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built_bento(trained_model: str) -> bentoml.Bento:
    return bentoml.get(bentoml_build(ROOT))


def test_bento_carries_the_model_and_no_training_code(built_bento, trained_model) -> None:
    bento_dir = Path(built_bento.path)
    lines = (bento_dir / "env/python/requirements.txt").read_text().lower().splitlines()
    packages = {re.split(r"[=<>~\[ ;]", ln.strip())[0] for ln in lines
                if ln.strip() and not ln.startswith(("#", "-"))}
    assert {"bentoml", "onnxruntime-gpu", "pillow"} <= packages
    leaked = packages & {"torch", "torchvision", "onnxscript", "onnx", "scikit-learn"}
    assert not leaked, f"training packages in the serving requirements: {leaked}"
    sources = {p.relative_to(bento_dir / "src").as_posix() for p in (bento_dir / "src").rglob("*")
               if p.is_file()}
    assert {"service.py", "configuration.yaml", "serving/preprocess.py"} <= sources
    assert not any(s.startswith(("train_export", "tests", "bench", "devtools")) for s in sources), \
        f"training, test or development code in the bento: {sorted(sources)}"
    packed = {str(m.tag) for m in built_bento.info.all_models}
    assert trained_model in packed


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


def test_invalid_configuration_stops_startup_and_names_the_key(trained_model, tmp_path) -> None:
    document = yaml.safe_load((ROOT / "configuration.yaml").read_text())
    document["services"]["ImageClassifier"]["image_classifier"]["model"]["providers"] = ["gpu"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    env = {**os.environ, "BENTOML_CONFIG": str(bad)}
    result = subprocess.run(
        [str(BIN / "bentoml"), "serve", "service:ImageClassifier", "--host", "127.0.0.1",
         "--port", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "services.ImageClassifier.image_classifier.model.providers.0" in result.stderr
    assert "'tensorrt', 'cuda' or 'cpu'" in result.stderr


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
