"""Build the services' container images and check them the way a user runs them.

  python deploy/container/container.py build   # make container: both images
  python deploy/container/container.py smoke   # make container-smoke: build, run, check, clean up
  python deploy/container/container.py smoke --service detector   # one of them

Two services, one image each: `classifier` (bentofile.yaml, service:ImageClassifier, image
`image-classifier`) and `detector` (bentofile.detector.yaml, service:ObjectDetector, image
`object-detector`). `--service both` (the default) builds and checks the two in turn.

`build` is `bentoml build` + `bentoml containerize` with the shipped bentofile. Where the standard
base image cannot be pulled (no Docker Hub, as on this project's CI), it builds a local Debian
base with debootstrap (once, for both services) and builds each bento against it through its
deploy/container/ counterpart instead (bentofile.local-base.yaml,
bentofile.detector.local-base.yaml: the shipped bentofile plus `docker.base_image`, which this
script checks before it builds); the shipped bentofiles stay the standard ones.

Where no Docker engine answers, `smoke` installs docker.io if needed and starts `dockerd` itself
(no bridge, no iptables), and stops it at the end. Containers run with `--network host` and are
reached at 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script (`make container`): devtools is at the root
from devtools.processes import NotReadyError, free_port, stop_tree, wait_until_ready  # noqa: E402

WORK = ROOT / "build" / "docker"
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
LOCAL_BASE = "image-classifier-base:bookworm-r2"  # bump r when build_local_base changes
STANDARD_BASE = "python:3.11-slim"  # what BentoML's Dockerfile starts from for python_version 3.11
EXAMPLE = ROOT / "examples" / "digit_7_00.png"
READY_TIMEOUT_S = 180
# The bento's source tree inside the image BentoML builds.
BENTO_SRC = "/home/bentoml/bento/src"


def log(message: str) -> None:
    print(f"[container] {message}", flush=True)


def run(*command: str, env: dict | None = None, check: bool = True,
        capture: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env or os.environ.copy(), check=check, text=True,
                          capture_output=capture, timeout=timeout, cwd=ROOT)


def docker(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return run("docker", *args, check=check, capture=capture)


# --- the engine -------------------------------------------------------------------------------

def engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return docker("info", check=False).returncode == 0


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """Use the engine that answers; else start our own dockerd and stop it afterwards."""
    if engine_answers():
        yield
        return
    if not shutil.which("dockerd"):
        log("no dockerd: installing docker.io")
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "docker.io")
    WORK.mkdir(parents=True, exist_ok=True)
    sock = Path("/tmp/image-classifier-docker.sock")
    os.environ["DOCKER_HOST"] = f"unix://{sock}"
    with open(WORK / "dockerd.log", "w") as log_file:
        daemon = subprocess.Popen(
            ["dockerd", "--data-root", str(WORK / "data"),
             "--exec-root", "/tmp/image-classifier-exec",
             "--pidfile", str(WORK / "dockerd.pid"), "-H", f"unix://{sock}",
             "--bridge=none", "--iptables=false"],
            stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not engine_answers():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"dockerd did not start; see {WORK / 'dockerd.log'}:\n"
                                     + (WORK / "dockerd.log").read_text()[-3000:])
                time.sleep(0.5)
            log(f"started dockerd (pid {daemon.pid}) at {sock}")
            yield
        finally:
            stop_tree(daemon)  # and the containerd it started
            log("stopped dockerd")


# --- the services -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    """One service's image: which bentofile builds it, and how a user checks its answers."""

    name: str  # --service
    image: str  # the Docker image's name (the bento's name)
    bentofile: Path  # the shipped one
    local_base_bentofile: Path  # the same on LOCAL_BASE, where Docker Hub is out of reach
    check_answers: Callable[[str], None]  # given the container's URL
    other_module: str  # the other service's module, which must not be in this image


def check_classification(url: str) -> None:
    files = [("images", (EXAMPLE.name, EXAMPLE.read_bytes(), "image/png"))]
    answer = httpx.post(f"{url}/classify", files=files, timeout=30)
    check(answer.status_code == 200 and answer.json()[0]["label"] == "7",
          f"{EXAMPLE.name} is classified as 7 ({answer.text[:200]})")


