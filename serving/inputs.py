"""Upload -> Item: the input types of a service's endpoints, and what each endpoint takes.

BentoML validates a request's fields with pydantic while it parses the request; the validators
here run then, so that a bad image fails only its own request (a 4xx with our error code), and
decoding runs while the request is parsed, beside the batch that is running, not behind it. Each
image is routed to its variant here too, once per request. With the result cache on
(serving/cache.py), an upload is routed, then looked up by its bytes before it is decoded.

Every endpoint's input type carries a `HowToSend` text; `how_to_send(api)` reads it (or derives
it from the API's JSON fields), so the refusals for a wrong Content-Type or a missing field always
say what to send, and a new endpoint cannot forget to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Annotated, Any

import bentoml
import numpy as np
from PIL import Image
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from . import metrics
from .cache import CacheKey, CacheSlot, ResultCache, upload_digest
from .deployment import Deployment
from .errors import STATUS, RejectedInput, as_validation_error, error_body
from .inference_protocol import ProtocolModel, TensorSpec
from .inference_protocol import how_to_send as protocol_how_to_send
from .predictor import NO_PIXELS, Item, JobFile, Task
from .preprocess import InvalidTensor, open_image, tensor_shapes, validate_tensor
from .settings import ServiceSettings
from .uploads import NOT_A_FILE, NotAFile, RequestOptions, TooManyImages, request_fields

# BentoML's contextvar for the request being parsed (the same for every service in a process).
_CONTEXT = bentoml.Context()
# Where a request's parsed options are kept, so that every image of it uses the same object.
_OPTIONS_KEY = "image_service_options"
# Set once the request has been counted in routed_requests.
_COUNTED_KEY = "image_service_routed"


@dataclass(frozen=True)
class HowToSend:
    """What an endpoint's input takes, in words and an example: put it in the input's Annotated
    metadata; error messages quote it."""

    text: str


MULTIPART_IMAGES = HowToSend("a multipart form with one file part `images` per image "
                             "(curl -F images=@a.png -F images=@b.jpg)")


def how_to_send(api: Any) -> str:
    """What a BentoML API (an APIMethod) takes: its inputs' HowToSend texts, else its JSON
    fields by name."""
    fields = api.input_spec.model_fields
    texts = [m.text for f in fields.values() for m in f.metadata if isinstance(m, HowToSend)]
    if texts:
        return "; ".join(texts)
    if not fields:
        return "an empty JSON object {}"
    return "a JSON object with " + ", ".join(
        f"`{name}`" + ("" if field.is_required() else " (optional)")
        for name, field in fields.items())


def check_image_count(count: int, limit: int, per: str = "request") -> None:
    if count > limit:
        raise TooManyImages(f"{count} images in one {per}, over the limit of {limit} "
                            f"(limits.max_images_per_{per}): send them in several {per}s")


def refuse_a_job(count: int, limit: int) -> Response | None:
    """A job over limits.max_images_per_job fails with our body; its status says so. (Checked in
    the job, not while its request is parsed: the submit has answered by then.)"""
    try:
        check_image_count(count, limit, per="job")
    except RejectedInput as exc:
        return Response(error_body(exc.code, str(exc)), status_code=STATUS[exc.code],
                        media_type="application/json")
    return None


def current_request() -> Request | None:
    try:
        return _CONTEXT.request
    except LookupError:  # called outside an HTTP request (a local call)
        return None


class Inputs:
    """The input types of one service's endpoints, bound to its deployment and task.

    The types are declared as `Image.Image` (files) and `np.ndarray` (tensors), which is what
    BentoML's OpenAPI schema and clients understand: a file part, a JSON array. The validators
    replace the value with our own objects (Item, JobFile) before the API method sees it.
    """

    def __init__(self, deployment: Deployment, task: Task, name: str | None = None) -> None:
        """`name`: the model's name in the routes (default: its name in the store)."""
        self.deployment = deployment
        self.task = task
        self.spec = deployment.card.input
        self.limits = deployment.settings.limits
        cache = deployment.settings.cache
        self.cache = ResultCache(cache.max_entries, cache.max_bytes) if cache.enabled else None
        # What shapes an answer besides its image, model and request options: the sections a
        # task adds to the service's settings (the classifier's top_k), part of every cache key.
        self.answer_settings = deployment.settings.model_dump_json(
            exclude=set(ServiceSettings.model_fields))
        shapes = tensor_shapes(self.spec)
        # Per-request options the task takes (a detector's thresholds), beside every input.
        options = [RequestOptions(task.options_model)] if task.options_model else []

        image = Annotated[Image.Image, WrapValidator(self._decode_upload)]
        self.image_uploads: Any = Annotated[
            list[image], WrapValidator(self._count_images), MULTIPART_IMAGES, *options]
        job_file = Annotated[Image.Image, WrapValidator(self._keep_upload)]
        self.job_uploads: Any = Annotated[list[job_file], MULTIPART_IMAGES, *options]
        one_channel = self.spec.channels == 1
        self.pixel_tensor: Any = Annotated[
            np.ndarray,
            WrapValidator(self._validate_tensor),
            HowToSend(f'JSON {{"pixels": [...]}} of shape {shapes}'),
            Field(
                description=f"uint8 pixels, shape {shapes}",
                examples=[np.zeros((1, self.spec.height, self.spec.width), dtype=int).tolist()]
                if one_channel else None,
            ),
            *options,
        ]

        # The Open Inference Protocol's infer input: the images of a protocol request, which
        # serving/inference_protocol.py reads from its body (the served model names the route).
        self.protocol = ProtocolModel.of(
            deployment.served[0].tag, self.spec.channels,
            [TensorSpec(*output) for output in task.tensor_outputs],
            self.limits.max_images_per_request, self.limits.max_image_pixels, name)
        self.protocol_images: Any = Annotated[
            list[Any], WrapValidator(self._decode_protocol_images), self.protocol,
            HowToSend(protocol_how_to_send(self.protocol))]

    def request_options(self, request: Request | None) -> Any:
        """The task's options for the request being parsed, validated once per request (an
        invalid value: RejectedInput, refused before any image is decoded)."""
        if self.task.options_model is None:
            return None
        if request is None:
            return self.task.options({})
        state = request.scope.setdefault("state", {})
        if _OPTIONS_KEY not in state:
            state[_OPTIONS_KEY] = self.task.options(request_fields(request))
        return state[_OPTIONS_KEY]

    def variant(self) -> int:
        """The variant of the request being parsed, chosen once per request; not yet counted."""
        request = current_request()
        if request is None:
            return self.deployment.router.choose(None)
        return self.deployment.router.for_request(request)

    def route(self) -> int:
        """The variant of a request with at least one accepted image; counted once per request
        (a request refused before any image is accepted is not routed to a model)."""
        index = self.variant()
        request = current_request()
        if request is not None and not request.scope["state"].get(_COUNTED_KEY):
            request.scope["state"][_COUNTED_KEY] = True  # variant() made the state
            metrics.labelled(metrics.routed_requests(), self.deployment.served[index].tag).inc()
        return index

    def _decode_upload(self, upload: Any, _bentoml_decoder: ValidatorFunctionWrapHandler
                       ) -> Item:
        received_at = time.perf_counter()
        # Not BentoML's decoder: it trusts the part's Content-Type (a JPEG sent as image/png
        # fails) and takes strings as well as files. Images are identified by their bytes here.
        if not isinstance(upload, UploadFile):
            raise as_validation_error(NotAFile(NOT_A_FILE))
        if upload.size is not None:
            metrics.upload_bytes().observe(upload.size)
        variant = self.variant()  # first: the answering model's exact tag is in the cache key
        try:
            options = self.request_options(current_request())
            slot = self._cache_slot(upload, variant, options)
            if slot is not None and (hit := slot.cache.lookup(slot.key)) is not None:
                # Nothing to decode or run: the predictor answers it as it was.
                metrics.image_pixels().observe(hit.pixels)
                return Item(NO_PIXELS, received_at, self.route(), cached=hit)
            image = open_image(upload.file)  # the header only: size known before decoding
            metrics.image_pixels().observe(image.width * image.height)
            pixels, context = self.task.decode(image, self.spec, self.limits.max_image_pixels,
                                               options)
        except RejectedInput as exc:
            raise as_validation_error(exc) from None
        if slot is not None:  # its size, for the cache's record of what it answers
            slot = replace(slot, pixels=image.width * image.height)
        return Item(pixels, received_at, self.route(), context, cache_slot=slot)

    def _cache_slot(self, upload: UploadFile, variant: int, options: Any) -> CacheSlot | None:
        """Where this upload's answer is kept (None: the cache is off): its key is the upload's
        bytes, the answering model's exact tag and everything that changes the answer."""
        if self.cache is None:
            return None
        key = CacheKey(upload_digest(upload.file), self.deployment.served[variant].tag, options,
                       self.answer_settings)
        return CacheSlot(self.cache, key, 0)

    def _decode_protocol_images(self, images: Any, _parse: ValidatorFunctionWrapHandler
                                ) -> list[Item]:
        """A protocol request's images (read from its body, counted and sized there) -> Items,
        preprocessed as uploads are."""
        received_at = time.perf_counter()
        if not isinstance(images, list) or not all(isinstance(i, Image.Image) for i in images):
            # Only a body the protocol parser did not read: BentoML's client calling the API.
            raise as_validation_error(RejectedInput(protocol_how_to_send(self.protocol)))
        try:
            options = self.request_options(current_request())
            decoded = [self.task.decode(image, self.spec, self.limits.max_image_pixels, options)
                       for image in images]
        except RejectedInput as exc:
            raise as_validation_error(exc) from None
        variant = self.route()
        return [Item(pixels, received_at, variant, context) for pixels, context in decoded]

    def _count_images(self, uploads: Any, validate_each: ValidatorFunctionWrapHandler
                      ) -> list[Item]:
        """Before any image is decoded: refuse a request with more than the limit."""
        try:
            check_image_count(len(uploads) if isinstance(uploads, list) else 1,
                              self.limits.max_images_per_request)
            self.request_options(current_request())  # invalid options: refused before decoding
        except RejectedInput as exc:
            raise as_validation_error(exc) from None
        items: list[Item] = validate_each(uploads)
        return items

    def _keep_upload(self, upload: Any, _bentoml_decoder: ValidatorFunctionWrapHandler
                     ) -> JobFile:
        if not isinstance(upload, UploadFile):
            raise as_validation_error(NotAFile(NOT_A_FILE))
        try:
            options = self.request_options(current_request())
        except RejectedInput as exc:
            raise as_validation_error(exc) from None
        return JobFile(upload.filename or "", upload.file.read(), self.route(), options)

    def _validate_tensor(self, array: Any, parse_array: ValidatorFunctionWrapHandler
                         ) -> list[Item]:
        received_at = time.perf_counter()
        try:
            rows = validate_tensor(self._as_array(array, parse_array), self.spec)
            # After the shape check, which says what N is.
            check_image_count(len(rows), self.limits.max_images_per_request)
            context = self.task.tensor_context(self.spec,
                                               self.request_options(current_request()))
        except RejectedInput as exc:
            raise as_validation_error(exc) from None
        variant = self.route()
        return [Item(image, received_at, variant, context) for image in rows]

    def _as_array(self, value: Any, parse_array: ValidatorFunctionWrapHandler) -> np.ndarray:
        try:
            array: np.ndarray = parse_array(value)  # BentoML's JSON lists -> ndarray
        except ValidationError:  # ragged lists, mixed types
            raise InvalidTensor("pixels must be a rectangular array of numbers 0-255 of shape "
                                f"{tensor_shapes(self.spec)}") from None
        return array
