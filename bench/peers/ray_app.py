"""Peer 3: Ray Serve 2.60 in throughput-optimized mode, dynamic batching (@serve.batch).

Runs from its own venv (build/peers/ray-venv, requirements/peers-ray.txt; bench/peers/venvs.py
creates it). Knobs, each Ray Serve's documented one:

- RAY_SERVE_THROUGHPUT_OPTIMIZED=1: Ray 2.56+'s "high throughput" mode (the replica serves HTTP
  itself, gRPC between proxy and replica, request-path logs buffered, the GC frozen after start,
  user code on the replica's event loop).
- RAY_SERVE_ENABLE_HA_PROXY left off, the one documented knob not used: it puts HAProxy in front
  and forces every replica's HTTP port onto all interfaces; this bench binds loopback only.
- 1 replica; max_ongoing_requests 256: the default (5) lets no more than 5 requests into the
  replica, so no batch could be larger than 5.
- @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02), one batch at a time; decode per
  request on the replica's event loop, the batch's runtime call in a thread (ONNX Runtime
  releases the GIL, so the next requests decode meanwhile).
- ONNX Runtime: one thread per core (threads 0), as the LitServe peer's default.
- Access log off (as this project's server ships), Serve's own logs at WARNING.

Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 puts the node address on 127.0.0.1, the proxy
binds 127.0.0.1, and the replica's inter-deployment gRPC server, which ray/serve/_private/
replica.py binds to a hard-coded "[::]:0", is moved to 127.0.0.1 by `loopback_grpc()`. Ray keeps
its session (sockets, logs) under --temp-dir, and `ray.shutdown()` on SIGTERM stops the processes
this driver started; bench/servers.py then stops whatever of its tree is left.
"""

import asyncio
import os
import secrets
import signal
import threading
import time
from pathlib import Path

# Read when Ray's modules are imported, here and in every Ray process this driver starts (they
# inherit its environment): set before the first `import ray`.
ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1, not the host's
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report (nothing is reachable here anyway)
    # Ray's default token authentication, with this run's token in the environment: by default
    # ray.init() writes one to ~/.ray/auth_token, outside the bench's directories.
    "RAY_AUTH_MODE": "token",
}
os.environ.update(ENVIRONMENT)
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from fastapi import FastAPI, UploadFile  # noqa: E402
from ray import serve  # noqa: E402

from bench.peers.common import load, parse_args  # noqa: E402
from serving.classification import to_predictions  # noqa: E402
from serving.preprocess import decode_image  # noqa: E402

MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.02
MAX_ONGOING_REQUESTS = 256
THREADS = 0  # ONNX Runtime intra-op threads: 0 = one per core

app = FastAPI()


def loopback_grpc() -> None:
    """Bind the replica's inter-deployment gRPC server to 127.0.0.1 instead of every address.

    Ray 2.60 hard-codes "[::]:0" in ReplicaBase._on_initialized and offers no setting for it.
    Patched at run time in the replica's process (this runs in the deployment's constructor,
    which Ray calls before _on_initialized), rather than by editing the installed file, so that
    the venv stays as pip made it and a Ray upgrade fails loudly here instead of silently."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def add_port(server, address: str) -> int:
        if address != "[::]:0":
            raise RuntimeError(f"ray/serve/_private/replica.py binds {address!r} now: check "
                               "bench/peers/ray_app.py's loopback_grpc against this Ray")
        return int(bind(server, "127.0.0.1:0"))

    add_port.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class Classifier:
    def __init__(self, model_dir: str) -> None:
        loopback_grpc()
        self.card, self.runtime, self.top_k = load(Path(model_dir), THREADS)

    @app.get("/health")
    async def health(self) -> dict:
        return {"ok": True}

    @app.post("/classify")
    async def classify(self, images: list[UploadFile]) -> list[dict]:
        # Decoded here, one request at a time on the event loop; batched for the runtime.
        started = time.perf_counter()
        pixels = [decode_image(await upload.read(), self.card.input) for upload in images]
        answers = await asyncio.gather(*(self.predict((started, p)) for p in pixels))
        return [answer.model_dump() for answer in answers]

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def predict(self, items: list[tuple[float, np.ndarray]]) -> list:
        probabilities, _ = await asyncio.to_thread(
            self.runtime.run, np.stack([pixels for _, pixels in items]))
        done = time.perf_counter()
        return to_predictions(probabilities, self.card.labels, self.top_k,
                              [self.card.name] * len(items),
                              [(done - started) * 1000 for started, _ in items])


def main() -> None:
    args = parse_args({"temp_dir": Path})
    # address="local": always a new Ray instance of our own, never one found on the machine.
    ray.init(address="local", include_dashboard=False, _temp_dir=str(args.temp_dir.resolve()),
             logging_level="warning", log_to_driver=False)
    # After ray.init, which installs a handler that only logs SIGTERM and dies (leaving Ray's
    # agents running): ours shuts Ray down, which stops every process this driver started.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                    logging_config={"enable_access_log": False, "log_level": "WARNING"})
        serve.run(Classifier.bind(str(args.model_dir.resolve())), blocking=False)
        while not stop.wait(1):
            pass
    finally:
        # Not serve.shutdown() first: it waits up to 30 s for the controller on a busy machine,
        # and ray.shutdown() stops the controller, proxy and replica with everything else.
        ray.shutdown()


if __name__ == "__main__":
    main()
