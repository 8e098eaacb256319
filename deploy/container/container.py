"""Build the services' container images and check them the way a user runs them.

  python deploy/container/container.py build   # make container: both CPU images
  python deploy/container/container.py smoke   # make container-smoke: build, run, check, clean up
  python deploy/container/container.py smoke --service detector   # one of them
  python deploy/container/container.py build --service classifier-gpu   # make container-gpu

Two services, one CPU image each: `classifier` (bentofile.yaml, service:ImageClassifier, image
`image-classifier`) and `detector` (bentofile.detector.yaml, service:ObjectDetector, image
`object-detector`). `--service both` (the default) builds and checks the two in turn.
`classifier-gpu` (deploy/container/bentofile.gpu.yaml, image `image-classifier-gpu`) is the
classifier with onnxruntime-gpu and the CUDA libraries; it is built only when asked for.

`build` is `bentoml build` + `bentoml containerize` with the shipped bentofile, whose
`docker.dockerfile_template` (deploy/container/Dockerfile.template) makes a slim image: no
compilers, no git, no uv, a numeric non-root USER, and dead workers respawned. Where the standard
base image cannot be pulled (no Docker Hub, as on this project's CI), it builds a local Debian
base with debootstrap (once, for every service) and builds each bento against it through its
deploy/container/ counterpart instead (bentofile.local-base.yaml,
bentofile.detector.local-base.yaml, bentofile.gpu.local-base.yaml: the shipped bentofile plus
`docker.base_image`, which this script checks before it builds); the shipped bentofiles stay the
standard ones.

Where no Docker engine answers, it installs docker.io if needed and starts its own `dockerd` (no
bridge, no iptables). `build` leaves that engine running, so that the images are where the
user's `docker run` finds them, and says how to reach it; `smoke` stops it at the end (the images
stay in its data root for the next run). Containers run with `--network host` and are reached at
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script (`make container`): devtools is at the root
from devtools.image import IMAGE_UID_GID  # noqa: E402
from devtools.processes import NotReadyError, free_port, stop_tree, wait_until_ready  # noqa: E402

WORK = ROOT / "build" / "docker"
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
LOCAL_BASE = "image-classifier-base:bookworm-r3"  # bump r when build_local_base changes
STANDARD_BASE = "python:3.11-slim"  # what BentoML's Dockerfile starts from for python_version 3.11
EXAMPLE = ROOT / "examples" / "digit_7_00.png"
READY_TIMEOUT_S = 180
# The bento's source tree inside the image BentoML builds.
BENTO_SRC = "/home/bentoml/bento/src"
# Issue 15: a CPU image at most this size, in MB as `docker images` counts them (10^6 bytes).
CPU_IMAGE_BUDGET_MB = 450
# `docker run --cpus`: with `workers: cpu_count` (configuration.yaml) the service then starts
# this many workers on any machine with at least as many cores; the respawn check needs two.
SMOKE_CPUS = 2
# Issue 16: a worker killed in the container is back (running and answering) within this.
RESPAWN_TARGET_S = 15
# BentoML's process manager (circus) looks for dead workers this often (create_standalone_arbiter
# in bentoml/_internal/utils/circus; not configurable in 1.4.39); a new worker then loads.
RESPAWN_CHECK_S = 10
# The engine this script starts where none answers, and keeps for `build`.
OWN_ENGINE = "unix:///tmp/image-classifier-docker.sock"


def log(message: str) -> None:
    print(f"[container] {message}", flush=True)


def run(*command: str, env: dict | None = None, check: bool = True,
        capture: bool = False, timeout: float = 3600) -> subprocess.CompletedProcess:
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
def docker_engine(keep: bool) -> Iterator[bool]:
    """Use the engine that answers; else this script's own, if an earlier `build` left it
    running; else start it. Yields whether the engine is this script's own. `keep`: leave an
    engine started here running afterwards, else stop it."""
    if engine_answers():
        yield False
        return
    os.environ["DOCKER_HOST"] = OWN_ENGINE
    if engine_answers():
        log(f"using this script's own Docker engine, left running by an earlier build: "
            f"{OWN_ENGINE}")
        yield True
        return
    daemon = start_own_engine()
    try:
        yield True
    except BaseException:
        stop_own_engine(daemon)
        raise
    if not keep:
        stop_own_engine(daemon)
        log(f"the images stay in {WORK / 'data'}: `make container` starts this engine again "
            f"and leaves it running")


def start_own_engine() -> subprocess.Popen:
    if not shutil.which("dockerd"):
        log("no dockerd: installing docker.io")
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "docker.io")
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "dockerd.log", "w") as log_file:
        # Its own session: a `build` leaves it running after this script (and make) exit.
        daemon = subprocess.Popen(
            ["dockerd", "--data-root", str(WORK / "data"),
             "--exec-root", "/tmp/image-classifier-exec",
             "--pidfile", str(WORK / "dockerd.pid"), "-H", OWN_ENGINE,
             "--bridge=none", "--iptables=false"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not engine_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            stop_tree(daemon)
            raise SystemExit(f"dockerd did not start; see {WORK / 'dockerd.log'}:\n"
                             + (WORK / "dockerd.log").read_text()[-3000:])
        time.sleep(0.5)
    log(f"no Docker engine answered: started this script's own, dockerd (pid {daemon.pid}) at "
        f"{OWN_ENGINE}")
    return daemon


def stop_own_engine(daemon: subprocess.Popen) -> None:
    stop_tree(daemon)  # and the containerd it started
    log("stopped dockerd")


def explain_own_engine(images: list[str]) -> None:
    """Where the images are when they were built in this script's own engine."""
    log(f"""the images are in this script's own Docker engine, which keeps running:
    export DOCKER_HOST={OWN_ENGINE}
    docker images; docker run --rm --network host -e BENTOML_PORT=3000 {images[0]}
  to load them into another engine (the default one, or a machine that pushes to a registry):
    DOCKER_HOST={OWN_ENGINE} docker save {' '.join(images)} | docker load
  to stop it (the images stay in {WORK / 'data'}):  kill $(cat {WORK / 'dockerd.pid'})""")


