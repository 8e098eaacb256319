"""ImageClassifier: the HTTP surface of image classification with ONNX graphs from the model store.

A request's path, by file: serving/request_log.py (one JSON line when it is answered) ->
serving/admission.py (API key, Content-Type, size, concurrency, timeout; every refusal as
`{"error", "detail"}`) -> serving/uploads.py (files only) -> serving/inputs.py (routed to a
variant, decoded by serving/preprocess.py while the request is parsed) -> BentoML's adaptive
batcher -> serving/predictor.py (serving/runtime.py per variant, features to serving/drift.py,
serving/classification.py's top-k and metrics, a copy to serving/shadow.py) -> JSON
(serving/schemas.py).
Everything about the model comes from its store entry (serving/deployment.py reads it once, at
import); no torch, no torchvision and no training code is imported here.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from starlette.responses import Response

from serving import middleware, settings
from serving.classification import Classification
from serving.deployment import Deployment, packed_models
from serving.errors import STATUS, RejectedInput, error_body
from serving.inputs import Inputs, check_image_count
from serving.openapi import described_service
from serving.runtime import gpu_available
from serving.schemas import DriftReport, DriftStatus, JobItem, ModelInfo, Prediction, VariantInfo

SETTINGS, BENTOML_SERVICE_CONFIG = settings.load(settings.CLASSIFIER)
MODELS = packed_models(SETTINGS)
DEPLOYMENT = Deployment.read(SETTINGS, MODELS)
TASK = Classification(DEPLOYMENT.card.labels, SETTINGS.response.top_k)
INPUTS = Inputs(DEPLOYMENT, TASK)

# Declaring the media type spares BentoML 1.4.39 from regenerating the output's JSON schema on every
# response to find it (14% of the event loop's time under load, measured with py-spy).
Predictions = Annotated[list[Prediction], ContentType("application/json")]
JobResults = Annotated[list[JobItem], ContentType("application/json")]
BATCHING = {"batchable": True, "max_batch_size": SETTINGS.batching.max_batch_size,
            "max_latency_ms": SETTINGS.batching.max_latency_ms}


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

    @bentoml.api(route="/model_info")
    def model_info(
        self, context: bentoml.Context
    ) -> Annotated[ModelInfo, ContentType("application/json")]:
        """The model that answers this caller (routing headers apply as on /classify): tag,
        labels, input spec, execution provider, parity, accuracy; and every variant served."""
        index, _ = DEPLOYMENT.router.for_request(context.request)
        entry, runtime = DEPLOYMENT.served[index], self.predictor.runtimes[index]
        card = entry.card
        return ModelInfo(
            tag=entry.tag, architecture=card.architecture, labels=card.labels, input=card.input,
            active_provider=runtime.active_provider, providers=runtime.providers,
            gpu_available=gpu_available(), parity=card.parity, accuracy=card.accuracy,
            class_accuracy=card.class_accuracy, lineage=card.lineage,
            variants=[VariantInfo(tag=e.tag, weight=v.weight)
                      for v, e in zip(DEPLOYMENT.variants, DEPLOYMENT.served)],
            shadow=DEPLOYMENT.shadow.tag if DEPLOYMENT.shadow else None,
            max_batch_size=SETTINGS.batching.max_batch_size,
            max_latency_ms=SETTINGS.batching.max_latency_ms, top_k=SETTINGS.response.top_k,
        )

    @bentoml.api(route="/drift")
    def drift(
        self, test_now: bool = False
    ) -> Annotated[DriftReport, ContentType("application/json")]:
        """Online drift detection, per served model, in the worker that answers: the kernel MMD
        between the features of its recent images and the training reference, its permutation
        p-value, and the drift flag (p < drift.p_value_threshold). `test_now: true` runs the
        test on the current window instead of returning the last periodic result."""
        monitors = self.predictor.monitors
        states = [m.test_now() if test_now else m.state() for m in monitors if m is not None]
        return DriftReport(
            enabled=SETTINGS.drift.enabled,
            models=[DriftStatus(**asdict(state)) for state in states],
            without_reference=[e.tag for e, m in zip(DEPLOYMENT.served, monitors)
                               if m is None and e.card.drift_reference is None],
        )

    @bentoml.task(route="/classify_batch")
    def classify_batch(self, images: INPUTS.job_uploads) -> JobResults:
        """An asynchronous job over many images (up to limits.max_images_per_job).
        POST /classify_batch/submit with the same multipart form as /classify answers a
        `task_id` at once; GET /classify_batch/status?task_id=... says when the job is done, and
        GET /classify_batch/get?task_id=... gives one entry per image, in upload order: its
        prediction, or the reason it was refused. Runs beside the batcher, one batch at a time."""
        try:
            check_image_count(len(images), SETTINGS.limits.max_images_per_job, per="job")
        except RejectedInput as exc:  # the job fails with our body; its status says so
            return Response(error_body(exc.code, str(exc)), status_code=STATUS[exc.code],
                            media_type="application/json")
        results = self.predictor.predict_files(images, DEPLOYMENT.card.input,
                                               SETTINGS.limits.max_image_pixels,
                                               SETTINGS.batching.max_batch_size)
        return [JobItem(file=f.name, error=r.code, detail=str(r)) if isinstance(r, RejectedInput)
                else JobItem(file=f.name, prediction=r) for f, r in zip(images, results)]


# `bentoml build` packs the models named by the service's class attributes: one per tag.
for _number, _model in enumerate(MODELS.values()):
    setattr(ImageClassifier, f"model_{_number}", _model)
ImageClassifier = bentoml.service(
    service_class=described_service("service.md", DEPLOYMENT.served[0].tag),
    **BENTOML_SERVICE_CONFIG,
)(ImageClassifier)
middleware.install(ImageClassifier, SETTINGS)