def example_scene() -> tuple[Path, list[int], list[list[float]]]:
    """A held-out composed scene with several digits, written as PNG: (path, digits, boxes).
    The same scene on every run (each is a pure function of seed, stream and index)."""
    from PIL import Image

    from train_export.detection.scenes import heldout_scenes

    scene = next(s for s in heldout_scenes(16) if len(s.boxes) >= 3)
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path, scene.class_ids.tolist(), scene.boxes.tolist()


def check_detection(url: str) -> None:
    import numpy as np

    from serving.detection import box_iou

    path, digits, boxes = example_scene()
    files = [("images", (path.name, path.read_bytes(), "image/png"))]
    answer = httpx.post(f"{url}/detect", files=files, timeout=30)
    check(answer.status_code == 200, f"/detect answers 200 ({answer.text[:200]})")
    detections = answer.json()[0]["detections"]
    found = [any(d["class_id"] == digit and box_iou(np.asarray(d["box"]), np.asarray(box)) >= 0.5
                 for d in detections)
             for digit, box in zip(digits, boxes)]
    # The default detector's mAP@0.5 is about 0.9: most digits of one scene, not always all.
    check(bool(detections) and 2 * sum(found) >= len(found),
          f"a composed scene with the digits {digits}: {sum(found)} of them found, box and label "
          f"(detections: {[d['label'] for d in detections]})")


SERVICES = {
    "classifier": Service("classifier", "image-classifier", ROOT / "bentofile.yaml",
                          HERE / "bentofile.local-base.yaml", check_classification,
                          "detector_service.py"),
    "detector": Service("detector", "object-detector", ROOT / "bentofile.detector.yaml",
                        HERE / "bentofile.detector.local-base.yaml", check_detection,
                        "classifier_service.py"),
}


# --- the image --------------------------------------------------------------------------------

