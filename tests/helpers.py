"""Helpers shared by the tests: subprocesses and a real `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 120  # generous for a loaded CI machine; readiness itself is benchmarked


def python(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env or os.environ.copy(),
        capture_output=True, text=True, timeout=timeout,
    )


def saved_tag(training_output: str) -> str:
    """The tag `python -m train_export` prints on its last line: '... | saved name:version in 9s'."""
    line = next(ln for ln in training_output.splitlines() if ln.startswith("held-out accuracy"))
    return line.rsplit("saved ", 1)[1].split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def start_server(
    target: Sequence[str], cwd: Path, log_dir: Path, env: dict | None = None,
    bentoml: Path = BIN / "bentoml", home: Path | None = None,
) -> Iterator[RunningServer]:
    """Run `bentoml serve TARGET` on a free loopback port until it is ready; stop it by its PID.
    `home`: the BentoML home to serve from (default: one sharing the session's store)."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    command = [str(bentoml), "serve", *target, "--host", "127.0.0.1", "--port", str(port)]
    home = home or own_home(log_dir / f"home-{port}")
    env = {**(env or os.environ), "BENTOML_HOME": str(home)}
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_ready(server)
        yield server
    finally:
        stop(process)


def own_home(home: Path) -> Path:
    """A BentoML home that shares the session's store but not its Prometheus directory: each
    `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts, which would
    wipe the metrics of a server already running from the same home."""
    shared = Path(os.environ["BENTOML_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (shared / store).mkdir(parents=True, exist_ok=True)
        (home / store).symlink_to(shared / store, target_is_directory=True)
    return home


def wait_until_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited early:\n{server.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"bentoml serve not ready in {READY_TIMEOUT_S}s:\n{server.log_text()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server we started (it stops its own workers), SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric_samples(metrics_text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {label string: value} for one metric name."""
    samples = {}
    for line in metrics_text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{.*\}})?\s+(\S+)$", line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


def metric_total(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of one metric's samples (over workers) whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metric_samples(metrics_text, name).items()
               if all(w in k for w in wanted))


def multipart_body(files: list[tuple[str, bytes, str]], field: str = "images") -> tuple[bytes, str]:
    """A multipart/form-data body of file parts (filename, bytes, content type)."""
    boundary = "----hardening-test-boundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
        for name, data, kind in files
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def open_request(url: str, path: str, headers: dict[str, str], first_bytes: bytes = b"",
                 ) -> socket.socket:
    """Send a request's head (and optionally the start of its body) on a raw socket, and
    leave it open: the way a slow client, or one caught mid-upload, looks to the server."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + first_bytes)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    import http.client

    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def write_config(path: Path, image_classifier: dict, **service_keys) -> Path:
    """A configuration file like configuration.yaml: BentoML's keys for the service, and ours."""
    import yaml

    block = {"metrics": {"enabled": True}, **service_keys, "image_classifier": image_classifier}
    path.write_text(yaml.safe_dump({"services": {"ImageClassifier": block}}))
    return path
