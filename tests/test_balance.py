"""Connection balance in a real two-worker `bentoml serve` (serving/balance.py): keep-alive
connections end up spread over the workers, however they were accepted, and every answer on a
connection asked to close is whole (the client reconnects for its next request). No assertion
depends on latency."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.helpers import (
    ROOT,
    RunningServer,
    metric_samples,
    multipart_body,
    start_server,
    write_config,
)

pytestmark = pytest.mark.e2e

WORKERS, CONNECTIONS, ROUNDS = 2, 8, 200
BARRIER_TIMEOUT_S = 300  # a client that fails leaves the others waiting no longer than this
IMAGE = (ROOT / "examples" / "digit_7_00.png").read_bytes()


@pytest.fixture(scope="module")
def two_workers(trained_model: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("balance")
    config = write_config(directory / "balance.yaml", {}, workers=WORKERS)
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=directory,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        yield server


def test_keep_alive_connections_end_up_spread_over_the_workers(two_workers) -> None:
    """Clients that keep both workers busy (one thread per connection, each sending its next
    request when the last is answered): a worker that holds more than its share asks some
    clients to reconnect, and the reconnections go to the less busy worker. With one request at
    a time in the whole server there is nothing to balance: either worker answers at once.
    Where the connections are is read from the kernel (each worker's established sockets) while
    every client still holds its connection open, and from the service's own metric."""
    address = urlsplit(two_workers.url)
    body, content_type = multipart_body([("seven.png", IMAGE, "image/png")])
    done, counted = (threading.Barrier(CONNECTIONS + 1, timeout=BARRIER_TIMEOUT_S)
                     for _ in range(2))

    def client() -> tuple[list[int], int]:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        statuses, asked_to_close = [], 0
        try:
            for _ in range(ROUNDS):  # http.client opens a new connection after a close
                connection.request("POST", "/classify", body, {"Content-Type": content_type})
                response = connection.getresponse()
                answer = response.read()
                statuses.append(response.status if b"top_k" in answer else -response.status)
                asked_to_close += response.getheader("connection", "") == "close"
            done.wait()  # the connection stays open until the workers' sockets are counted
            counted.wait()
        finally:
            connection.close()
        return statuses, asked_to_close

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        runs = pool.map(lambda _: client(), range(CONNECTIONS))
        try:
            done.wait()
            sockets = established_by_worker(two_workers.process.pid, address.port)
            held = metric_samples(httpx.get(f"{two_workers.url}/metrics", timeout=30).text,
                                  "image_classifier_worker_connections")
            counted.wait()
        except BaseException:  # the clients' waits end too (BrokenBarrierError)
            done.abort()
            counted.abort()
            raise
        runs = list(runs)
    statuses = {status for run, _ in runs for status in run}
    asked_to_close = sum(closed for _, closed in runs)
    assert statuses == {200}, f"every answer whole: {sorted(statuses)}"
    assert len(sockets) == WORKERS and sum(sockets) == CONNECTIONS, sockets
    assert max(sockets) - min(sockets) <= 2, (
        f"{CONNECTIONS} connections over {WORKERS} workers: {sockets} "
        f"({asked_to_close} answers asked their client to reconnect)")
    # The workers' own count may include the connection of the /metrics request that reads it.
    assert len(held) == WORKERS and max(held.values()) - min(held.values()) <= 3, (
        f"what the workers count: {held}")


def established_by_worker(server_pid: int, port: int) -> list[int]:
    """Each worker process's established connections on the service's port."""
    by_worker = []
    for worker in psutil.Process(server_pid).children(recursive=True):
        sockets = worker.connections(kind="tcp")  # psutil 5's name for net_connections
        if any(c.status == psutil.CONN_LISTEN for c in sockets):
            by_worker.append(sum(1 for c in sockets if c.status == psutil.CONN_ESTABLISHED
                                 and c.laddr.port == port))
    return by_worker
