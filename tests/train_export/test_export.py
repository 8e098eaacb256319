"""The store entry written by `python -m train_export`: checked graph, parity, complete card; and
the one export path every model takes (train_export.store.export_and_store), on a graph built by
hand."""

from __future__ import annotations

from pathlib import Path

import bentoml
import onnx
import pytest

from serving.contract import (
    CARD_FILE,
    ONNX_FILE,
    REFERENCE_FILE,
    TORCHSCRIPT_FILE,
    GraphSpec,
    ModelCard,
    sha256_of,
)
from tests.helpers import python


@pytest.mark.e2e
def test_onnx_graph_passes_the_checker_with_dynamic_batch_and_uint8_input(model_dir: Path) -> None:
    onnx.checker.check_model(str(model_dir / ONNX_FILE), full_check=True)
    graph = onnx.load(str(model_dir / ONNX_FILE)).graph
    (pixels,) = graph.input
    assert pixels.name == "pixels"
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    batch_dim = pixels.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch axis must be dynamic"
    assert [o.name for o in graph.output] == ["probabilities", "features"]


@pytest.mark.e2e
def test_parity_figures_are_recorded_and_within_tolerance(model_dir: Path) -> None:
    parity = ModelCard.read(model_dir).parity
    assert parity is not None and parity.tolerance == 1e-4 and parity.samples >= 300
    assert parity.onnxruntime_max_abs_diff <= 1e-4
    assert parity.torchscript_max_abs_diff <= 1e-4


@pytest.mark.e2e
def test_card_is_complete_and_files_match_their_hashes(trained_model: str, model_dir: Path) -> None:
    card = ModelCard.read(model_dir)
    assert card.labels == [str(d) for d in range(10)]
    assert card.input.shape == (28, 28, 1) and card.input.polarity == "light_on_dark"
    assert card.accuracy["holdout"] >= 0.97, f"held-out accuracy {card.accuracy['holdout']:.4f}"
    assert card.training is not None and card.training.seed == 0 and card.training.epochs > 0
    assert len(card.lineage.data_sha256) == 64
    assert {"torch", "onnxruntime", "bentoml"} <= set(card.lineage.versions)
    assert set(card.files) == {ONNX_FILE, TORCHSCRIPT_FILE, REFERENCE_FILE}
    for name, digest in card.files.items():
        assert sha256_of(model_dir / name) == digest, f"{name} does not match its card hash"
    stored = bentoml.models.get(trained_model)
    assert stored.info.labels["task"] == "image-classification"
    assert stored.info.metadata["accuracy_holdout"] == card.accuracy["holdout"]
    assert (model_dir / CARD_FILE).is_file()


@pytest.mark.e2e
def test_examples_are_written_with_their_true_label(trained_model: str,
                                                    examples_dir: Path) -> None:
    names = sorted(p.name for p in examples_dir.iterdir())
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)
    assert all(n.startswith("digit_") and n.split("_")[1].isdigit() for n in names)


@pytest.mark.e2e
def test_every_run_is_a_new_version_and_latest_follows(trained_model: str, tmp_path: Path) -> None:
    result = python("-m", "train_export", "--epochs", "1", "--examples-dir", "", timeout=300)
    assert result.returncode == 0, result.stderr
    newest = bentoml.models.get("digits-classifier:latest")
    assert str(newest.tag) != trained_model
    assert trained_model in {str(m.tag) for m in bentoml.models.list("digits-classifier")}
    # later tests serve `trained_model` by its exact tag or `latest`; keep `latest` pointing at it
    bentoml.models.delete(newest.tag)
    assert str(bentoml.models.get("digits-classifier:latest").tag) == trained_model


@pytest.mark.e2e
def test_cli_help_names_every_default() -> None:
    result = python("-m", "train_export", "--help")
    assert result.returncode == 0
    for fragment in ("--architecture", "(default: small_cnn)", "--epochs", "(default: 15)",
                     "--input-size", "(default: 28)", "--seed", "--name", "--output-name"):
        assert fragment in result.stdout, f"--help lacks {fragment!r}"


@pytest.mark.e2e
@pytest.mark.parametrize("architecture", ["no_such_net"])
def test_unknown_architecture_is_refused_with_the_choices(architecture: str) -> None:
    result = python("-m", "train_export", "--architecture", architecture)
    assert result.returncode != 0 and "resnet18" in result.stderr


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_reference_features_are_the_graph_features_of_training_images(model_dir: Path) -> None:
    import numpy as np

    card = ModelCard.read(model_dir)
    reference = np.load(model_dir / REFERENCE_FILE)
    assert card.drift_reference is not None
    assert reference.shape == (card.drift_reference.samples, card.graph.feature_dim) == (1000, 128)
    assert reference.dtype == np.float32 and np.isfinite(reference).all()
    assert "training split" in card.drift_reference.source


def test_the_card_records_every_training_setting() -> None:
    from dataclasses import fields

    from serving.contract import Training
    from train_export.config import TrainConfig

    assert set(Training.model_fields) == {f.name for f in fields(TrainConfig)} | {
        "train_seconds"}, "a TrainConfig setting the card's Training record does not hold"


