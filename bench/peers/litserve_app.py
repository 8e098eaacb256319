"""Peer 2: LitServe with dynamic batching (decode per request, one runtime call per batch)."""

from __future__ import annotations

import time

import litserve as ls
import numpy as np

from bench.peers.common import load, parse_args
from serving.classification import to_predictions
from serving.preprocess import decode_image


class OnnxClassifierAPI(ls.LitAPI):
    def __init__(self, model_dir, threads: int, **kwargs) -> None:
        super().__init__(api_path="/classify", **kwargs)
        self.model_dir, self.threads = model_dir, threads

    def setup(self, device) -> None:
        self.card, self.runtime, self.top_k = load(self.model_dir, self.threads)

    def decode_request(self, request):
        upload = request["images"]
        return time.perf_counter(), decode_image(upload.file.read(), self.card.input)

    def batch(self, inputs):
        return [t for t, _ in inputs], np.stack([pixels for _, pixels in inputs])

    def predict(self, batch):
        started, pixels = batch
        probabilities, _ = self.runtime.run(pixels)
        done = time.perf_counter()
        return to_predictions(probabilities, self.card.labels, self.top_k,
                              [self.card.name] * len(started), [(done - t) * 1000 for t in started])

    def unbatch(self, output):
        return list(output)

    def encode_response(self, prediction):
        return [prediction.model_dump()]


if __name__ == "__main__":
    args = parse_args({"max_batch_size": int, "batch_timeout": float, "api_servers": int,
                       "workers_per_device": int, "threads": int})
    api = OnnxClassifierAPI(args.model_dir, threads=args.threads or 0,
                            max_batch_size=args.max_batch_size or 64,
                            batch_timeout=args.batch_timeout if args.batch_timeout is not None
                            else 0.005)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers_per_device or 1,
                          timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers or 1,
               generate_client_file=False, log_level="warning")
