"""`python -m train_export quantize`: fp16 and int8 variants of the trained default model, stored
as their own models with their accuracy against fp32, and served beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import httpx
import pytest

from serving.contract import ModelCard
from tests.helpers import ROOT, python, start_server, write_config

pytestmark = pytest.mark.e2e  # every test here runs the training CLI or a server


@pytest.fixture(scope="module")
def variants(trained_model: str) -> dict[str, dict]:
    result = python("-m", "train_export", "quantize", "--model", trained_model, timeout=600)
    assert result.returncode == 0, result.stderr
    reports = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    return {r["precision"]: r for r in reports}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_variant_keeps_the_accuracy_and_says_so_in_its_card(variants, trained_model,
                                                              precision) -> None:
    report = variants[precision]
    assert report["tag"].startswith(f"digits-classifier-{precision}:")
    card = ModelCard.read(Path(bentoml.models.get(report["tag"]).path))
    figures = card.lineage.vs_fp32
    assert card.lineage.precision == precision
    assert card.lineage.derived_from == trained_model
    assert figures.holdout_images == 360
    assert abs(figures.accuracy_delta) <= 0.02, figures
    assert figures.top1_agreement >= 0.97, figures
    assert figures.max_abs_diff > 0, "a different graph, not a copy of the fp32 one"
    assert card.accuracy["holdout"] == figures.accuracy
    assert (figures.calibration_images is not None) == (precision == "int8")
    assert report == {"tag": report["tag"], "precision": precision,
                      **figures.model_dump(), "seconds": report["seconds"]}, \
        "the printed figures are the card's"
    assert set(card.class_accuracy) == set(card.labels)


def test_the_int8_variant_serves_next_to_fp32(variants, trained_model, examples_dir,
                                              tmp_path) -> None:
    int8 = variants["int8"]["tag"]
    config = write_config(tmp_path / "ab.yaml", {"rollout": {"variants": [
        {"tag": trained_model, "weight": 1}, {"tag": int8, "weight": 1}]}}, workers=1)
    examples = sorted(examples_dir.glob("*.*"))
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        answers = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for key in ("a", "b", "c", "d", "e", "f", "g", "h"):
                for example in examples:
                    response = client.post("/classify", headers={"X-Client-ID": key},
                                           files=[("images", (example.name, example.read_bytes()))])
                    assert response.status_code == 200, response.text
                    answers.append((example, response.json()[0]))
    assert {a["model"] for _, a in answers} == {trained_model, int8}
    wrong = [(e.name, a["label"], a["model"]) for e, a in answers
             if a["label"] != e.name.split("_")[1]]
    assert len(wrong) <= len(answers) * 0.05, wrong


def test_a_model_without_its_data_needs_calibration_images(tmp_path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    from tests.train_export.test_imports import export_onnx_classifier

    model = tmp_path / "classifier.onnx"
    export_onnx_classifier(model, "dynamic")
    imported = python("-m", "train_export", "import-onnx", "--model", str(model), "--labels",
                      str(labels), "--name", "no-data", "--mean", "0.5", "0.5", "0.5", "--std",
                      "0.25", "0.25", "0.25")
    assert imported.returncode == 0, imported.stderr
    tag = json.loads(imported.stdout.strip().splitlines()[-1])["tag"]
    result = python("-m", "train_export", "quantize", "--model", tag, "--to", "int8")
    assert result.returncode != 0 and "pass --data DIR" in result.stderr, result.stderr
