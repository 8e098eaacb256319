"""Session fixtures: a temporary BentoML home, a model trained once by the real CLI, and a real
`bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before anything imports bentoml: every test runs against its own store, never ~/bentoml.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
os.environ["BENTOML_HOME"] = str(_SESSION_HOME)
os.environ.pop("BENTOML_CONFIG", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import ROOT, RunningServer, python, saved_tag, start_server  # noqa: E402
from train_export.config import TrainConfig  # noqa: E402
from train_export.data import Split, load_digits_split  # noqa: E402

MODEL_NAME = "digits-classifier"


@pytest.fixture(scope="session", autouse=True)
def bentoml_home() -> Iterator[Path]:
    yield _SESSION_HOME
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="session")
def trained_model(bentoml_home: Path, examples_dir: Path) -> str:
    """Train and export the default model once, the way a user does: `python -m train_export`."""
    result = python("-m", "train_export", "--examples-dir", str(examples_dir), timeout=600)
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    return saved_tag(result.stdout)


@pytest.fixture(scope="session")
def model_dir(trained_model: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(trained_model).path)


@pytest.fixture(scope="session")
def holdout() -> Split:
    """The held-out split the default model never saw (same seed and fraction as training)."""
    config = TrainConfig()
    return load_digits_split(config.input_size, 1, config.holdout_fraction, config.seed)


@pytest.fixture(scope="session")
def server(trained_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`bentoml serve` from the project root, as `make serve` runs it."""
    with start_server(["service:ImageClassifier"], cwd=ROOT,
                      log_dir=tmp_path_factory.mktemp("server")) as running:
        yield running


def digit_images(holdout: Split, directory: Path, count: int) -> list[tuple[Path, int]]:
    """Write `count` held-out digits, alternating PNG and JPEG; return (path, true class)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        suffix = "png" if i % 2 == 0 else "jpg"
        path = directory / f"{i:03d}.{suffix}"
        Image.fromarray(np.ascontiguousarray(holdout.holdout_x[i][..., 0])).save(path, quality=90)
        written.append((path, int(holdout.holdout_y[i])))
    return written
