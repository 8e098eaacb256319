"""Postprocess -> JSON: the shapes of every answer, with examples for the Swagger UI."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .contract import ClassAP, DetectionParity, InputSpec, Lineage, Parity


class ClassScore(BaseModel):
    label: str
    class_id: int
    probability: float


class Prediction(BaseModel):
    """The answer for one image."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "label": "7",
                "class_id": 7,
                "confidence": 0.998,
                "top_k": [
                    {"label": "7", "class_id": 7, "probability": 0.998},
                    {"label": "9", "class_id": 9, "probability": 0.001},
                    {"label": "1", "class_id": 1, "probability": 0.0005},
                ],
                "model": "digits-classifier:5qd3x2bxvo6a2aav",
                "processing_ms": 3.1,
                "cached": False,
            }
        },
    )

    label: str
    class_id: int
    confidence: float = Field(description="Probability of `label`.")
    top_k: list[ClassScore] = Field(description="Most probable classes, best first.")
    model: str = Field(description="Tag of the model that produced this answer.")
    processing_ms: float = Field(
        description="Server-side time from receiving the image to answering, in milliseconds."
    )
    cached: bool = Field(
        default=False,
        description="Answered from the result cache (cache.enabled): the same bytes, model and "
        "options were answered before, and nothing was decoded or run for this one.")


class DetectedObject(BaseModel):
    label: str
    class_id: int
    score: float
    box: list[float] = Field(
        description="x1, y1, x2, y2 in the uploaded image's pixels (after its EXIF rotation); "
        "x2 and y2 are the far edges, so the width is x2 - x1.",
        min_length=4, max_length=4)


class DetectionResult(BaseModel):
    """The answer for one image: its detections, best first."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "detections": [
                    {"label": "7", "class_id": 7, "score": 0.97, "box": [41.5, 12.0, 78.3, 60.9]},
                    {"label": "2", "class_id": 2, "score": 0.91, "box": [102.0, 30.5, 131.2, 70.0]},
                ],
                "width": 240, "height": 160,
                "model": "digits-detector:4xq2l7bxvo6a2aav", "processing_ms": 8.4,
                "cached": False,
            }
        },
    )

    detections: list[DetectedObject] = Field(description="Sorted by score, best first.")
    width: int = Field(description="Of the uploaded image, after its EXIF rotation.")
    height: int
    model: str = Field(description="Tag of the model that produced this answer.")
    processing_ms: float = Field(
        description="Server-side time from receiving the image to answering, in milliseconds."
    )
    cached: bool = Field(
        default=False,
        description="Answered from the result cache (cache.enabled): the same bytes, model and "
        "options were answered before, and nothing was decoded or run for this one.")


class JobItem(BaseModel):
    """One image of an asynchronous job: its prediction, or why it was refused."""

    file: str = Field(description="The uploaded file's name.")
    prediction: Prediction | None = None
    error: str | None = Field(default=None, description="The refusal's code, e.g. invalid_image.")
    detail: str | None = Field(default=None, description="What to fix.")


class DetectionJobItem(BaseModel):
    """One image of an asynchronous detection job: its detections, or why it was refused."""

    file: str = Field(description="The uploaded file's name.")
    result: DetectionResult | None = None
    error: str | None = Field(default=None, description="The refusal's code, e.g. invalid_image.")
    detail: str | None = Field(default=None, description="What to fix.")


class VariantInfo(BaseModel):
    tag: str
    weight: float = Field(description="Relative share of traffic (rollout.variants).")


class DriftStatus(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    window_size: int = Field(description="Images in the window the last test used.")
    window_capacity: int
    reference_size: int
    observed: int = Field(description="Images this worker has seen since it started.")
    observed_at_test: int = Field(description="... when the last test ran.")
    statistic: float | None = Field(description="Kernel MMD; None before the first test.")
    p_value: float | None
    threshold: float
    drift: bool | None = Field(description="p_value < threshold; None before the first test.")
    last_computed: float | None = Field(description="Unix time of the last test.")
    worker_pid: int


class DriftReport(BaseModel):
    enabled: bool
    models: list[DriftStatus]
    without_reference: list[str] = Field(
        description="Served models exported without reference features (no drift test).")


class DeviceInfo(BaseModel):
    """Where the answering worker's runtime runs (docs/deploy.md#workers-and-gpus)."""

    worker_index: int | None = Field(
        description="BentoML's index of the answering worker, 1 to `workers`; null outside "
        "`bentoml serve`.")
    cuda_visible_devices: str | None = Field(
        description="The worker's CUDA_VISIBLE_DEVICES: the GPUs BentoML gave the service "
        "(resources.gpu; every worker of the service has the same), or set by hand; null "
        "when unset.")
    device_id: int | None = Field(
        description="This worker's GPU, an index among the visible ones: (worker_index - 1) "
        "mod their number. On a GPU, the device the session reports; null when none is "
        "visible.")
    on_gpu: bool = Field(
        description="The runtime runs on a GPU provider (TensorRT or CUDA); false: on the "
        "CPU, and device_id is unused.")
    lone_request_threads: int = Field(
        default=0,
        description="On a CPU: threads of the session that the call of a request alone in "
        "this worker takes while no other worker's runtime is busy "
        "(model.lone_request_threads); 0: none, every call runs on the worker's own threads.")


class ServedModelInfo(BaseModel):
    """The model that answers the caller (its routing key applies), and the others served."""

    model_config = ConfigDict(protected_namespaces=())

    tag: str
    task: str
    architecture: str
    labels: list[str]
    input: InputSpec
    active_provider: str
    providers: list[str]
    gpu_available: bool
    device: DeviceInfo
    accuracy: dict[str, float]
    lineage: Lineage
    variants: list[VariantInfo] = Field(description="Every model that answers, by weight.")
    shadow: str | None = Field(description="The model compared in the shadow, if any.")
    max_batch_size: int
    max_latency_ms: int


class ModelInfo(ServedModelInfo):
    """A classifier's /model_info."""

    parity: Parity | None
    class_accuracy: dict[str, float]
    top_k: int


class DetectionDefaults(BaseModel):
    confidence_threshold: float
    iou_threshold: float
    max_detections: int


class DetectorInfo(ServedModelInfo):
    """A detector's /model_info: COCO mAP in `accuracy` and per class in `class_ap`."""

    parity: DetectionParity | None
    class_ap: dict[str, ClassAP]
    detection: DetectionDefaults = Field(
        description="The thresholds a request gets unless it sends its own.")