def standard_base_available() -> bool:
    if docker("image", "inspect", STANDARD_BASE, check=False).returncode == 0:
        return True
    log(f"pulling {STANDARD_BASE}")
    try:
        return docker("pull", STANDARD_BASE, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def build_local_base() -> None:
    """Debian bookworm, minimal, with Python 3.11 as `python` and the host's CA bundle (TLS to
    the package indexes is intercepted on this project's machines; uv in BentoML's Dockerfile
    needs it). Like python:3.11-slim, it lets pip install into the system Python: BentoML's
    Dockerfile runs `pip install uv`, which Debian's PEP 668 marker would refuse."""
    if docker("image", "inspect", LOCAL_BASE, check=False).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        run("apt-get", "install", "-y", "-qq", "debootstrap")
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    log(f"building {LOCAL_BASE} with debootstrap (about a minute)")
    run("debootstrap", "--variant=minbase",
        "--include=python3.11,python3.11-venv,python3-pip,python-is-python3,ca-certificates,"
        "libgomp1",
        "bookworm", str(rootfs), "http://deb.debian.org/debian", capture=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import",
                    "--change", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                    "--change", "ENV UV_NATIVE_TLS=1",
                    "-", LOCAL_BASE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def check_local_base_bentofile(service: Service) -> None:
    """The local-base bentofile must build the shipped bento: the same document apart from
    `docker.base_image`, which names LOCAL_BASE. Otherwise the smoke would check another bento."""
    shipped = yaml.safe_load(service.bentofile.read_text())
    local = yaml.safe_load(service.local_base_bentofile.read_text())
    base = local.get("docker", {}).pop("base_image", None)
    if local != shipped or base != LOCAL_BASE:
        raise SystemExit(f"{service.local_base_bentofile.relative_to(ROOT)} must be "
                         f"{service.bentofile.relative_to(ROOT)} plus `docker.base_image: "
                         f"{LOCAL_BASE}`; update it")


def build_image(service: Service, local_base: bool) -> tuple[str, str]:
    """(image, bento tag): `bentoml build` + `bentoml containerize`."""
    bentofile = service.bentofile
    if local_base:
        check_local_base_bentofile(service)
        bentofile = service.local_base_bentofile
    built = run(str(BIN / "bentoml"), "build", "-f", str(bentofile), "--output", "tag",
                capture=True)
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    image = f"{service.image}:{tag.split(':')[1]}"
    log(f"containerizing {tag} as {image}")
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # no buildx in Debian's docker.io
    started = time.monotonic()
    run(str(BIN / "bentoml"), "containerize", tag, "-t", image, "-t", f"{service.image}:latest",
        "--opt", "network=host", env=env)  # the build's RUN steps reach the package index
    log(f"built {image} in {time.monotonic() - started:.0f} s")
    return image, tag


# --- the checks -------------------------------------------------------------------------------

def smoke(service: Service, image: str, tag: str) -> dict:
    """Run the image as a user does and check it; returns the figures for the report."""
    port = free_port()
    name = f"{service.image}-smoke-{os.getpid()}"
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "-e", f"BENTOML_PORT={port}",
           "-e", "BENTOML_HOST=127.0.0.1", image)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_for_container(url, name, started)
        figures = {"service": service.name, "image": image, "ready_s": round(ready_s, 1),
                   "image_mb": round(int(docker("image", "inspect", "-f", "{{.Size}}", image)
                                         .stdout.strip()) / 2**20)}
        service.check_answers(url)
        check_model_tag(url, tag)
        check_runs_as_non_root(name)
        check_no_training_code(name)
        check_only_its_own_service(name, service.other_module)
        log(f"all checks passed: {json.dumps(figures)}")
        return figures
    finally:
        docker("rm", "-f", name, check=False)


def wait_for_container(url: str, name: str, started: float) -> float:
    """Seconds from `started` (before `docker run`) until /readyz answers 200."""
    def running() -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"

    try:
        wait_until_ready(f"{url}/readyz", running, READY_TIMEOUT_S - (time.monotonic() - started),
                         interval_s=0.5)
    except NotReadyError as exc:
        logs = docker("logs", name, check=False)
        raise SystemExit(f"the container did not get ready ({exc}):\n"
                         f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}") from None
    return time.monotonic() - started


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    log(f"ok: {what}")


def check_model_tag(url: str, tag: str) -> None:
    import bentoml

    info = httpx.post(f"{url}/model_info", json={}, timeout=30).json()
    packed = [str(m.tag) for m in bentoml.get(tag).info.all_models]
    check(info["tag"] in packed, f"the container serves the model packed in {tag}: {info['tag']}")


def check_runs_as_non_root(name: str) -> None:
    uid = docker("exec", name, "id", "-u").stdout.strip()
    check(uid != "0", f"the service runs as a non-root user (uid {uid})")


def check_no_training_code(name: str) -> None:
    torch = docker("exec", name, "python", "-c", "import torch", check=False)
    check(torch.returncode != 0 and "No module named 'torch'" in torch.stderr,
          "torch is not installed in the image")
    found = docker("exec", name, "sh", "-c",
                   "find / -xdev \\( -name train_export -o -name torchvision \\) 2>/dev/null",
                   check=False).stdout.split()
    check(not found, f"no training code in the image ({found or 'none found'})")


def check_only_its_own_service(name: str, other_module: str) -> None:
    listed = docker("exec", name, "ls", BENTO_SRC, check=False)
    check(listed.returncode == 0 and other_module not in listed.stdout.split(),
          f"the other service's {other_module} is not in {BENTO_SRC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "smoke"])
    parser.add_argument("--service", choices=[*SERVICES, "both"], default="both",
                        help="which service's image (default: both, the classifier first)")
    args = parser.parse_args()
    services = list(SERVICES.values()) if args.service == "both" else [SERVICES[args.service]]
    started = time.monotonic()
    results = []
    with docker_engine():
        local_base = not standard_base_available()
        if local_base:
            log(f"{STANDARD_BASE} cannot be pulled here: building against a local base image")
            build_local_base()
        for service in services:
            image, tag = build_image(service, local_base)
            if args.command == "smoke":
                results.append(smoke(service, image, tag))
    for figures in results:
        log(f"{figures['service']}: {figures['image']}, {figures['image_mb']} MB, "
            f"ready in {figures['ready_s']} s")
    log(f"{args.command} done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