# --- the services -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    """One image: which bentofile builds it, how a user checks its answers, what it must hold."""

    name: str  # --service
    image: str  # the Docker image's name (the bento's name)
    bentofile: Path  # the shipped one
    local_base_bentofile: Path  # the same on LOCAL_BASE, where Docker Hub is out of reach
    predict: Callable[[httpx.Client, str], httpx.Response]  # one request, to the container's URL
    check_answers: Callable[[str], None]  # given the container's URL
    other_module: str  # the other service's module, which must not be in this image
    runtime: str  # the ONNX Runtime distribution installed (the other build must not be)
    budget_mb: int | None  # the most the image may weigh; None: no budget (the CUDA image)
    # The build may take wheels from this machine's own pip mirrors: the CUDA libraries are
    # gigabytes, and the mirrors hold them (local_wheel_indexes).
    local_wheels: bool = False


def classify_example(client: httpx.Client, url: str) -> httpx.Response:
    files = [("images", (EXAMPLE.name, EXAMPLE.read_bytes(), "image/png"))]
    return client.post(f"{url}/classify", files=files)


def check_classification(url: str) -> None:
    with httpx.Client(timeout=30) as client:
        answer = classify_example(client, url)
    check(answer.status_code == 200 and answer.json()[0]["label"] == "7",
          f"{EXAMPLE.name} is classified as 7 ({answer.text[:200]})")


@functools.cache
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


def detect_example(client: httpx.Client, url: str) -> httpx.Response:
    path, _, _ = example_scene()
    files = [("images", (path.name, path.read_bytes(), "image/png"))]
    return client.post(f"{url}/detect", files=files)


