"""ImageClassifier: a BentoML service that classifies images with an ONNX graph from the model store.

A request's path: `serving.request_log` (one JSON line when it is answered) ->
`serving.admission` (API key, Content-Type, size, concurrency, timeout; every refusal as
`{"error", "detail"}`) -> upload (`serving.uploads`: files only, a bounded count) ->
`serving.routing` (which variant answers) -> `serving.preprocess.decode_image` (per request, while
it is being parsed, so decoding runs beside the batch that is running, not behind it) ->
BentoML's adaptive batcher -> `serving.runtime.OnnxRuntime` (one call per batch and variant; the
features go to `serving.drift`'s window) -> `serving.postprocess` -> JSON; `serving.metrics`
counts the answers and `serving.shadow` gets a copy, off the request path.
No torch, no torchvision and no training code is imported here: the store entry's card.json says
everything the service needs to know about the model.
"""

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import NotFound
from bentoml.validators import ContentType
from PIL import Image
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from starlette.datastructures import UploadFile
from starlette.responses import Response

from serving import metrics
from serving import settings as configuration
from serving.admission import Admission, admission_routes, quiet_client_error_tracebacks
from serving.contract import ONNX_FILE, ModelCard
from serving.drift import DriftMonitor
from serving.errors import STATUS, RejectedInput, as_validation_error, error_body
from serving.postprocess import to_predictions
from serving.preprocess import InvalidTensor, decode_image, open_image, validate_tensor
from serving.runtime import OnnxRuntime, gpu_available
from serving.request_log import RequestLog
from serving.routing import Router
from serving.schemas import DriftReport, DriftStatus, JobItem, ModelInfo, Prediction, VariantInfo
from serving.shadow import Shadow
from serving.uploads import NOT_A_FILE, NotAFile, TooManyImages, refuse_urls_in_file_fields

logger = logging.getLogger("bentoml.image_classifier")

SETTINGS, BENTOML_SERVICE_CONFIG = configuration.load()
API_KEY = SETTINGS.api_key()
# Every model the configuration names, by tag: `bentoml build` packs them all (class attributes
# below), so a container holds its variants, its shadow and its rollback targets.
MODELS = {tag: bentoml.models.BentoModel(tag) for tag in SETTINGS.packed_tags()}


@dataclass(frozen=True)
class StoreEntry:
    """A model as the store holds it: its exact tag (never `latest`), card and directory."""

    tag: str
    card: ModelCard
    path: Path


def read_store_entry(tag: str) -> StoreEntry:
    stored = MODELS[tag].stored
    if stored is None:
        raise NotFound(
            f"model {tag!r} is not in the BentoML model store: train and export it with "
            "`make train` (or `python -m train_export`), or set image_classifier.model.tag (or "
            f"rollout.variants, or ${configuration.MODEL_TAG_ENV}) to a tag that "
            "`bentoml models list` shows."
        )
    card = ModelCard.read(Path(stored.path))
    card.verify(Path(stored.path), str(stored.tag))  # a damaged entry stops startup here
    return StoreEntry(str(stored.tag), card, Path(stored.path))


def check_interchangeable(entries: list[StoreEntry]) -> None:
    """Variants and the shadow answer the same API, so they must agree on labels and input."""
    first = entries[0]
    for other in entries[1:]:
        for field, what in (("labels", "labels"), ("input", "input spec")):
            if getattr(other.card, field) != getattr(first.card, field):
                raise configuration.ConfigurationError(
                    f"models {first.tag} and {other.tag} differ in their {what}: variants and "
                    "the shadow must be interchangeable. Serve models with different "
                    "labels or input sizes as separate deployments."
                )


VARIANTS = SETTINGS.served_variants()
SERVED = [read_store_entry(v.tag) for v in VARIANTS]
SHADOW = read_store_entry(SETTINGS.rollout.shadow.tag) if SETTINGS.rollout.shadow else None
check_interchangeable(SERVED + ([SHADOW] if SHADOW else []))
ROUTER = Router([v.weight for v in VARIANTS], SETTINGS.rollout.sticky_headers)
CARD = SERVED[0].card  # labels and input spec: the same for every variant
INPUT = CARD.input
INPUT_SHAPES = (f"(N, {INPUT.height}, {INPUT.width}) or " if INPUT.channels == 1 else "") + (
    f"(N, {INPUT.height}, {INPUT.width}, {INPUT.channels})"
)


@dataclass(frozen=True, slots=True)
class Pixels:
    """One image, preprocessed to the model's input, and when the server received it."""

    array: np.ndarray
    received_at: float
    variant: int  # index into VARIANTS: the model that answers it


