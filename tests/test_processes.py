"""devtools.processes, the process helper of the tests, the benchmarks and the container script:
a free port, waiting for an answer, and stopping a process tree we started (a stdlib HTTP server
and `sleep` stand in for the servers)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from devtools.processes import (
    NotReadyError,
    ephemeral_ports,
    free_port,
    stop_tree,
    wait_until_ready,
)

# A parent that starts a child and prints its PID; with "ignore" it then ignores SIGTERM.
PARENT = """
import signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(child.pid, flush=True)
time.sleep(600)
"""


class Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering_url() -> Iterator[str]:
    """A URL on 127.0.0.1 that answers 200."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/readyz"
    finally:
        server.shutdown()
        server.server_close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_free_port_can_be_bound() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_a_free_port_is_never_one_the_system_hands_out_for_port_0() -> None:
    """What BentoML binds to port 0 as it starts cannot take the port chosen for its server."""
    low, high = ephemeral_ports()
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= port < low for port in ports), sorted(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert low <= sock.getsockname()[1] <= high


def test_waiting_ends_when_the_url_answers(answering_url: str) -> None:
    assert wait_until_ready(answering_url, alive=lambda: True, timeout_s=30) >= 0


def test_waiting_stops_as_soon_as_the_process_has_exited() -> None:
    with pytest.raises(NotReadyError, match="exited"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}/", alive=lambda: False, timeout_s=600)


def test_waiting_gives_up_after_the_timeout() -> None:
    with pytest.raises(NotReadyError, match="within 0.1 s"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}/", alive=lambda: True, timeout_s=0.1,
                         interval_s=0.01)


@pytest.mark.parametrize("on_sigterm", ["exit", "ignore"])
def test_stopping_ends_the_process_and_what_it_started(on_sigterm: str) -> None:
    """With "exit" the parent leaves its child behind (as LitServe does); "ignore" needs SIGKILL."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, on_sigterm], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        stop_tree(parent, timeout_s=1)
        assert parent.returncode is not None, "the parent is still running"
        assert gone(child), f"its child {child} is still running"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_a_process_that_has_exited_is_left_alone() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    stop_tree(process)  # its PID may belong to another process by now: nothing is signalled
    assert process.returncode == 0