def check_detection(url: str) -> None:
    import numpy as np

    from serving.detection import box_iou

    _, digits, boxes = example_scene()
    with httpx.Client(timeout=30) as client:
        answer = detect_example(client, url)
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
                          HERE / "bentofile.local-base.yaml", classify_example,
                          check_classification, "detector_service.py",
                          runtime="onnxruntime", budget_mb=CPU_IMAGE_BUDGET_MB),
    "detector": Service("detector", "object-detector", ROOT / "bentofile.detector.yaml",
                        HERE / "bentofile.detector.local-base.yaml", detect_example,
                        check_detection, "classifier_service.py",
                        runtime="onnxruntime", budget_mb=CPU_IMAGE_BUDGET_MB),
    "classifier-gpu": Service("classifier-gpu", "image-classifier-gpu",
                              HERE / "bentofile.gpu.yaml", HERE / "bentofile.gpu.local-base.yaml",
                              classify_example, check_classification, "detector_service.py",
                              runtime="onnxruntime-gpu", budget_mb=None, local_wheels=True),
}
BOTH = ("classifier", "detector")  # --service both: the CPU images


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
    """Debian bookworm, minimal and slimmed like python:3.11-slim, with Python 3.11 as `python`
    and the host's CA bundle (TLS to the package indexes is intercepted on this project's
    machines; uv in the image build needs it). Like python:3.11-slim, it lets pip install into
    the system Python: the build stage runs `pip install uv`, which Debian's PEP 668 marker would
    refuse. No compilers: the images install binary wheels only."""
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
    slim_rootfs(rootfs)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import",
                    "--change", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                    "--change", "ENV UV_NATIVE_TLS=1",
                    "-", LOCAL_BASE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


# What debian:bookworm-slim (under python:3.11-slim) leaves out, as dpkg excludes: documentation
# and translations. With the .debs debootstrap downloaded and its apt lists, about 150 MB of 300.
SLIM_DPKG_EXCLUDES = """\
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
"""


def slim_rootfs(rootfs: Path) -> None:
    """Remove from a debootstrap root what a slim base image does not carry, and tell dpkg to
    leave it out of later installs too."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM_DPKG_EXCLUDES)
    files = [*rootfs.glob("var/cache/apt/archives/*.deb"),
             *(p for p in rootfs.glob("var/lib/apt/lists/*") if p.is_file() and p.name != "lock"),
             *(p for p in rootfs.glob("usr/share/doc/*/*") if p.name != "copyright")]
    folders = [*rootfs.glob("usr/share/man/*"), *rootfs.glob("usr/share/info/*"),
               *rootfs.glob("usr/share/locale/*")]
    for path in files + folders:  # a doc folder can be a link to another: each path once
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
    # BentoML 1.4.39 copies the bento to a temporary folder and refuses to read the bento's
    # Dockerfile.template there unless that folder lies under the working directory
    # (bentoml/BentoML#5566): a temporary folder under build/, which is under ROOT, the cwd here.
    context = WORK / "context"
    context.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DOCKER_BUILDKIT": "0",  # no buildx in Debian's docker.io
           "TMPDIR": str(context)}
    options = ["--opt", "network=host"]  # the build's RUN steps reach the package index
    started = time.monotonic()
    with local_wheel_indexes(service.local_wheels) as indexes:
        if indexes:
            log(f"the build may take wheels from this machine's pip mirrors: {indexes}")
            options += ["--opt", f"build-arg=UV_EXTRA_INDEX_URL={' '.join(indexes)}",
                        "--opt", "build-arg=UV_INDEX_STRATEGY=unsafe-best-match"]
        run(str(BIN / "bentoml"), "containerize", tag, "-t", image,
            "-t", f"{service.image}:latest", *options, env=env)
    log(f"built {image} (and {service.image}:latest) in {time.monotonic() - started:.0f} s")
    return image, tag


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def local_wheel_indexes(wanted: bool) -> Iterator[list[str]]:
    """The local wheel indexes pip on this machine is configured with (file:// extra index
    URLs), served at 127.0.0.1 while the image builds, as URLs the build's uv can use (the build
    runs on the host's network). Empty where none is configured, or not `wanted`."""
    folders = [Path(urlparse(url).path) for url in pip_extra_index_urls() if
               url.startswith("file://")] if wanted else []
    servers = []
    try:
        for folder in (f for f in folders if f.is_dir()):
            # The index's pages link to its wheels as ../../files/...: serve the folder above.
            handler = functools.partial(_QuietFiles, directory=str(folder.parent))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append((server, f"http://127.0.0.1:{server.server_address[1]}/{folder.name}"))
        yield [url for _, url in servers]
    finally:
        for server, _ in servers:
            server.shutdown()
            server.server_close()


