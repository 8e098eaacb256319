"""The store entry written by `python -m train_export`: checked graph, parity, complete card."""

from __future__ import annotations

from pathlib import Path

import bentoml
import onnx
import pytest

from serving.contract import (CARD_FILE, ONNX_FILE, REFERENCE_FILE, TORCHSCRIPT_FILE, ModelCard,
                              sha256_of)
from tests.helpers import python


def test_onnx_graph_passes_the_checker_with_dynamic_batch_and_uint8_input(model_dir: Path) -> None:
    onnx.checker.check_model(str(model_dir / ONNX_FILE), full_check=True)
    graph = onnx.load(str(model_dir / ONNX_FILE)).graph
    (pixels,) = graph.input
    assert pixels.name == "pixels"
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    batch_dim = pixels.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch axis must be dynamic"
    assert [o.name for o in graph.output] == ["probabilities", "features"]


def test_parity_figures_are_recorded_and_within_tolerance(model_dir: Path) -> None:
    parity = ModelCard.read(model_dir).parity
    assert parity is not None and parity.tolerance == 1e-4 and parity.samples >= 300
    assert parity.onnxruntime_max_abs_diff <= 1e-4
    assert parity.torchscript_max_abs_diff <= 1e-4


def test_card_is_complete_and_files_match_their_hashes(trained_model: str, model_dir: Path) -> None:
    card = ModelCard.read(model_dir)
    assert card.labels == [str(d) for d in range(10)]
    assert card.input.shape == (28, 28, 1) and card.input.polarity == "light_on_dark"
    assert card.accuracy["holdout"] >= 0.97, f"held-out accuracy {card.accuracy['holdout']:.4f}"
    assert card.training["seed"] == 0 and card.training["epochs"] > 0
    assert len(card.lineage["data_sha256"]) == 64
    assert {"torch", "onnxruntime", "bentoml"} <= set(card.lineage["versions"])
    assert set(card.files) == {ONNX_FILE, TORCHSCRIPT_FILE, REFERENCE_FILE}
    for name, digest in card.files.items():
        assert sha256_of(model_dir / name) == digest, f"{name} does not match its card hash"
    stored = bentoml.models.get(trained_model)
    assert stored.info.labels["task"] == "image-classification"
    assert stored.info.metadata["accuracy_holdout"] == card.accuracy["holdout"]
    assert (model_dir / CARD_FILE).is_file()


def test_examples_are_written_with_their_true_label(examples_dir: Path) -> None:
    names = sorted(p.name for p in examples_dir.iterdir())
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)
    assert all(n.startswith("digit_") and n.split("_")[1].isdigit() for n in names)


def test_every_run_is_a_new_version_and_latest_follows(trained_model: str, tmp_path: Path) -> None:
    result = python("-m", "train_export", "--epochs", "1", "--examples-dir", "", timeout=300)
    assert result.returncode == 0, result.stderr
    newest = bentoml.models.get("digits-classifier:latest")
    assert str(newest.tag) != trained_model
    assert trained_model in {str(m.tag) for m in bentoml.models.list("digits-classifier")}
    # later tests serve `trained_model` by its exact tag or `latest`; keep `latest` pointing at it
    bentoml.models.delete(newest.tag)
    assert str(bentoml.models.get("digits-classifier:latest").tag) == trained_model


def test_cli_help_names_every_default() -> None:
    result = python("-m", "train_export", "--help")
    assert result.returncode == 0
    for fragment in ("--architecture", "(default: small_cnn)", "--epochs", "(default: 15)",
                     "--input-size", "(default: 28)", "--seed", "--name", "--output-name"):
        assert fragment in result.stdout, f"--help lacks {fragment!r}"


@pytest.mark.parametrize("architecture", ["no_such_net"])
def test_unknown_architecture_is_refused_with_the_choices(architecture: str) -> None:
    result = python("-m", "train_export", "--architecture", architecture)
    assert result.returncode != 0 and "resnet18" in result.stderr


def test_a_torchvision_architecture_exports_and_runs_in_onnxruntime(trained_model: str) -> None:
    """Any torchvision classifier goes through the same export: RGB input, features, parity."""
    import numpy as np

    from serving.runtime import OnnxRuntime

    result = python("-m", "train_export", "--architecture", "mobilenet_v3_small",
                    "--input-size", "32", "--epochs", "0", "--name", "tv-mobilenet",
                    "--examples-dir", "", timeout=300)
    assert result.returncode == 0, result.stderr
    entry = Path(bentoml.models.get("tv-mobilenet:latest").path)
    card = ModelCard.read(entry)
    assert card.architecture == "mobilenet_v3_small"
    assert card.input.shape == (32, 32, 3) and card.input.color_mode == "RGB"
    assert card.parity.onnxruntime_max_abs_diff <= 1e-4
    runtime = OnnxRuntime(entry / ONNX_FILE, card.input, card.graph, providers=["cpu"])
    probabilities, features = runtime.run(np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert probabilities.shape == (3, 10) and features.shape == (3, card.graph.feature_dim)


def test_reference_features_are_the_graph_features_of_training_images(model_dir: Path) -> None:
    import numpy as np

    card = ModelCard.read(model_dir)
    reference = np.load(model_dir / REFERENCE_FILE)
    assert card.drift_reference is not None
    assert reference.shape == (card.drift_reference.samples, card.graph.feature_dim) == (1000, 128)
    assert reference.dtype == np.float32 and np.isfinite(reference).all()
    assert "training split" in card.drift_reference.source
