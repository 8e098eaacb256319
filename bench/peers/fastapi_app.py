"""Peer 1: FastAPI + uvicorn, one request at a time, batch size 1 (the usual tutorial server)."""

from __future__ import annotations

import time

import uvicorn
from fastapi import FastAPI, UploadFile

from bench.peers.common import load, parse_args
from serving.classification import to_predictions
from serving.preprocess import decode_image


def create_app(model_dir) -> FastAPI:
    card, runtime, top_k = load(model_dir)
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/classify")
    async def classify(images: list[UploadFile]) -> list[dict]:
        # `async def` with blocking work inside: the event loop serves one request at a time.
        answers = []
        for upload in images:
            started = time.perf_counter()
            pixels = decode_image(await upload.read(), card.input)
            probabilities, _ = runtime.run(pixels[None])
            elapsed = (time.perf_counter() - started) * 1000
            answers += [p.model_dump() for p in
                        to_predictions(probabilities, card.labels, top_k, [card.name], [elapsed])]
        return answers

    return app


if __name__ == "__main__":
    args = parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")
