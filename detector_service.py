"""ObjectDetector: the HTTP surface of object detection with ONNX graphs from the model store
(`bentoml serve service:ObjectDetector`).

The same path as ImageClassifier (classifier_service.py), with the detection task in the middle:
serving/request_log.py -> serving/admission.py -> serving/uploads.py (files, and the request's
threshold fields) -> serving/inputs.py (routed; letterboxed by serving/detection.py while the
request is parsed) -> BentoML's adaptive batcher (or serving/fast_lane.py for a lone
request) -> serving/predictor.py (serving/runtime.py per variant, features to serving/drift.py,
serving/detection.py's thresholds, per-class NMS and top-k per image, mapped back to the
upload's pixels; a copy to serving/shadow.py) -> JSON
(serving/schemas.py). No torch and no training code is imported here.
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType

from serving import settings, wiring
from serving.deployment import Deployment, packed_models
from serving.detection import Detection
from serving.errors import RejectedInput
from serving.inputs import Inputs, refuse_a_job
from serving.schemas import (
    DetectionDefaults,
    DetectionJobItem,
    DetectionResult,
    DetectorInfo,
    DriftReport,
)

SETTINGS, BENTOML_SERVICE_CONFIG = settings.load(settings.DETECTOR, settings.DetectorSettings)
MODELS = packed_models(SETTINGS)
DEPLOYMENT = Deployment.read(SETTINGS, MODELS, task="detection")
TASK = Detection(DEPLOYMENT.card.labels, DEPLOYMENT.card.detection, SETTINGS.detection)
INPUTS = Inputs(DEPLOYMENT, TASK)

# The media type declared: BentoML then does not rebuild the output's JSON schema per response.
Detections = Annotated[list[DetectionResult], ContentType("application/json")]
JobResults = Annotated[list[DetectionJobItem], ContentType("application/json")]
# The protocol's answer is written by serving/inference_protocol.py from the tensors per image.
ProtocolAnswers = Annotated[list[Any], ContentType("application/json")]
BATCHING = wiring.batching(SETTINGS)


class ObjectDetector:
    """Object detection with ONNX graphs from the BentoML model store."""

    def __init__(self) -> None:
        self.predictor = DEPLOYMENT.start(TASK)

    def __is_ready__(self) -> bool:
        return self.predictor.check_ready(DEPLOYMENT.card.input)

    @bentoml.api(route="/detect", **BATCHING)
    def detect(self, images: INPUTS.image_uploads) -> Detections:
        """Detect objects in one or more uploaded images (multipart field `images`, repeat it
        for several). Optional form fields override the configured defaults for this request:
        `confidence_threshold` (0-1), `iou_threshold` (0-1), `max_detections` (1-1000). Answers
        per image, in upload order: its detections (label, class_id, score, box as x1, y1, x2,
        y2 in the image's pixels), best first."""
        return self.predictor.predict(images)

    @bentoml.api(route="/detect_tensor", **BATCHING)
    def detect_tensor(self, pixels: INPUTS.pixel_tensor) -> Detections:
        """Detect objects in already-letterboxed pixels: JSON numbers 0-255 at the model's input
        size (see /model_info), and optionally the same threshold keys as /detect beside
        `pixels`. Boxes are in the tensor's pixels."""
        return self.predictor.predict(pixels)

    @bentoml.api(route=INPUTS.protocol.infer_route, **BATCHING)
    def infer(self, inputs: INPUTS.protocol_images) -> ProtocolAnswers:
        """The Open Inference Protocol (KServe v2, Triton): `images` UINT8 [N, H, W, C] (or
        [N, H, W]) as JSON data or binary tensor data, each image of any size, preprocessed as
        an upload is. Also at /v2/models/<name>/versions/<version>/infer; the model's tensors:
        GET /v2/models/<name>. Through the same batcher, limits and metrics as /detect."""
        return self.predictor.predict_tensors(inputs)

    @bentoml.api(route="/model_info")
    def model_info(
        self, context: bentoml.Context
    ) -> Annotated[DetectorInfo, ContentType("application/json")]:
        """The model that answers this caller (routing headers apply as on /detect): tag,
        labels, input spec, execution provider, COCO mAP, parity; the default thresholds; and
        every variant served."""
        index = DEPLOYMENT.router.for_request(context.request)
        card = DEPLOYMENT.served[index].card
        defaults = SETTINGS.detection
        return DetectorInfo(**DEPLOYMENT.describe(index, self.predictor.runtimes[index]),
                            parity=card.parity, class_ap=card.class_ap,
                            detection=DetectionDefaults(**defaults.model_dump()))

    @bentoml.api(route="/drift")
    def drift(
        self, test_now: bool = False
    ) -> Annotated[DriftReport, ContentType("application/json")]:
        """Online drift detection on the detector's pooled backbone features, per served model,
        in the worker that answers (see /drift on ImageClassifier)."""
        return DEPLOYMENT.drift_report(self.predictor.monitors, test_now)

    @bentoml.task(route="/detect_batch")
    def detect_batch(self, images: INPUTS.job_uploads) -> JobResults:
        """An asynchronous job over many images (up to limits.max_images_per_job), with the
        same optional threshold fields as /detect. POST /detect_batch/submit answers a `task_id`
        at once; GET /detect_batch/status?task_id=... says when it is done; GET
        /detect_batch/get?task_id=... gives one entry per image, in upload order: its detections,
        or the reason it was refused."""
        if refusal := refuse_a_job(len(images), SETTINGS.limits.max_images_per_job):
            return refusal
        results = self.predictor.predict_files(images, DEPLOYMENT.card.input,
                                               SETTINGS.limits.max_image_pixels,
                                               SETTINGS.batching.max_batch_size)
        return [DetectionJobItem(file=f.name, error=r.code, detail=str(r))
                if isinstance(r, RejectedInput) else DetectionJobItem(file=f.name, result=r)
                for f, r in zip(images, results)]


ObjectDetector = wiring.as_service(
    ObjectDetector, settings=SETTINGS, bentoml_config=BENTOML_SERVICE_CONFIG, models=MODELS,
    description_file="service-detector.md", version=DEPLOYMENT.served[0].tag,
    protocols=[INPUTS.protocol])
