"""ImageClassifier: a BentoML service that classifies images with an ONNX graph from the model store.

A request's path: upload -> `serving.preprocess.decode_image` (per request, while it is being
parsed, so decoding runs beside the batch that is running, not behind it) -> BentoML's adaptive
batcher -> `serving.runtime.OnnxRuntime` (one call per batch) -> `serving.postprocess` -> JSON.
No torch, no torchvision and no training code is imported here: the store entry's card.json says
everything the service needs to know about the model.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import NotFound
from bentoml.validators import ContentType
from PIL import Image
from pydantic import AfterValidator, Field, ValidatorFunctionWrapHandler, WrapValidator

from serving import settings as configuration
from serving.contract import ONNX_FILE, ModelCard
from serving.postprocess import to_predictions
from serving.preprocess import decode_image, pillow_errors_as_invalid_image, validate_tensor
from serving.runtime import OnnxRuntime, gpu_available
from serving.schemas import ModelInfo, Prediction

logger = logging.getLogger("bentoml.image_classifier")

SETTINGS, BENTOML_SERVICE_CONFIG = configuration.load()
MODEL = bentoml.models.BentoModel(SETTINGS.model.tag)


def read_model_card() -> ModelCard:
    stored = MODEL.stored
    if stored is None:
        raise NotFound(
            f"model {SETTINGS.model.tag!r} is not in the BentoML model store: train and export "
            "it with `make train` (or `python -m train_export`), or set image_classifier.model.tag "
            "in configuration.yaml to a tag that `bentoml models list` shows."
        )
    card = ModelCard.read(Path(stored.path))
    card.verify(Path(stored.path), str(stored.tag))  # a damaged entry stops startup here
    return card


CARD = read_model_card()
INPUT = CARD.input


@dataclass(frozen=True, slots=True)
class Pixels:
    """One image, preprocessed to the model's input, and when the server received it."""

    array: np.ndarray
    received_at: float


def _decode_upload(upload: Any, open_upload: ValidatorFunctionWrapHandler) -> Pixels:
    """Runs while BentoML parses the request: a bad image fails only its own request (400)."""
    received_at = time.perf_counter()
    with pillow_errors_as_invalid_image():
        image = open_upload(upload)  # BentoML's PIL.Image.open on the spooled upload (lazy)
    return Pixels(decode_image(image, INPUT, SETTINGS.limits.max_image_pixels), received_at)


def _validate_tensor(array: np.ndarray) -> list[Pixels]:
    received_at = time.perf_counter()
    return [Pixels(image, received_at) for image in validate_tensor(array, INPUT)]


ImageUpload = Annotated[Image.Image, WrapValidator(_decode_upload)]
PixelTensor = Annotated[
    np.ndarray,
    AfterValidator(_validate_tensor),
    Field(
        description=f"uint8 pixels, shape (N, {INPUT.height}, {INPUT.width}"
        + (")" if INPUT.channels == 1 else f", {INPUT.channels})"),
        examples=[np.zeros((1, INPUT.height, INPUT.width), dtype=int).tolist()]
        if INPUT.channels == 1
        else None,
    ),
]

# Declaring the media type spares BentoML 1.4.39 from regenerating the output's JSON schema on every
# response to find it (14% of the event loop's time under load, measured with py-spy).
Predictions = Annotated[list[Prediction], ContentType("application/json")]

BATCHING = dict(
    batchable=True,
    max_batch_size=SETTINGS.batching.max_batch_size,
    max_latency_ms=SETTINGS.batching.max_latency_ms,
)


@bentoml.service(**BENTOML_SERVICE_CONFIG)
class ImageClassifier:
    """Image classification with an ONNX graph from the BentoML model store."""

    model = MODEL

    def __init__(self) -> None:
        self.card = CARD
        self.tag = str(self.model.tag)
        self.runtime = OnnxRuntime(
            Path(self.model.path_of(ONNX_FILE)),
            self.card.input,
            self.card.graph,
            providers=SETTINGS.model.providers,
            intra_op_threads=SETTINGS.model.intra_op_threads,
        )
        logger.info("Serving %s on %s", self.tag, self.runtime.active_provider)

    def __is_ready__(self) -> bool:
        # __init__ has loaded the graph and run a warm-up batch by the time this is asked.
        return self.runtime is not None

    @bentoml.api(route="/classify", **BATCHING)
    def classify(self, images: list[ImageUpload]) -> Predictions:
        """Classify one or more uploaded images (multipart field `images`, repeat it for
        several). Answers one prediction per image, in upload order."""
        return self._predict(images)

    @bentoml.api(route="/classify_tensor", **BATCHING)
    def classify_tensor(self, pixels: PixelTensor) -> Predictions:
        """Classify already-decoded pixels: JSON numbers 0-255 of shape (N, H, W) or
        (N, H, W, C) at the model's input size (see /model_info)."""
        return self._predict(pixels)

    @bentoml.api(route="/model_info")
    def model_info(self) -> Annotated[ModelInfo, ContentType("application/json")]:
        """The served model: tag, labels, input spec, execution provider, parity, accuracy."""
        return ModelInfo(
            tag=self.tag,
            architecture=self.card.architecture,
            labels=self.card.labels,
            input=self.card.input,
            active_provider=self.runtime.active_provider,
            providers=self.runtime.providers,
            gpu_available=gpu_available(),
            parity=self.card.parity,
            accuracy=self.card.accuracy,
            lineage=self.card.lineage,
            max_batch_size=SETTINGS.batching.max_batch_size,
            max_latency_ms=SETTINGS.batching.max_latency_ms,
            top_k=SETTINGS.response.top_k,
        )

    def _predict(self, batch: list[Pixels]) -> list[Prediction]:
        """One adaptive batch (images from many requests) -> one runtime call."""
        probabilities, _features = self.runtime.run(np.stack([p.array for p in batch]))
        done = time.perf_counter()
        return to_predictions(
            probabilities,
            self.card.labels,
            SETTINGS.response.top_k,
            self.tag,
            [(done - p.received_at) * 1000.0 for p in batch],
        )
