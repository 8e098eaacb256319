"""The container images' build files, without Docker: the bentofiles and their local-base copies,
the CPU and GPU requirements, and the Dockerfile that BentoML renders from
deploy/container/Dockerfile.template (no compilers, uv only in the build stage, a numeric USER,
no BENTOML_CONTAINERIZED). `make container-smoke` builds and runs the images themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

CONTAINER = ROOT / "deploy" / "container"
# shipped bentofile -> its copy on the local Debian base (container.py, where Docker Hub is out
# of reach)
BENTOFILES = {
    ROOT / "bentofile.yaml": CONTAINER / "bentofile.local-base.yaml",
    ROOT / "bentofile.detector.yaml": CONTAINER / "bentofile.detector.local-base.yaml",
    CONTAINER / "bentofile.gpu.yaml": CONTAINER / "bentofile.gpu.local-base.yaml",
}
CPU_BENTOFILES = [ROOT / "bentofile.yaml", ROOT / "bentofile.detector.yaml"]


def load(path: Path) -> dict:
    document: dict = yaml.safe_load(path.read_text())
    return document


def requirement_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("shipped", BENTOFILES, ids=lambda p: p.name)
def test_each_local_base_bentofile_differs_only_in_its_base_image(shipped: Path) -> None:
    local = load(BENTOFILES[shipped])
    base = local["docker"].pop("base_image")
    assert local == load(shipped), f"{BENTOFILES[shipped].name}: copy {shipped.name}'s changes"
    assert f'LOCAL_BASE = "{base}"' in (CONTAINER / "container.py").read_text()


@pytest.mark.parametrize("bentofile", CPU_BENTOFILES, ids=lambda p: p.name)
def test_the_cpu_images_install_onnxruntimes_cpu_build(bentofile: Path) -> None:
    requirements = ROOT / load(bentofile)["python"]["requirements_txt"]
    assert requirements.name == "serving-cpu.txt"
    lines = requirement_lines(requirements)
    assert "onnxruntime==1.31.1" in lines
    assert not any(line.startswith(("onnxruntime-gpu", "-r")) for line in lines), \
        "onnxruntime and onnxruntime-gpu share one package directory: never both"


def test_serving_cpu_is_serving_with_the_cpu_runtime() -> None:
    """requirements/serving-cpu.txt repeats serving.txt (which the development environment and
    the GPU image install) with onnxruntime in place of onnxruntime-gpu, and nothing else."""
    cpu = requirement_lines(ROOT / "requirements" / "serving-cpu.txt")
    gpu = requirement_lines(ROOT / "requirements" / "serving.txt")
    assert [line.replace("onnxruntime==", "onnxruntime-gpu==") for line in cpu] == gpu, \
        "update requirements/serving-cpu.txt with requirements/serving.txt"


def test_every_bentofile_builds_with_the_slim_dockerfile_template() -> None:
    for bentofile in BENTOFILES:
        docker = load(bentofile)["docker"]
        assert docker["dockerfile_template"] == "./deploy/container/Dockerfile.template", bentofile


@pytest.fixture(scope="module")
def dockerfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Dockerfile `bentoml containerize` builds for bentofile.yaml's docker options (rendered
    by BentoML itself, without a build: the options, the template, an empty bento)."""
    from bentoml._internal.bento.build_config import CondaOptions, DockerOptions
    from bentoml._internal.container.generate import generate_containerfile

    options = DockerOptions(**load(ROOT / "bentofile.yaml")["docker"]).with_defaults()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # BentoML reads a template only under the working directory
        rendered: str = generate_containerfile(options, str(ROOT), conda=CondaOptions(),
                                               bento_fs=tmp_path_factory.mktemp("bento"),
                                               enable_buildkit=False)
    return rendered


def stages(dockerfile: str) -> dict[str, str]:
    """Each build stage's instructions, by its name (FROM ... AS name)."""
    parts = re.split(r"^FROM \S+ AS (\S+)$", dockerfile, flags=re.MULTILINE | re.IGNORECASE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_image_is_built_in_two_stages_and_keeps_only_the_venv(dockerfile: str) -> None:
    built = stages(dockerfile)
    assert list(built) == ["bento-venv", "base-container"], list(built)
    assert "pip install --no-cache-dir uv==" in built["bento-venv"]
    assert "install.sh" in built["bento-venv"]
    image = built["base-container"]
    assert "COPY --from=bento-venv /app /app" in image
    runs = re.findall(r"^RUN .*", image, flags=re.MULTILINE)
    assert not any(re.search(r"\buv\b", run) for run in runs), f"uv in the image: {runs}"


def test_the_uv_of_the_build_stage_is_the_pinned_one(dockerfile: str) -> None:
    pinned = re.search(r"^uv==(\S+)$", (ROOT / "requirements" / "constraints.txt").read_text(),
                       flags=re.MULTILINE)
    assert pinned and f"uv=={pinned[1]}" in dockerfile, "pin uv as requirements/constraints.txt"


def test_the_dockerfile_installs_no_compiler_and_no_git(dockerfile: str) -> None:
    for word in ("apt-get", "build-essential", "git", "gcc"):
        assert not re.search(rf"\b{word}\b", dockerfile), f"{word} in the Dockerfile"


def test_the_image_runs_as_a_numeric_non_root_user(dockerfile: str) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID

    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users == [str(BENTO_UID_GID)], "Kubernetes' runAsNonRoot verifies a numeric USER only"
    assert BENTO_UID_GID != 0


def test_the_image_lets_bentoml_respawn_dead_workers(dockerfile: str) -> None:
    """BentoML 1.4.39 turns respawning off whenever BENTOML_CONTAINERIZED is set, to any value
    (bentoml/serving.py, running_inside_container); the smoke test kills a worker to check."""
    import bentoml.serving

    assert "BENTOML_CONTAINERIZED" not in dockerfile
    assert "BENTOML_CONTAINERIZED" in Path(bentoml.serving.__file__).read_text(), \
        "BentoML changed how it tells a container: review Dockerfile.template's 4th point"