def test_the_split_is_rebuilt_from_the_card() -> None:
    import numpy as np

    from serving.contract import InputSpec, Lineage
    from train_export.config import TrainConfig
    from train_export.data import DIGITS_DATASET, load_digits_split, split_from_card

    record = TrainConfig(seed=3, holdout_fraction=0.25).to_record(train_seconds=1.0)
    card = ModelCard(name="m", architecture="small_cnn", labels=[str(d) for d in range(10)],
                     input=InputSpec(height=16, width=16, channels=1, color_mode="L",
                                     mean=(0.5,), std=(0.5,)),
                     graph=GraphSpec(feature_dim=4), training=record,
                     lineage=Lineage(dataset=DIGITS_DATASET))
    split = split_from_card(card)
    expected = load_digits_split(16, 1, 0.25, 3)
    assert split is not None and split.labels == expected.labels
    assert np.array_equal(split.holdout_x, expected.holdout_x)
    assert np.array_equal(split.train_y, expected.train_y)
    imported = card.model_copy(update={"training": None, "lineage": Lineage(source="onnx")})
    assert split_from_card(imported) is None, "an import names no data to rebuild"


# The one export path (train_export.store.export_and_store), with a graph built by hand: it must
# serve any task, so this one's outputs are not a classifier's.

def tiny_graph(outputs: tuple[str, str], ir_version: int = 14):
    """uint8 pixels (N, 2, 2, 1) -> softmax over the 4 pixels, and the pixels as float."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["float"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["float"], [outputs[1]], axis=1),
         helper.make_node("Softmax", [outputs[1]], [outputs[0]], axis=1)],
        "tiny", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 2, 2, 1])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4]) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version  # onnx 1.23's own: ONNX Runtime 1.31 refuses it
    return model


def tiny_card(name: str) -> ModelCard:
    from serving.contract import InputSpec, Lineage

    return ModelCard(name=name, architecture="tiny", labels=["a", "b", "c", "d"],
                     input=InputSpec(height=2, width=2, channels=1, color_mode="L", mean=(0.5,),
                                     std=(0.5,)),
                     graph=GraphSpec(feature_dim=4), lineage=Lineage(source="a test"))


def test_one_export_path_stores_any_graph_checked_and_measured() -> None:
    import numpy as np
    import onnxruntime as ort

    from serving.contract import DriftReference, Parity
    from train_export.store import export_and_store

    measured = []

    def parity(exported) -> Parity:
        measured.append([f.name for f in exported.files])
        session = ort.InferenceSession(str(exported.graph), providers=["CPUExecutionProvider"])
        (boxes,) = session.run(["boxes"], {"pixels": np.zeros((3, 2, 2, 1), np.uint8)})
        return Parity(samples=3, tolerance=1e-4, onnxruntime_max_abs_diff=float(
            np.abs(boxes - 0.25).max()))

    def extra(directory: Path) -> list[Path]:
        (directory / "other.bin").write_bytes(b"another runtime's file")
        return [directory / "other.bin"]

    def reference(graph: Path, directory: Path) -> tuple[Path, DriftReference]:
        np.save(directory / REFERENCE_FILE, np.ones((2, 4), np.float32))
        return directory / REFERENCE_FILE, DriftReference(samples=2, source="a test")

    stored = export_and_store(tiny_graph(("boxes", "scores")), tiny_card("tiny-any-task"), parity,
                              {"task": "a-test"}, other_files=extra, reference=reference)

    assert measured == [[ONNX_FILE, "other.bin"]], "parity sees the graph and the other files"
    entry = Path(bentoml.models.get(stored.tag).path)
    assert ModelCard.read(entry) == stored.card
    assert stored.card.parity.onnxruntime_max_abs_diff == 0.0
    assert stored.card.drift_reference.source == "a test"
    assert set(stored.card.files) == {ONNX_FILE, "other.bin", REFERENCE_FILE}
    stored.card.verify(entry, stored.tag)
    assert onnx.load(str(entry / ONNX_FILE)).ir_version <= 13, "ORT 1.31 reads IR 13 at most"
    assert bentoml.models.get(stored.tag).info.labels == {"task": "a-test"}


def test_a_failed_parity_check_stores_nothing() -> None:
    from train_export.store import ParityError, export_and_store

    def parity(exported):
        raise ParityError("differs")

    with pytest.raises(ParityError):
        export_and_store(tiny_graph(("probabilities", "features")), tiny_card("tiny-failed"),
                         parity, {"task": "a-test"})
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.get("tiny-failed:latest")


def test_an_invalid_graph_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    from train_export.graph import save_onnx

    graph = tiny_graph(("probabilities", "features"))
    graph.graph.node[1].input[0] = "nowhere"  # an input no node produces
    with pytest.raises(onnx.checker.ValidationError):
        save_onnx(graph, tmp_path / ONNX_FILE)


@pytest.mark.parametrize("tolerance, fails", [(1e-2, False), (1e-4, True)])
def test_classifier_parity_holds_its_tolerance(tmp_path: Path, tolerance: float,
                                               fails: bool) -> None:
    import numpy as np

    from train_export.classification import ProbabilityParity
    from train_export.graph import save_onnx
    from train_export.store import Exported, ParityError

    pixels = np.random.default_rng(0).integers(0, 4, (5, 2, 2, 1), np.uint8)
    values = pixels.reshape(5, 4).astype(np.float32)
    softmax = np.exp(values) / np.exp(values).sum(axis=1, keepdims=True)
    check = ProbabilityParity(pixels, softmax + 1e-3, tolerance)  # the source differs by 1e-3
    exported = Exported(tuple(save_onnx(tiny_graph(("probabilities", "features")),
                                        tmp_path / ONNX_FILE)))
    if fails:
        with pytest.raises(ParityError, match="1.00e-03 > 1e-04"):
            check(exported)
    else:
        parity = check(exported)
        assert parity.onnxruntime_max_abs_diff == pytest.approx(1e-3, abs=1e-6)
        assert parity.torchscript_max_abs_diff is None, "no TorchScript was written"
        assert (parity.samples, parity.tolerance) == (5, tolerance)
