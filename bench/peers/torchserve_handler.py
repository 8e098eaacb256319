"""The TorchServe handler of peer 4 (bench/peers/torchserve_app.py packs it into the .mar).

TorchServe's own split, preprocess -> inference -> postprocess, over one batch of requests that
its frontend formed; the work inside each step is bench/peers/common.py's, as in the other peers.
The model's files (model.onnx, card.json) travel in the archive: TorchServe extracts them into
the worker's model_dir. bench/ and serving/ come from PYTHONPATH (the repository root)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench.peers.common import load
from serving.classification import to_predictions
from serving.preprocess import decode_image

FIELD = "images"  # the multipart field every server of the bench reads
THREADS = 0  # ONNX Runtime intra-op threads: 0 = one per core, as the other batching peers


class OnnxClassifierHandler:
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.card, self.runtime, self.top_k = load(model_dir, THREADS)

    def preprocess(self, requests: list[dict]) -> tuple[list[float], np.ndarray]:
        # One image per request: TorchServe hands a handler one value per multipart field name.
        started, pixels = [], []
        for request in requests:
            started.append(time.perf_counter())
            pixels.append(decode_image(bytes(request[FIELD]), self.card.input))
        return started, np.stack(pixels)

    def inference(self, pixels: np.ndarray) -> np.ndarray:
        probabilities, _ = self.runtime.run(pixels)
        return probabilities

    def postprocess(self, started: list[float], probabilities: np.ndarray) -> list[bytes]:
        done = time.perf_counter()
        predictions = to_predictions(probabilities, self.card.labels, self.top_k,
                                     [self.card.name] * len(started),
                                     [(done - t) * 1000 for t in started])
        # Bytes, so TorchServe sends them as they are (it json.dumps anything else, indented).
        return [json.dumps([p.model_dump()]).encode() for p in predictions]

    def handle(self, requests: list[dict], context) -> list[bytes]:
        started, pixels = self.preprocess(requests)
        answers = self.postprocess(started, self.inference(pixels))
        for index in range(len(answers)):
            context.set_response_content_type(index, "application/json")
        return answers