def _route() -> int:
    """The variant of the request being parsed; chosen and counted once per request."""
    try:
        request = ImageClassifier.context.request  # BentoML's contextvar for this request
    except LookupError:  # called outside an HTTP request (a local call)
        return ROUTER.choose(None)
    index, chosen_now = ROUTER.for_request(request)
    if chosen_now:
        metrics.routed_requests().labels(SERVED[index].tag).inc()
    return index


def _decode_upload(upload: Any, _bentoml_decoder: ValidatorFunctionWrapHandler) -> Pixels:
    """Runs while BentoML parses the request: a bad image fails only its own request (4xx)."""
    received_at = time.perf_counter()
    # Not BentoML's decoder: it trusts the part's Content-Type (a JPEG sent as image/png fails)
    # and takes strings as well as files. Images are identified by their bytes here.
    if not isinstance(upload, UploadFile):
        raise as_validation_error(NotAFile(NOT_A_FILE))
    limit = SETTINGS.limits.max_image_pixels
    if upload.size is not None:
        metrics.upload_bytes().observe(upload.size)
    try:
        image = open_image(upload.file)  # the header only: size known before decoding
        metrics.image_pixels().observe(image.width * image.height)
        return Pixels(decode_image(image, INPUT, limit), received_at, _route())
    except RejectedInput as exc:
        raise as_validation_error(exc) from None


def _check_image_count(count: int, per: str = "request") -> None:
    limit = getattr(SETTINGS.limits, f"max_images_per_{per}")
    if count > limit:
        raise TooManyImages(f"{count} images in one {per}, over the limit of {limit} "
                            f"(limits.max_images_per_{per}): send them in several {per}s")


def _count_images(uploads: Any, validate_each: ValidatorFunctionWrapHandler) -> list[Pixels]:
    """Before any image is decoded: refuse a request with more than the limit."""
    try:
        _check_image_count(len(uploads) if isinstance(uploads, list) else 1)
    except RejectedInput as exc:
        raise as_validation_error(exc) from None
    return validate_each(uploads)


def _validate_tensor(array: Any, parse_array: ValidatorFunctionWrapHandler) -> list[Pixels]:
    received_at = time.perf_counter()
    try:
        rows = validate_tensor(_as_array(array, parse_array), INPUT)
        _check_image_count(len(rows))  # after the shape check, which says what N is
    except RejectedInput as exc:
        raise as_validation_error(exc) from None
    variant = _route()
    return [Pixels(image, received_at, variant) for image in rows]


def _as_array(value: Any, parse_array: ValidatorFunctionWrapHandler) -> np.ndarray:
    try:
        return parse_array(value)  # BentoML's JSON lists -> ndarray
    except ValidationError:  # ragged lists, mixed types
        raise InvalidTensor(
            f"pixels must be a rectangular array of numbers 0-255 of shape {INPUT_SHAPES}"
        ) from None


@dataclass(frozen=True, slots=True)
class JobFile:
    """One upload of an asynchronous job: decoded later, in the job, not while it is parsed."""

    name: str
    data: bytes
    variant: int


def _keep_upload(upload: Any, _bentoml_decoder: ValidatorFunctionWrapHandler) -> JobFile:
    if not isinstance(upload, UploadFile):
        raise as_validation_error(NotAFile(NOT_A_FILE))
    return JobFile(upload.filename or "", upload.file.read(), _route())


ImageUpload = Annotated[Image.Image, WrapValidator(_decode_upload)]
JobUpload = Annotated[Image.Image, WrapValidator(_keep_upload)]
ImageUploads = Annotated[list[ImageUpload], WrapValidator(_count_images)]
PixelTensor = Annotated[
    np.ndarray,
    WrapValidator(_validate_tensor),
    Field(
        description=f"uint8 pixels, shape {INPUT_SHAPES}",
        examples=[np.zeros((1, INPUT.height, INPUT.width), dtype=int).tolist()]
        if INPUT.channels == 1
        else None,
    ),
]

# Declaring the media type spares BentoML 1.4.39 from regenerating the output's JSON schema on every
# response to find it (14% of the event loop's time under load, measured with py-spy).
Predictions = Annotated[list[Prediction], ContentType("application/json")]
JobResults = Annotated[list[JobItem], ContentType("application/json")]

BATCHING = dict(
    batchable=True,
    max_batch_size=SETTINGS.batching.max_batch_size,
    max_latency_ms=SETTINGS.batching.max_latency_ms,
)


