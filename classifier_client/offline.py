"""`offline`: the stored model over a folder in this process, no server: bulk jobs on a machine
with the model store. Same preprocessing, runtime and output rows as the service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.classification import to_predictions
from serving.contract import ONNX_FILE, ModelCard
from serving.errors import RejectedInput
from serving.preprocess import decode_image
from serving.runtime import OnnxRuntime

from .files import Output, images_in, row

BATCH = 64


def classify_folder_offline(tag: str, folder: Path, out: Path, *, max_pixels: int = 40_000_000,
                            providers: tuple[str, ...] = ("cuda", "cpu")) -> tuple[int, int]:
    import bentoml

    stored = bentoml.models.get(tag)
    card = ModelCard.read(Path(stored.path))
    card.verify(Path(stored.path), str(stored.tag))
    runtime = OnnxRuntime(Path(stored.path_of(ONNX_FILE)), card.input, card.graph,
                          providers=list(providers), intra_op_threads=0)
    answered = 0
    with Output(out) as output:
        todo = [p for p in images_in(folder) if str(p) not in output.done]
        for start in tqdm(range(0, len(todo), BATCH), unit="batch"):
            decoded: list[tuple[Path, np.ndarray]] = []
            for path in todo[start:start + BATCH]:
                try:
                    decoded.append((path, decode_image(path, card.input, max_pixels)))
                except RejectedInput as exc:
                    output.fail(path, f"{exc.code}: {exc}")
            if not decoded:
                continue
            probabilities, _ = runtime.run(np.stack([pixels for _, pixels in decoded]))
            answers = to_predictions(probabilities, card.labels, 1,
                                     [str(stored.tag)] * len(decoded), [0.0] * len(decoded))
            for (path, _), answer in zip(decoded, answers):
                output.write(row(path, answer.model_dump()))
                answered += 1
    return answered, output.failures
