"""ModelCard: round trip, verification of a store entry against its card, and the typed lineage
(unset fields left out, unknown keys refused, old cards still read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.contract import (
    CARD_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    DamagedModel,
    GraphSpec,
    InputSpec,
    Lineage,
    ModelCard,
    sha256_of,
)


@pytest.fixture
def entry(tmp_path: Path) -> tuple[Path, ModelCard]:
    (tmp_path / ONNX_FILE).write_bytes(b"graph")
    (tmp_path / TORCHSCRIPT_FILE).write_bytes(b"script")
    card = ModelCard(
        name="m", architecture="small_cnn", labels=["a", "b"],
        input=InputSpec(height=8, width=8, channels=1, color_mode="L", mean=(0.5,), std=(0.5,)),
        graph=GraphSpec(feature_dim=4),
        files={n: sha256_of(tmp_path / n) for n in (ONNX_FILE, TORCHSCRIPT_FILE)},
    )
    card.write(tmp_path)
    return tmp_path, card


def test_card_round_trips(entry) -> None:
    directory, card = entry
    assert ModelCard.read(directory) == card


def test_a_healthy_entry_verifies(entry) -> None:
    directory, card = entry
    card.verify(directory, "m:v1")


def test_a_changed_graph_names_the_file_and_the_fix(entry) -> None:
    directory, card = entry
    (directory / ONNX_FILE).write_bytes(b"graph, damaged")
    with pytest.raises(DamagedModel, match=rf"{ONNX_FILE} does not match the SHA-256.*Re-export"):
        card.verify(directory, "m:v1")


def test_a_missing_file_names_the_file(entry) -> None:
    directory, card = entry
    (directory / TORCHSCRIPT_FILE).unlink()
    with pytest.raises(DamagedModel, match=rf"{TORCHSCRIPT_FILE} is missing"):
        card.verify(directory, "m:v1")


def test_a_card_from_elsewhere_says_how_to_export(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m train_export"):
        ModelCard.read(tmp_path)


# What the old, untyped card of an `import-onnx` model held (train_export before Lineage existed).
OLD_ONNX_LINEAGE = {
    "source": "onnx", "file": "classifier.onnx", "file_sha256": "0" * 64,
    "original_input": "input", "original_outputs": ["logits"], "scores_output": "logits",
    "scores_were": "logits", "features_output": "logits", "producer": "pytorch 2.14.1",
    "parity_data": "64 random images", "versions": {"onnx": "1.23.2"},
}


def test_lineage_leaves_out_what_a_path_did_not_record() -> None:
    lineage = Lineage(source="onnx", file="m.onnx")
    assert lineage.model_dump() == {"source": "onnx", "file": "m.onnx"}
    assert json.loads(lineage.model_dump_json()) == {"source": "onnx", "file": "m.onnx"}


def test_lineage_refuses_a_key_it_does_not_know() -> None:
    with pytest.raises(ValidationError, match="datset"):
        Lineage(datset="sklearn.datasets.load_digits")


def test_a_card_written_before_lineage_was_typed_still_reads(entry) -> None:
    directory, card = entry
    old = json.loads(card.model_dump_json())
    old.update(training={}, lineage=OLD_ONNX_LINEAGE)  # how imports were written then
    (directory / CARD_FILE).write_text(json.dumps(old))
    read = ModelCard.read(directory)
    assert read.training is None and read.lineage.scores_were == "logits"
    assert read.lineage.model_dump() == OLD_ONNX_LINEAGE, "read and written back unchanged"