def pip_extra_index_urls() -> list[str]:
    if os.environ.get("PIP_EXTRA_INDEX_URL"):
        return os.environ["PIP_EXTRA_INDEX_URL"].split()
    configured = run(str(BIN / "python"), "-m", "pip", "config", "get",
                     "global.extra-index-url", check=False, capture=True)
    return configured.stdout.split() if configured.returncode == 0 else []


# --- the checks -------------------------------------------------------------------------------

def smoke(service: Service, image: str, tag: str) -> dict:
    """Run the image as a user does and check it; returns the figures for the report."""
    port = free_port()
    name = f"{service.image}-smoke-{os.getpid()}"
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "--cpus", str(SMOKE_CPUS),
           "-e", f"BENTOML_PORT={port}", "-e", "BENTOML_HOST=127.0.0.1", image)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_for_container(url, name, started)
        size_mb = check_image_size(service, image)
        service.check_answers(url)
        check_model_tag(url, tag)
        check_numeric_non_root_user(name, image)
        check_runtime(name, service.runtime)
        check_no_build_tools(name)
        check_no_training_code(name)
        check_only_its_own_service(name, service.other_module)
        respawn_s = check_worker_respawn(service, name, url, ready_s)
        figures = {"service": service.name, "image": image, "image_mb": size_mb,
                   "ready_s": round(ready_s, 1), "respawn_s": round(respawn_s, 1)}
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
        raise SystemExit(f"the container did not get ready ({exc}):\n{container_logs(name)}") \
            from None
    return time.monotonic() - started


def container_logs(name: str) -> str:
    logs = docker("logs", name, check=False)
    return f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}"


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    log(f"ok: {what}")


def check_image_size(service: Service, image: str) -> int:
    size_mb = round(int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6)
    log(f"image size: {size_mb} MB ({image})")
    if service.budget_mb is not None:
        check(size_mb <= service.budget_mb,
              f"the image is within the {service.budget_mb} MB of a CPU image ({size_mb} MB)")
    return size_mb


def check_model_tag(url: str, tag: str) -> None:
    import bentoml

    info = httpx.post(f"{url}/model_info", json={}, timeout=30).json()
    packed = [str(m.tag) for m in bentoml.get(tag).info.all_models]
    check(info["tag"] in packed, f"the container serves the model packed in {tag}: {info['tag']}")


