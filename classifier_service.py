"""ImageClassifier: the HTTP surface of image classification with ONNX graphs from the model store
(`bentoml serve service:ImageClassifier`).

A request's path, by file: serving/request_log.py (one JSON line when it is answered) ->
serving/admission.py (API key, Content-Type, size, concurrency, the gate, timeout; every refusal
as `{"error", "detail"}`) -> serving/uploads.py (files only) -> serving/inputs.py (routed to a
variant, decoded by serving/preprocess.py while the request is parsed) -> BentoML's adaptive
batcher (or, for a request that finds the model idle, serving/fast_lane.py) ->
serving/predictor.py (serving/runtime.py per variant, features to serving/drift.py,
serving/classification.py's top-k and metrics, a copy to serving/shadow.py) -> JSON
(serving/schemas.py).
Everything about the model comes from its store entry (serving/deployment.py reads it once, at
import); no torch, no torchvision and no training code is imported here.
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType

from serving import settings, wiring
from serving.classification import Classification
from serving.deployment import Deployment, packed_models
from serving.errors import RejectedInput
from serving.inputs import Inputs, refuse_a_job
from serving.schemas import DriftReport, JobItem, ModelInfo, Prediction

SETTINGS, BENTOML_SERVICE_CONFIG = settings.load(settings.CLASSIFIER)
MODELS = packed_models(SETTINGS)
DEPLOYMENT = Deployment.read(SETTINGS, MODELS, task="classification")
TASK = Classification(DEPLOYMENT.card.labels, SETTINGS.response.top_k)
INPUTS = Inputs(DEPLOYMENT, TASK)

# Declaring the media type spares BentoML 1.4.39 from regenerating the output's JSON schema on every
# response to find it (14% of the event loop's time under load, measured with py-spy).
Predictions = Annotated[list[Prediction], ContentType("application/json")]
JobResults = Annotated[list[JobItem], ContentType("application/json")]
# The protocol's answer is written by serving/inference_protocol.py from the tensors per image.
ProtocolAnswers = Annotated[list[Any], ContentType("application/json")]
BATCHING = wiring.batching(SETTINGS)


class ImageClassifier:
    """Image classification with ONNX graphs from the BentoML model store."""

    def __init__(self) -> None:
        self.predictor = DEPLOYMENT.start(TASK)

    def __is_ready__(self) -> bool:
        return self.predictor.check_ready(DEPLOYMENT.card.input)

    @bentoml.api(route="/classify", **BATCHING)
    def classify(self, images: INPUTS.image_uploads) -> Predictions:
        """Classify one or more uploaded images (multipart field `images`, repeat it for
        several). Answers one prediction per image, in upload order."""
        return self.predictor.predict(images)

    @bentoml.api(route="/classify_tensor", **BATCHING)
    def classify_tensor(self, pixels: INPUTS.pixel_tensor) -> Predictions:
        """Classify already-decoded pixels: JSON numbers 0-255 of shape (N, H, W) or
        (N, H, W, C) at the model's input size (see /model_info)."""
        return self.predictor.predict(pixels)

    @bentoml.api(route=INPUTS.protocol.infer_route, **BATCHING)
    def infer(self, inputs: INPUTS.protocol_images) -> ProtocolAnswers:
        """The Open Inference Protocol (KServe v2, Triton): `images` UINT8 [N, H, W, C] (or
        [N, H, W]) as JSON data or binary tensor data, each image of any size, preprocessed as
        an upload is. Also at /v2/models/<name>/versions/<version>/infer; the model's tensors:
        GET /v2/models/<name>. Through the same batcher, limits and metrics as /classify."""
        return self.predictor.predict_tensors(inputs)

    @bentoml.api(route="/model_info")
    def model_info(
        self, context: bentoml.Context
    ) -> Annotated[ModelInfo, ContentType("application/json")]:
        """The model that answers this caller (routing headers apply as on /classify): tag,
        labels, input spec, execution provider, parity, accuracy; and every variant served."""
        index = DEPLOYMENT.router.for_request(context.request)
        card = DEPLOYMENT.served[index].card
        return ModelInfo(**DEPLOYMENT.describe(index, self.predictor.runtimes[index]),
                         parity=card.parity, class_accuracy=card.class_accuracy,
                         top_k=SETTINGS.response.top_k)

    @bentoml.api(route="/drift")
    def drift(
        self, test_now: bool = False
    ) -> Annotated[DriftReport, ContentType("application/json")]:
        """Online drift detection, per served model, in the worker that answers: the kernel MMD
        between the features of its recent images and the training reference, its permutation
        p-value, and the drift flag (p < drift.p_value_threshold). `test_now: true` runs the
        test on the current window instead of returning the last periodic result."""
        return DEPLOYMENT.drift_report(self.predictor.monitors, test_now)

    @bentoml.task(route="/classify_batch")
    def classify_batch(self, images: INPUTS.job_uploads) -> JobResults:
        """An asynchronous job over many images (up to limits.max_images_per_job).
        POST /classify_batch/submit with the same multipart form as /classify answers a
        `task_id` at once; GET /classify_batch/status?task_id=... says when the job is done, and
        GET /classify_batch/get?task_id=... gives one entry per image, in upload order: its
        prediction, or the reason it was refused. Runs beside the batcher, one batch at a time."""
        if refusal := refuse_a_job(len(images), SETTINGS.limits.max_images_per_job):
            return refusal
        results = self.predictor.predict_files(images, DEPLOYMENT.card.input,
                                               SETTINGS.limits.max_image_pixels,
                                               SETTINGS.batching.max_batch_size)
        return [JobItem(file=f.name, error=r.code, detail=str(r)) if isinstance(r, RejectedInput)
                else JobItem(file=f.name, prediction=r) for f, r in zip(images, results)]


ImageClassifier = wiring.as_service(
    ImageClassifier, settings=SETTINGS, bentoml_config=BENTOML_SERVICE_CONFIG, models=MODELS,
    description_file="service.md", version=DEPLOYMENT.served[0].tag,
    protocols=[INPUTS.protocol])
