"""The processes the tests, the benchmarks and the container script start: a free loopback port
for them, waiting until they answer, and stopping them with everything they started.

One module for tests/helpers.py, bench/servers.py and deploy/container/container.py. It needs
httpx and psutil, both dependencies of bentoml, so it runs wherever the project's venv does.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

LOOPBACK = "127.0.0.1"


class NotReadyError(RuntimeError):
    """The process exited, or did not answer in time; the caller adds its log."""


def ephemeral_ports() -> tuple[int, int]:
    """The range the system takes a port from when a program binds port 0 (Linux's setting,
    else its default)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now, chosen below the system's ephemeral range.
    Why not port 0: the port is free when chosen and bound by the server a moment later, and
    meanwhile anything that binds port 0 may be given the same one; BentoML does that for its
    own sockets as it starts (a `make bench` run lost a server when circus bound its control
    socket to the port the bench had chosen for HTTP). Below the range, only a program that
    chose its port as this one does can take it."""
    low, _ = ephemeral_ports()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), max(1025, low))
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue  # in use (or still closing): try another
            return port
    with socket.socket() as sock:  # nothing free below the range: the system's choice
        sock.bind((LOOPBACK, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def wait_until_ready(url: str, alive: Callable[[], bool], timeout_s: float,
                     interval_s: float = 0.25) -> float:
    """Seconds until GET `url` answers 200. Raises NotReadyError as soon as `alive()` is False (the
    process exited: nothing will answer) or after `timeout_s`."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet, or busy starting
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        if not alive():
            raise NotReadyError(f"{url}: the process exited before it answered")
        if time.monotonic() - started > timeout_s:
            raise NotReadyError(f"{url} did not answer 200 within {timeout_s:g} s")
        time.sleep(interval_s)


def stop_tree(process: subprocess.Popen[Any], timeout_s: float = 30) -> None:
    """Stop a process we started and every process it started: SIGTERM to it (a server stops its
    own workers), SIGKILL if it is still running after `timeout_s`; then the same to each of its
    descendants still running (LitServe's workers outlive their parent). The descendants are
    listed before the first signal, while they are its children, so nothing else is signalled;
    psutil checks that a PID was not reused before it signals one."""
    if process.poll() is not None:
        return  # exited and reaped: its PID may already belong to a process we did not start
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    left = [child for child in descendants if alive(child)]
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    left = wait_gone(left, timeout_s)
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    wait_gone(left, timeout_s)  # SIGKILL cannot be ignored: gone when this returns


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie: an exited descendant its new parent has not reaped yet."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still alive after at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