def check_numeric_non_root_user(name: str, image: str) -> None:
    """Kubernetes' runAsNonRoot can only verify a numeric USER: with a name the kubelet refuses
    to start the pod. The manifests run the pods as IMAGE_UID_GID."""
    user = docker("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
    check(user.isdigit() and int(user) != 0,
          f"the image's USER is a numeric uid other than 0 ({user!r})")
    check(user == str(IMAGE_UID_GID),
          f"it is the uid the Kubernetes manifests run the pods as (devtools/image.py: "
          f"{IMAGE_UID_GID})")
    uid = docker("exec", name, "id", "-u").stdout.strip()
    server = docker("exec", name, "sh", "-c", "grep '^Uid:' /proc/1/status").stdout.split()
    check(uid == user and server[1] == user,
          f"the service runs as uid {user} (id -u: {uid}; the server process: {server[1]})")


def check_runtime(name: str, runtime: str) -> None:
    """The image holds one ONNX Runtime build, the one it should; a CPU image no CUDA library."""
    listing = ("import importlib.metadata as m, json; "
               "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))")
    installed = set(json.loads(docker("exec", name, "python", "-c", listing).stdout))
    builds = {"onnxruntime", "onnxruntime-gpu"}
    check(installed & builds == {runtime},
          f"ONNX Runtime is installed as {runtime} alone ({sorted(installed & builds)})")
    if runtime == "onnxruntime":
        cuda = docker("exec", name, "sh", "-c", "find / -xdev \\( -name 'libcudart.so*' -o "
                      "-name 'libcublas*.so*' -o -name 'libcudnn*.so*' -o "
                      "-name 'libonnxruntime_providers_cuda.so' \\) 2>/dev/null",
                      check=False).stdout.split()
        check(not cuda, f"no CUDA library in a CPU image ({cuda or 'none found'})")


def check_no_build_tools(name: str) -> None:
    """No compilers, no git (BentoML's own Dockerfile installs build-essential and git), and no
    uv: it builds the venv in the first stage and stays there."""
    found = docker("exec", name, "sh", "-c", "command -v gcc cc c++ make git uv; true").stdout
    check(not found.split(), f"no compiler, git or uv in the image ({found.split() or 'none'})")


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


# --- a worker killed in the container (issue 16) ----------------------------------------------

# The live BentoML workers in the container, as JSON: processes running BentoML's worker module
# (`python -m _bentoml_impl.worker.service ...`), zombies left out.
LIST_WORKERS = textwrap.dedent("""
    import json, pathlib
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"_bentoml_impl.worker.service" in argv and state != "Z":
            pids.append(int(proc.name))
    print(json.dumps(sorted(pids)))
""")


def worker_pids(name: str) -> list[int]:
    pids: list[int] = json.loads(docker("exec", name, "python", "-c", LIST_WORKERS).stdout)
    return pids


def answering_worker(url: str) -> int | None:
    """The pid of the worker that took this request: /drift reports it (each request is a new
    connection, which the kernel gives to one of the workers)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
        pid: int = httpx.post(f"{url}/drift", json={}, timeout=5).json()["models"][0]["worker_pid"]
        return pid
    return None


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no answer (the connection was reset or closed)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class SteadyRequests:
    """`clients` threads, each sending requests one after another with `pause_s` between, from
    __enter__ to __exit__, every one on a new connection (so that the kernel spreads them over
    the workers); every request's outcome is kept."""

    send: Callable[[httpx.Client], httpx.Response]
    clients: int = 2
    pause_s: float = 0.05
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyRequests:
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self) -> None:
        # One client per thread, no keep-alive: a new connection per request without a new
        # client's cost (an SSL context each), which would take the CPU from the server.
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                status: int | None = None
                with contextlib.suppress(httpx.HTTPError):
                    status = self.send(client).status_code
                self.outcomes.append(Outcome(started, time.monotonic(), status))
                time.sleep(self.pause_s)


