"""Helpers shared by the tests: subprocesses, a real `bentoml serve` on 127.0.0.1, `bentoml
build`, asynchronous jobs, Prometheus text, raw HTTP, and raw ASGI calls for the middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.processes import NotReadyError, free_port, stop_tree, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 120  # generous for a loaded CI machine; readiness itself is benchmarked
JOB_TIMEOUT_S = 120
# A port found free can be taken before `bentoml serve` binds it (on a machine shared with other
# servers and clients): then a new port, this many times in all.
BIND_ATTEMPTS = 3


class E2EGuard:
    """Whether the test being set up is marked e2e (tests/conftest.py sets it before any of its
    fixtures run). The helpers that start a server or train a model refuse to run otherwise:
    `make test-fast` leaves e2e tests out, and must stay fast."""

    allowed = True  # outside a pytest run (a REPL, a script) nothing is refused

    @classmethod
    def require(cls, what: str) -> None:
        if not cls.allowed:
            pytest.fail(f"this test runs {what}: mark it `@pytest.mark.e2e` (or its module "
                        "`pytestmark = pytest.mark.e2e`), see pytest.ini", pytrace=False)


def python(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300):
    if args[0] == "-m" and args[1].split(".")[0] == "train_export":
        E2EGuard.require("the training CLI (`python -m train_export`)")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env or os.environ.copy(),
        capture_output=True, text=True, timeout=timeout,
    )


def saved_tag(training_output: str) -> str:
    """The tag `python -m train_export` prints on its last line:
    '... | saved name:version in 9s'."""
    line = next(ln for ln in training_output.splitlines()
                if ln.startswith(("held-out accuracy", "held-out mAP")))
    return line.rsplit("saved ", 1)[1].split()[0]


def bentoml_build(cwd: Path, *args: str) -> str:
    """`bentoml build` in `cwd` (with `args`, e.g. `-f FILE`); the tag it printed, name:version."""
    E2EGuard.require("`bentoml build`")
    result = subprocess.run([str(BIN / "bentoml"), "build", *args, "--output", "tag"], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"bentoml build failed:\n{result.stderr}"
    # `--output tag` prints `__tag__:name:version` as its last line.
    return result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def wait_for_job(url: str, task_id: str, headers: dict[str, str] | None = None,
                 timeout_s: float = JOB_TIMEOUT_S, route: str = "/classify_batch") -> str:
    """Poll `<route>/status` until the job is no longer in progress; its last status
    ("completed", "failed", or still "in_progress" after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.get(f"{url}{route}/status", params={"task_id": task_id},
                           headers=headers, timeout=30).json()["status"]
        if status != "in_progress" or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def start_server(
    target: Sequence[str], cwd: Path, log_dir: Path, env: dict | None = None,
    bentoml: Path = BIN / "bentoml", home: Path | None = None,
) -> Iterator[RunningServer]:
    """Run `bentoml serve TARGET` on a free loopback port until it is ready; stop it and its
    workers after. `home`: the BentoML home to serve from (default: one sharing the session's
    store)."""
    E2EGuard.require("`bentoml serve`")
    for attempt in range(1, BIND_ATTEMPTS + 1):
        server = launch(target, cwd, log_dir, env, bentoml, home)
        try:
            wait_until_ready(f"{server.url}/readyz", server.running, READY_TIMEOUT_S)
            break
        except NotReadyError as exc:
            stop_tree(server.process)
            if attempt < BIND_ATTEMPTS and "Address already in use" in server.log_text():
                continue
            raise RuntimeError(f"bentoml serve: {exc}\n{server.log_text()}") from None
        except BaseException:
            stop_tree(server.process)
            raise
    try:
        yield server
    finally:
        stop_tree(server.process)


def launch(target: Sequence[str], cwd: Path, log_dir: Path, env: dict | None, bentoml: Path,
           home: Path | None) -> RunningServer:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    command = [str(bentoml), "serve", *target, "--host", "127.0.0.1", "--port", str(port)]
    home = home or own_home(log_dir / f"home-{port}")
    env = {**(env or os.environ), "BENTOML_HOME": str(home)}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return RunningServer(f"http://127.0.0.1:{port}", process, log)


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


# --- raw ASGI calls, for the middlewares' unit tests ---------------------------------------------

@dataclass
class AsgiAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(path: str = "/classify", method: str = "POST",
               headers: dict[str, str] | None = None) -> dict[str, Any]:
    """An ASGI HTTP scope; header names are sent in lower case, as servers do."""
    return {"type": "http", "method": method, "path": path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}


async def call_asgi(app: Callable[..., Awaitable[None]], scope: dict[str, Any],
                    chunks: Sequence[bytes] = (b"",)) -> AsgiAnswer:
    """One request through an ASGI app: the body in `chunks`, then a disconnect; its answer."""
    pending = list(chunks)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not pending:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start", f"no answer started: {sent}"
    start, *bodies = sent
    return AsgiAnswer(start["status"],
                      {k.decode().lower(): v.decode() for k, v in start.get("headers", [])},
                      b"".join(m.get("body", b"") for m in bodies))


def run_asgi(app: Callable[..., Awaitable[None]], scope: dict[str, Any],
             chunks: Sequence[bytes] = (b"",)) -> AsgiAnswer:
    """call_asgi in an event loop of its own."""
    return asyncio.run(call_asgi(app, scope, chunks))