class ImageClassifier:
    """Image classification with ONNX graphs from the BentoML model store."""

    def __init__(self) -> None:
        self.card = CARD
        self.runtimes = [self._load(entry) for entry in SERVED]
        self.monitors = [drift_monitor(entry) for entry in SERVED]
        self.shadow = None
        if SHADOW is not None:
            shadow = SETTINGS.rollout.shadow
            # One thread: the shadow's session runs on its own (low-priority) thread only.
            self.shadow = Shadow(self._load(SHADOW, intra_op_threads=1), SHADOW.tag,
                                 shadow.fraction, shadow.queue_batches)
        for variant, entry, runtime in zip(VARIANTS, SERVED, self.runtimes):
            metrics.model_info().labels(entry.tag, "variant", f"{variant.weight:g}").set(1)
            logger.info("Serving %s (weight %g) on %s", entry.tag, variant.weight,
                        runtime.active_provider)
        if SHADOW is not None:
            metrics.model_info().labels(SHADOW.tag, "shadow", "0").set(1)
            logger.info("Shadowing with %s on %.0f%% of images", SHADOW.tag,
                        100 * SETTINGS.rollout.shadow.fraction)

    @staticmethod
    def _load(entry: StoreEntry, intra_op_threads: int | None = None) -> OnnxRuntime:
        return OnnxRuntime(
            entry.path / ONNX_FILE,
            entry.card.input,
            entry.card.graph,
            providers=SETTINGS.model.providers,
            intra_op_threads=SETTINGS.model.intra_op_threads
            if intra_op_threads is None else intra_op_threads,
        )

    def __is_ready__(self) -> bool:
        # __init__ has loaded the graph and run a warm-up batch by the time this is asked.
        return bool(self.runtimes)

    @bentoml.api(route="/classify", **BATCHING)
    def classify(self, images: ImageUploads) -> Predictions:
        """Classify one or more uploaded images (multipart field `images`, repeat it for
        several). Answers one prediction per image, in upload order."""
        return self._predict(images)

    @bentoml.api(route="/classify_tensor", **BATCHING)
    def classify_tensor(self, pixels: PixelTensor) -> Predictions:
        """Classify already-decoded pixels: JSON numbers 0-255 of shape (N, H, W) or
        (N, H, W, C) at the model's input size (see /model_info)."""
        return self._predict(pixels)

    @bentoml.api(route="/model_info")
    def model_info(
        self, context: bentoml.Context
    ) -> Annotated[ModelInfo, ContentType("application/json")]:
        """The model that answers this caller (routing headers apply as on /classify): tag,
        labels, input spec, execution provider, parity, accuracy; and every variant served."""
        index, _ = ROUTER.for_request(context.request)
        entry, runtime = SERVED[index], self.runtimes[index]
        return ModelInfo(
            tag=entry.tag,
            architecture=entry.card.architecture,
            labels=entry.card.labels,
            input=entry.card.input,
            active_provider=runtime.active_provider,
            providers=runtime.providers,
            gpu_available=gpu_available(),
            parity=entry.card.parity,
            accuracy=entry.card.accuracy,
            class_accuracy=entry.card.class_accuracy,
            lineage=entry.card.lineage,
            variants=[VariantInfo(tag=e.tag, weight=v.weight) for v, e in zip(VARIANTS, SERVED)],
            shadow=SHADOW.tag if SHADOW else None,
            max_batch_size=SETTINGS.batching.max_batch_size,
            max_latency_ms=SETTINGS.batching.max_latency_ms,
            top_k=SETTINGS.response.top_k,
        )

    @bentoml.api(route="/drift")
    def drift(
        self, test_now: bool = False
    ) -> Annotated[DriftReport, ContentType("application/json")]:
        """Online drift detection, per served model, in the worker that answers: the kernel MMD
        between the features of its recent images and the training reference, its permutation
        p-value, and the drift flag (p < drift.p_value_threshold). `test_now: true` runs the
        test on the current window instead of returning the last periodic result."""
        states = []
        for entry, monitor in zip(SERVED, self.monitors):
            if monitor is not None:
                states.append(monitor.test_now() if test_now else monitor.state())
        return DriftReport(
            enabled=SETTINGS.drift.enabled,
            models=[DriftStatus(**asdict(state)) for state in states],
            without_reference=[e.tag for e, m in zip(SERVED, self.monitors)
                               if m is None and e.card.drift_reference is None],
        )

    @bentoml.task(route="/classify_batch")
    def classify_batch(self, images: list[JobUpload]) -> JobResults:
        """An asynchronous job over many images (up to limits.max_images_per_job).
        POST /classify_batch/submit with the same multipart form as /classify answers a
        `task_id` at once; GET /classify_batch/status?task_id=... says when the job is done, and
        GET /classify_batch/get?task_id=... gives one entry per image, in upload order: its
        prediction, or the reason it was refused. Runs beside the batcher, one batch at a time."""
        try:
            _check_image_count(len(images), per="job")
        except RejectedInput as exc:  # the job fails with our body; its status says so
            return Response(error_body(exc.code, str(exc)), status_code=STATUS[exc.code],
                            media_type="application/json")
        items: list[JobItem] = []
        for start in range(0, len(images), SETTINGS.batching.max_batch_size):
            items += self._classify_files(images[start:start + SETTINGS.batching.max_batch_size])
        return items

    def _classify_files(self, files: list[JobFile]) -> list[JobItem]:
        items, decoded = [], []
        for upload in files:
            try:
                pixels = decode_image(upload.data, INPUT, SETTINGS.limits.max_image_pixels)
                decoded.append(Pixels(pixels, time.perf_counter(), upload.variant))
                items.append(JobItem(file=upload.name))
            except RejectedInput as exc:
                items.append(JobItem(file=upload.name, error=exc.code, detail=str(exc)))
        answers = iter(self._predict(decoded) if decoded else [])
        return [item if item.error else item.model_copy(update={"prediction": next(answers)})
                for item in items]

    def _predict(self, batch: list[Pixels]) -> list[Prediction]:
        """One adaptive batch (images from many requests) -> one runtime call per variant."""
        pixels = np.stack([p.array for p in batch])
        variants = np.fromiter((p.variant for p in batch), np.intp, len(batch))
        probabilities = self._run_variants(pixels, variants)
        done = time.perf_counter()
        tags = [SERVED[i].tag for i in variants]
        seconds = [done - p.received_at for p in batch]
        predictions = to_predictions(probabilities, self.card.labels, SETTINGS.response.top_k,
                                     tags, [s * 1000.0 for s in seconds])
        record_answers(predictions, seconds)
        if self.shadow is not None:
            self.shadow.offer(pixels, np.array([p.class_id for p in predictions]), tags)
        return predictions

    def _run_variants(self, pixels: np.ndarray, variants: np.ndarray) -> np.ndarray:
        """Probabilities of every row from its variant; features go to its drift window."""
        if ROUTER.single or (variants == variants[0]).all():  # the common case: no copies
            return self._run(variants[0], pixels)
        probabilities = np.empty((len(pixels), len(self.card.labels)), np.float32)
        for index in np.unique(variants):
            rows = np.flatnonzero(variants == index)
            probabilities[rows] = self._run(index, pixels[rows])
        return probabilities

    def _run(self, variant: int, pixels: np.ndarray) -> np.ndarray:
        probabilities, features = self.runtimes[variant].run(pixels)
        if self.monitors[variant] is not None:
            self.monitors[variant].observe(features)
        return probabilities


