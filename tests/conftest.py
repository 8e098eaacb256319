"""Session fixtures: a temporary BentoML home, a model trained once by the real CLI, and a real
`bentoml serve` on 127.0.0.1; and the marker rule (pytest.ini): a test that needs the trained
model or a server is marked e2e, every other test is a unit test and leaves it unmarked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# Before anything imports bentoml: every test runs against its own store, never ~/bentoml.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
os.environ["BENTOML_HOME"] = str(_SESSION_HOME)
os.environ.pop("BENTOML_CONFIG", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import (  # noqa: E402
    ROOT,
    E2EGuard,
    RunningServer,
    python,
    saved_tag,
    start_server,
)

if TYPE_CHECKING:
    from train_export.data import Split

MODEL_NAME = "digits-classifier"
# Fixtures that train the default model (about 40 s) or start a server. A test whose fixtures
# include one of them, directly or through another fixture, must be marked e2e.
E2E_FIXTURES = frozenset({"trained_model", "model_dir", "server", "trained_detector",
                          "detector_server"})


# Training the detector takes 3-5 minutes on 2 idle cores, and several times that on a loaded
# machine (torch's threads contend): the test that first needs it may take longer than
# pytest.ini's --timeout, which covers a test's fixtures too.
DETECTOR_FIXTURES = frozenset({"trained_detector", "detector_server"})
DETECTOR_TIMEOUT_S = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DETECTOR_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.timeout(DETECTOR_TIMEOUT_S))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of the test runs: a unit test that would train a model or start a
    server fails here, at once, instead of making `make test-fast` slow."""
    e2e = item.get_closest_marker("e2e") is not None
    E2EGuard.allowed = e2e  # the helpers that start servers and training check it as well
    needs = sorted(E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if needs and not e2e:
        pytest.fail(f"{item.nodeid} uses {', '.join(needs)} (a trained model or a server) but is "
                    "not marked e2e: add `@pytest.mark.e2e`, or `pytestmark = pytest.mark.e2e` "
                    "to its module", pytrace=False)


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
def detector_examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("detector-examples")


@pytest.fixture(scope="session")
def trained_detector(bentoml_home: Path, detector_examples_dir: Path) -> str:
    """Train and export the default detector once, as a user does (about 3-5 minutes):
    `python -m train_export --task detection`."""
    result = python("-m", "train_export", "--task", "detection", "--examples-dir",
                    str(detector_examples_dir), timeout=1200)
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    return saved_tag(result.stdout)


@pytest.fixture(scope="session")
def detector_server(trained_detector: str, tmp_path_factory: pytest.TempPathFactory,
                    ) -> Iterator[RunningServer]:
    """`bentoml serve service:ObjectDetector` from the project root, as `make serve-detector`."""
    with start_server(["service:ObjectDetector"], cwd=ROOT,
                      log_dir=tmp_path_factory.mktemp("detector-server")) as running:
        yield running


@pytest.fixture(scope="session")
def model_dir(trained_model: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(trained_model).path)


@pytest.fixture(scope="session")
def holdout() -> Split:
    """The held-out split the default model never saw (same seed and fraction as training)."""
    from train_export.config import TrainConfig
    from train_export.data import load_digits_split

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
