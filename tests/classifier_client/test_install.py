"""The client installed the way a user installs it: a wheel built from pyproject.toml, `pip
install`ed into a fresh venv outside the repository. The base install has the `image-client`
command and neither onnxruntime nor torch, and answers a real server; `offline` says how to get
the extra, and with `[offline]` runs the stored model.

Slow (a venv and about 60 packages from the pip mirror, then onnxruntime-gpu): e2e. The wheel is
built from a copy of the files it is made of, so that the build leaves no build/ or *.egg-info
in the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e

SOURCES = ["pyproject.toml", "classifier_client", "serving", "docs/clients.md"]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PIP_TIMEOUT_S = 600


@dataclass
class Installed:
    venv: Path
    wheel: Path
    home: Path  # a working directory outside the repository

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command from the venv's bin/, run from outside the repository with nothing of it on
        the import path."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run([str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.home,
                              env=env, capture_output=True, text=True, timeout=timeout)

    def pip_install(self, requirement: str) -> None:
        result = self.run("pip", "install", "--quiet", "-c", str(CONSTRAINTS), requirement,
                          timeout=PIP_TIMEOUT_S)
        assert result.returncode == 0, f"pip install {requirement}:\n{result.stderr[-4000:]}"

    def has(self, module: str) -> bool:
        found = self.run("python", "-c", f"import importlib.util as u; "
                         f"print(u.find_spec({module!r}) is not None)")
        return found.stdout.strip() == "True"


def build_wheel(directory: Path) -> Path:
    """`pip wheel` over a copy of the package's files, with this venv's setuptools."""
    source = directory / "source"
    for name in SOURCES:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, target)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(directory / "dist"), str(source)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert result.returncode == 0, f"pip wheel failed:\n{result.stderr[-4000:]}"
    (wheel,) = (directory / "dist").glob("image_client-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel in a fresh venv, base dependencies only (the tests that add the `offline`
    extra come last in this module)."""
    directory = tmp_path_factory.mktemp("client-install")
    wheel = build_wheel(directory)
    venv.create(directory / "venv", with_pip=True)
    home = directory / "user"
    home.mkdir()
    client = Installed(directory / "venv", wheel, home)
    client.pip_install(str(wheel))
    return client


def test_the_wheel_holds_the_client_and_serving_only(installed) -> None:
    import zipfile

    tops = {name.split("/")[0] for name in zipfile.ZipFile(installed.wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"classifier_client", "serving"}
    assert "classifier_client/data/digit_7_00.png" in zipfile.ZipFile(installed.wheel).namelist()


def test_the_base_install_has_the_command_and_no_onnxruntime_or_torch(installed) -> None:
    result = installed.run("image-client", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: image-client"), result.stdout[:200]
    for module in ("onnxruntime", "torch", "torchvision", "train_export"):
        assert not installed.has(module), f"{module} is importable after the base install"
    listed = installed.run("pip", "list", "--format", "json").stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    # nvidia-ml-py (NVML bindings, pure Python) comes with bentoml; CUDA's own wheels must not.
    assert not {n for n in names if n.startswith(("onnxruntime", "torch", "nvidia-cu"))}, names
    assert installed.run("pip", "show", "image-client").returncode == 0


def test_the_installed_command_classifies_with_a_real_server(installed, server) -> None:
    image = installed.home / "seven.png"
    shutil.copy(ROOT / "examples" / "digit_7_00.png", image)
    result = installed.run("image-client", "predict", str(image), "--url", server.url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["label"] == "7", result.stdout
    smoke = installed.run("image-client", "smoke", "--url", server.url, "--requests", "5")
    assert smoke.returncode == 0 and "digit_7_00.png -> 7" in smoke.stdout, \
        smoke.stdout + smoke.stderr  # the packaged example, as no examples/ folder is here


def test_offline_without_the_extra_says_how_to_install_it(installed, tmp_path) -> None:
    result = installed.run("image-client", "offline", str(tmp_path), "--out",
                           str(tmp_path / "out.csv"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'pip install "image-client[offline]"' in " ".join(result.stderr.split()), \
        result.stderr


def test_offline_with_the_extra_runs_the_stored_model(installed, trained_model, tmp_path
                                                      ) -> None:
    installed.pip_install(f"image-client[offline] @ {installed.wheel.as_uri()}")
    assert installed.has("onnxruntime") and not installed.has("torch")
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(ROOT / "examples" / "digit_7_00.png", folder / "seven.png")
    out = tmp_path / "preds.jsonl"
    result = installed.run("image-client", "offline", str(folder), "--model", trained_model,
                           "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["label"] == "7" and row["model"] == trained_model, row