def drift_monitor(entry: StoreEntry) -> DriftMonitor | None:
    """A monitor for a model exported with reference features (imports without data have none)."""
    reference = entry.card.drift_reference
    if not SETTINGS.drift.enabled or reference is None:
        return None
    features = np.load(entry.path / reference.file)
    size = SETTINGS.drift.reference_size
    if len(features) > size:  # a fixed subsample: the same reference in every worker
        features = features[np.random.default_rng(0).permutation(len(features))[:size]]
    drift = SETTINGS.drift
    return DriftMonitor(entry.tag, features, drift.window_size, drift.min_samples,
                        drift.interval_s, drift.permutations, drift.p_value_threshold)


def record_answers(predictions: list[Prediction], seconds: list[float]) -> None:
    """Per model: answers by class, their confidence and their latency."""
    by_class = Counter((p.model, p.label) for p in predictions)
    for (model, label), count in by_class.items():
        metrics.predictions().labels(model, label).inc(count)
    for prediction, elapsed in zip(predictions, seconds):
        metrics.confidence().labels(prediction.model).observe(prediction.confidence)
        metrics.processing_seconds().labels(prediction.model).observe(elapsed)


# `bentoml build` packs the models named by the service's class attributes: one per tag.
for _number, _model in enumerate(MODELS.values()):
    setattr(ImageClassifier, f"model_{_number}", _model)
ImageClassifier = bentoml.service(**BENTOML_SERVICE_CONFIG)(ImageClassifier)

# What each API takes, for the answers that refuse a wrong Content-Type or a missing field.
HOW_TO_SEND = {
    "classify": "a multipart form with one file part `images` per image "
                "(curl -F images=@digit.png)",
    "classify_tensor": f'JSON {{"pixels": [...]}} of shape {INPUT_SHAPES}',
    "model_info": "an empty JSON object {}",
    "drift": 'a JSON object: {} for the last result, {"test_now": true} to test now',
    "classify_batch": "a multipart form with one file part `images` per image "
                      "(curl -F images=@a.png -F images=@b.jpg)",
}

refuse_urls_in_file_fields()
quiet_client_error_tracebacks()
ADMISSION_ROUTES = admission_routes(ImageClassifier.apis, HOW_TO_SEND)
if SETTINGS.request_log.enabled:  # added first: outside Admission, so refusals are logged too
    ImageClassifier.add_asgi_middleware(RequestLog, routes=ADMISSION_ROUTES)
ImageClassifier.add_asgi_middleware(
    Admission,
    routes=ADMISSION_ROUTES,
    limits=SETTINGS.limits,
    public_paths=SETTINGS.security.public_paths,
    api_key=API_KEY,
)
