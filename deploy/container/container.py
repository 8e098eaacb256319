"""Build the service's container image and check it the way a user runs it.

  python deploy/container/container.py build   # make container
  python deploy/container/container.py smoke   # make container-smoke: build, run, check, clean up

`build` is `bentoml build` + `bentoml containerize` with the shipped bentofile.yaml. Where the
standard base image cannot be pulled (no Docker Hub, as on this project's CI), it builds a local
Debian base with debootstrap and builds the bento against it through
deploy/container/bentofile.local-base.yaml instead; bentofile.yaml stays the standard one.

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
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script (`make container`): devtools is at the root
from devtools.processes import NotReadyError, free_port, stop_tree, wait_until_ready  # noqa: E402

WORK = ROOT / "build" / "docker"
BIN = Path(sys.executable).parent
IMAGE = "image-classifier"
LOCAL_BASE = "image-classifier-base:bookworm-r2"  # bump r when build_local_base changes
STANDARD_BASE = "python:3.11-slim"  # what BentoML's Dockerfile starts from for python_version 3.11
EXAMPLE = ROOT / "examples" / "digit_7_00.png"
READY_TIMEOUT_S = 180


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


def build_image() -> tuple[str, str]:
    """(image, bento tag): `bentoml build` + `bentoml containerize`."""
    bentofile = ROOT / "bentofile.yaml"
    if not standard_base_available():
        log(f"{STANDARD_BASE} cannot be pulled here: building against a local base image")
        build_local_base()
        bentofile = ROOT / "deploy" / "container" / "bentofile.local-base.yaml"
    built = run(str(BIN / "bentoml"), "build", "-f", str(bentofile), "--output", "tag",
                capture=True)
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    image = f"{IMAGE}:{tag.split(':')[1]}"
    log(f"containerizing {tag} as {image}")
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # no buildx in Debian's docker.io
    started = time.monotonic()
    run(str(BIN / "bentoml"), "containerize", tag, "-t", image, "-t", f"{IMAGE}:latest",
        "--opt", "network=host", env=env)  # the build's RUN steps reach the package index
    log(f"built {image} in {time.monotonic() - started:.0f} s")
    return image, tag


# --- the checks -------------------------------------------------------------------------------

def smoke(image: str, tag: str) -> dict:
    """Run the image as a user does and check it; returns the figures for the report."""
    port = free_port()
    name = f"image-classifier-smoke-{os.getpid()}"
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "-e", f"BENTOML_PORT={port}",
           "-e", "BENTOML_HOST=127.0.0.1", image)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_for_container(url, name, started)
        figures = {"image": image, "ready_s": round(ready_s, 1),
                   "image_mb": round(int(docker("image", "inspect", "-f", "{{.Size}}", image)
                                         .stdout.strip()) / 2**20)}
        check_prediction(url)
        check_model_tag(url, tag)
        check_runs_as_non_root(name)
        check_no_training_code(name)
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


def check_prediction(url: str) -> None:
    files = [("images", (EXAMPLE.name, EXAMPLE.read_bytes(), "image/png"))]
    answer = httpx.post(f"{url}/classify", files=files, timeout=30)
    check(answer.status_code == 200 and answer.json()[0]["label"] == "7",
          f"{EXAMPLE.name} is classified as 7 ({answer.text[:200]})")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "smoke"])
    args = parser.parse_args()
    started = time.monotonic()
    with docker_engine():
        image, tag = build_image()
        if args.command == "smoke":
            smoke(image, tag)
    log(f"{args.command} done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