def check_worker_respawn(service: Service, name: str, url: str, ready_s: float) -> float:
    """SIGKILL one of the workers under steady requests: the service must be back to full
    capacity (as many workers as before, the new one answering) in time, and no request may fail
    but those in flight when the worker died. Returns the seconds it took.

    In time: within RESPAWN_TARGET_S, or, on a machine so busy that a worker takes longer to
    start, within the process manager's check interval plus the time the container took to get
    ready (`ready_s`, an upper bound on one worker's start)."""
    before = worker_pids(name)
    check(len(before) == SMOKE_CPUS, f"{SMOKE_CPUS} workers serve (workers: cpu_count, "
                                     f"docker run --cpus {SMOKE_CPUS}): pids {before}")
    check(answering_worker(url) in before, "/drift names the worker that answers")
    victim = before[0]
    with SteadyRequests(lambda client: service.predict(client, url)) as load:
        time.sleep(2)  # requests on full capacity first
        killed_at = time.monotonic()
        docker("exec", name, "sh", "-c", f"kill -KILL {victim}")
        killed_by = time.monotonic()
        respawned_s, back_s = wait_for_full_capacity(name, url, before, killed_at)
        time.sleep(2)  # and on the restored capacity
    failed = [o for o in load.outcomes if not o.ok]
    in_flight = [o for o in failed if o.started <= killed_by and o.ended >= killed_at]
    lost = [o for o in failed if o not in in_flight]
    log(f"worker respawn: killed worker pid {victim} of {before}; a new worker process after "
        f"{respawned_s:.1f} s, answering (full capacity again) after {back_s:.1f} s; steady "
        f"requests: {len(load.outcomes)} sent, {len(failed)} failed, {len(in_flight)} of them in "
        f"flight at the kill")
    check(not lost, f"no request lost but those in flight at the kill ({len(lost)} lost: "
                    f"{[o.status for o in lost][:10]})")
    check(respawned_s <= RESPAWN_CHECK_S + 3,  # + polling through docker exec
          f"the process manager replaced the worker at its next check, within "
          f"{RESPAWN_CHECK_S} s ({respawned_s:.1f} s)")
    limit = max(RESPAWN_TARGET_S, RESPAWN_CHECK_S + ready_s)
    check(back_s <= limit,
          f"full capacity again within {limit:.0f} s of the kill ({back_s:.1f} s; the target is "
          f"{RESPAWN_TARGET_S} s{', ' if back_s <= RESPAWN_TARGET_S else ', NOT '}met: a worker "
          f"starts in up to {ready_s:.0f} s on this machine now)")
    return back_s


def wait_for_full_capacity(name: str, url: str, before: list[int],
                           killed_at: float) -> tuple[float, float]:
    """Seconds from `killed_at` until as many workers as `before` run again, and until a new one
    has answered a request."""
    deadline = killed_at + 60
    pids = before
    respawned_s = None
    while time.monotonic() < deadline:
        pids = worker_pids(name)
        new = set(pids) - set(before)
        if len(pids) == len(before) and new:
            respawned_s = respawned_s or time.monotonic() - killed_at
            for _ in range(10):  # new connections until the new worker takes one
                if answering_worker(url) in new:
                    return respawned_s, time.monotonic() - killed_at
        time.sleep(0.2)
    raise SystemExit(f"FAILED: a killed worker did not come back within 60 s "
                     f"(workers before: {before}, now: {pids}):\n{container_logs(name)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "smoke"])
    parser.add_argument("--service", choices=[*SERVICES, "both"], default="both",
                        help="which image (default: both CPU images, the classifier first)")
    args = parser.parse_args()
    names = BOTH if args.service == "both" else (args.service,)
    services = [SERVICES[n] for n in names]
    started = time.monotonic()
    results = []
    with docker_engine(keep=args.command == "build") as own_engine:
        local_base = not standard_base_available()
        if local_base:
            log(f"{STANDARD_BASE} cannot be pulled here: building against a local base image")
            build_local_base()
        for service in services:
            image, tag = build_image(service, local_base)
            if args.command == "smoke":
                results.append(smoke(service, image, tag))
    if own_engine and args.command == "build":
        explain_own_engine([f"{s.image}:latest" for s in services])
    for figures in results:
        log(f"{figures['service']}: {figures['image']}, image size: {figures['image_mb']} MB, "
            f"ready in {figures['ready_s']} s, a killed worker back in {figures['respawn_s']} s")
    log(f"{args.command} done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
