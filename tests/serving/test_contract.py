"""ModelCard: round trip, and verification of a store entry against its card."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.contract import (ONNX_FILE, TORCHSCRIPT_FILE, DamagedModel, GraphSpec, InputSpec,
                              ModelCard, sha256_of)


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
