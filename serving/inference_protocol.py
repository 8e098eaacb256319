"""The Open Inference Protocol (KServe v2, Triton's HTTP API) beside the service's own routes.

`POST /v2/models/<name>/infer` is an ordinary batchable API of the service (its route named by the
served model): admission, the API key, limits, the adaptive batcher, metrics and the request log
apply to it as to /classify. What differs is the body, read and written here:
- `read_infer_request`: the request's JSON (`inputs`, `outputs`, `parameters`, `id`), and with the
  binary tensor extension (`Inference-Header-Content-Length`) the raw tensor bytes after it; one
  input `images`, UINT8 `[N, H, W, C]` (or `[N, H, W]`), each row an image of any size that gets
  the same preprocessing as an upload.
- `infer_response`: the task's per-image tensors (serving/classification.py, detection.py) as the
  protocol's outputs, JSON or binary (`binary_data_output`, or `binary_data` per output).
Both run inside BentoML's request parsing (serving/uploads.py hands them the body), so a bad body
is refused like any bad input: a 4xx with `{"error", "detail"}`.

The protocol's other routes (health, server and model metadata, model readiness) and `/health`
(seed 002's clients) are answered by `ProtocolRoutes`, a middleware inside admission; the
versioned infer path and the protocol's error shape (its clients show `error` alone, so on /v2
paths it carries the code and the reason) by `ProtocolPaths`, outside every other middleware.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _bentoml_impl import serde
from PIL import Image
from starlette.requests import Request

from .admission import is_error_body, refuse
from .asgi import ASGIApp, Message, Receive, Scope, Send
from .errors import RejectedInput
from .preprocess import ImageTooLarge, InvalidTensor
from .runtime import gpu_available
from .uploads import OptionsJSONSerde, TooManyImages, keep_fields, validation_error

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header
INPUT_NAME = "images"
MODEL_TAG = "model"  # a row's key for the tag of the model that answered it (not an output)
# numpy dtype kind+size -> the protocol's datatype, for the outputs the tasks produce.
DATATYPES: dict[np.dtype[Any], str] = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
             np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
             np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}


class InvalidInferRequest(RejectedInput):
    code = "invalid_json"


class UnknownModel(RejectedInput):
    code = "unknown_model"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the model's signature: name, protocol datatype, shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ProtocolModel:
    """What the protocol says of the served model: its store name and version, and the task's
    tensors. Put in the infer API's Annotated metadata, it also marks that API's body as a
    protocol request (serving/uploads.py)."""

    name: str
    version: str
    channels: int
    outputs: tuple[TensorSpec, ...]
    max_images: int
    max_pixels: int
    stored_tag: str  # its tag in the model store (the name may be the deployment's own)
    platform: str = "onnxruntime_onnx"

    @classmethod
    def of(cls, tag: str, channels: int, outputs: Sequence[TensorSpec], max_images: int,
           max_pixels: int, name: str | None = None) -> ProtocolModel:
        """The model stored under `tag`, served under its store name or `name`."""
        stored_name, _, version = tag.partition(":")
        return cls(name or stored_name, version, channels, tuple(outputs), max_images,
                   max_pixels, tag)

    @property
    def infer_route(self) -> str:
        return f"/v2/models/{self.name}/infer"

    @property
    def input(self) -> TensorSpec:
        return TensorSpec(INPUT_NAME, "UINT8", (-1, -1, -1, self.channels))

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [self.input.metadata()],
                "outputs": [o.metadata() for o in self.outputs]}


def openapi_schemas(model: ProtocolModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """The infer route's request and answer as the OpenAPI spec shows them (BentoML derives
    them from the API's Python types, which are the batch's, not the protocol's)."""
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {}},
        "parameters": {"type": "object", "description": "binary_data_size: the tensor's bytes "
                       "after the JSON header (binary tensor extension)"}}}
    request = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1,
                   "description": f"one tensor {INPUT_NAME!r}, UINT8 [N, H, W, C] or [N, H, W]"},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": [o.name for o in model.outputs]},
            "parameters": {"type": "object"}}}},
        "parameters": {"type": "object", "description": "binary_data_output: answer every "
                       "output as binary data; a detector's confidence_threshold, "
                       "iou_threshold, max_detections"}},
        "example": {"inputs": [{"name": INPUT_NAME, "datatype": "UINT8",
                                "shape": [1, 2, 2, model.channels],
                                "data": [0, 255, 255, 0] * model.channels}]}}
    answer = {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "id": {"type": "string"}, "outputs": {"type": "array", "items": tensor}}}
    return request, answer


@dataclass
class InferRequest:
    """A parsed infer request: its images, and how its answer is to be written."""

    images: list[Image.Image]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # The outputs asked for, each with "binary or not" (None: as the request's default).
    outputs: dict[str, bool | None] = field(default_factory=dict)
    binary_output: bool = False


def declared_protocol(cls: type[Any]) -> ProtocolModel | None:
    """The protocol model an API's input declares (its infer route), if any."""
    for field_info in cls.model_fields.values():
        for marker in field_info.metadata:
            if isinstance(marker, ProtocolModel):
                return marker
    return None


class ProtocolSerde(OptionsJSONSerde):
    """BentoML's JSON parser (ours: serving/uploads.py), which reads and writes the protocol's
    bodies for the infer API. BentoML makes one per request, for its body and its answer, and
    uses it for every Content-Type it has no parser for: the binary extension's too."""

    request: InferRequest | None = None
    model: ProtocolModel | None = None

    async def parse_request(self, request: Request, cls: type[Any]) -> Any:
        model = declared_protocol(cls)
        if model is None:
            return await super().parse_request(request, cls)
        body = await request.body()
        try:
            self.request = read_infer_request(body, request.headers.get(HEADER_LENGTH, ""),
                                              model)
        except RejectedInput as exc:
            raise validation_error(exc) from None
        self.model = model
        keep_fields(request, self.request.parameters)  # a detector's thresholds
        (name,) = cls.model_fields
        return cls.model_validate({name: self.request.images})

    def serialize_model(self, model: Any) -> serde.Payload:
        if self.request is None or self.model is None:
            return super().serialize_model(model)
        body, headers = infer_response(self.request, self.model, model.root)
        return serde.Payload((body,), headers)


def install_parser() -> None:
    """The protocol's parser in place of the JSON one (after serving.uploads.install_parsers)."""
    table: Any = serde.ALL_SERDE
    table["application/json"] = ProtocolSerde


def how_to_send(model: ProtocolModel) -> str:
    return ('an Open Inference Protocol request: JSON {"inputs": [{"name": "images", '
            '"datatype": "UINT8", "shape": [N, H, W, C], "data": [...]}]}, or its binary tensor '
            f"extension (see GET /v2/models/{model.name})")


def read_infer_request(body: bytes, header_length: str, model: ProtocolModel) -> InferRequest:
    """The protocol's request body -> the images it carries (RejectedInput if malformed)."""
    document, binary = _split_body(body, header_length)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInferRequest(f'the body has no "inputs" list: send {how_to_send(model)}')
    inputs = document["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) \
            or inputs[0].get("name") != INPUT_NAME:
        names = [i.get("name") if isinstance(i, dict) else i for i in inputs]
        raise InvalidTensor(f"this model takes one input named {INPUT_NAME!r}, got {names}")
    pixels = _input_tensor(inputs[0], binary, model)
    request_id = document.get("id")
    parameters = _object(document.get("parameters"), "parameters")
    outputs = _requested_outputs(document.get("outputs"), model)
    return InferRequest(
        images=[_as_image(row) for row in pixels],
        id=str(request_id) if request_id is not None else None,
        parameters=parameters, outputs=outputs,
        binary_output=bool(parameters.get("binary_data_output", False)))


def _split_body(body: bytes, header_length: str) -> tuple[Any, bytes]:
    """The JSON part and the binary part of a body (all JSON without the extension's header)."""
    if header_length:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInferRequest(
                f"Inference-Header-Content-Length is {header_length!r}: it must be the length "
                f"in bytes of the JSON header that starts the body ({len(body)} bytes)")
        size = int(header_length)
        header, binary = body[:size], body[size:]
    else:
        header, binary = body, b""
    try:
        return json.loads(header), binary
    except (ValueError, UnicodeDecodeError) as exc:
        hint = ("" if header_length else "; a body with binary tensors needs the "
                "Inference-Header-Content-Length header")
        raise InvalidInferRequest(f"the request's JSON header is not valid JSON ({exc}){hint}"
                                  ) from None


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInferRequest(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _input_tensor(tensor: dict[str, Any], binary: bytes, model: ProtocolModel) -> np.ndarray:
    """The `images` input as uint8 (N, H, W[, C]), checked against the limits before its data is
    read."""
    if tensor.get("datatype") != "UINT8":
        raise InvalidTensor(f"{INPUT_NAME} has datatype {tensor.get('datatype')!r}; send UINT8 "
                            "pixels 0-255")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) not in (3, 4) \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise InvalidTensor(f"{INPUT_NAME} has shape {shape!r}; send [N, H, W, C] (or [N, H, W] "
                            "for one channel), every dimension at least 1")
    if len(shape) == 4 and shape[3] not in (1, 3, 4):
        raise InvalidTensor(f"{INPUT_NAME} has {shape[3]} channels; send 1 (grey), 3 (RGB) or 4 "
                            "(RGBA)")
    if shape[0] > model.max_images:
        raise TooManyImages(f"{shape[0]} images in one request, over the limit of "
                            f"{model.max_images} (limits.max_images_per_request): send them in "
                            "several requests")
    if shape[1] * shape[2] > model.max_pixels:
        raise ImageTooLarge(f"images of {shape[2]}x{shape[1]} pixels are over the limit of "
                            f"{model.max_pixels} (limits.max_image_pixels): send smaller images")
    count = math.prod(shape)
    size = _object(tensor.get("parameters"), f"{INPUT_NAME}.parameters").get("binary_data_size")
    if size is not None:
        if size != count or len(binary) != count:
            raise InvalidTensor(f"{INPUT_NAME} of shape {shape} is {count} bytes of UINT8; "
                                f"binary_data_size says {size!r} and the body carries "
                                f"{len(binary)} bytes after its JSON header")
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    if binary:
        raise InvalidInferRequest(f"the body has {len(binary)} bytes after its JSON header, but "
                                  f"no input declares binary_data_size")
    return _json_pixels(tensor.get("data"), shape, count)


def _json_pixels(data: Any, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidTensor(f'{INPUT_NAME} has no "data" list (or binary_data_size parameter)')
    try:
        array = np.asarray(data)
    except ValueError:  # ragged nested lists
        raise InvalidTensor(f"{INPUT_NAME}.data is not a rectangular array") from None
    if array.size != count or array.dtype.kind not in "iu":
        raise InvalidTensor(f"{INPUT_NAME}.data must be {count} whole numbers 0-255 (shape "
                            f"{shape}); got {array.size} values of type {array.dtype}")
    if array.min() < 0 or array.max() > 255:
        raise InvalidTensor(f"{INPUT_NAME}.data values must be 0-255 (UINT8)")
    return array.astype(np.uint8).reshape(shape)


def _as_image(row: np.ndarray) -> Image.Image:
    """One row of `images`: (H, W) or (H, W, C) pixels, as the image they are."""
    if row.ndim == 3 and row.shape[2] == 1:
        row = row[..., 0]
    return Image.fromarray(np.ascontiguousarray(row))


def _requested_outputs(value: Any, model: ProtocolModel) -> dict[str, bool | None]:
    if value is None:
        return {}
    known = [o.name for o in model.outputs]
    if not isinstance(value, list) or not all(isinstance(o, dict) for o in value):
        raise InvalidInferRequest('outputs must be a list of {"name": ...} objects')
    requested: dict[str, bool | None] = {}
    for output in value:
        name = output.get("name")
        if name not in known:
            raise InvalidTensor(f"no output {name!r}: this model answers {known}")
        binary = _object(output.get("parameters"), f"outputs[{name}].parameters").get(
            "binary_data")
        requested[str(name)] = None if binary is None else bool(binary)
    return requested


def infer_response(request: InferRequest, model: ProtocolModel,
                   rows: Sequence[Mapping[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """One request's rows (per image: output name -> value) -> the protocol's answer: its body
    and the headers that say how to read it."""
    names = list(request.outputs) or [o.name for o in model.outputs]
    tags = {str(row[MODEL_TAG]) for row in rows if MODEL_TAG in row}
    version = tags.pop().partition(":")[2] if len(tags) == 1 else model.version
    outputs, blobs = [], []
    for spec in (o for o in model.outputs if o.name in names):
        values = np.stack([np.asarray(row[spec.name]) for row in rows])
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype,
                                 "shape": list(values.shape)}
        binary = request.outputs.get(spec.name)
        if binary if binary is not None else request.binary_output:
            blob = _bytes_tensor(values) if spec.datatype == "BYTES" else values.astype(
                _numpy_type(spec.datatype)).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [str(v) for v in values.ravel()] if spec.datatype == "BYTES" \
                else values.ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model.name, "model_version": version,
                                "outputs": outputs}
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}


def _numpy_type(datatype: str) -> np.dtype[Any]:
    return next(dtype for dtype, name in DATATYPES.items() if name == datatype)


def _bytes_tensor(values: np.ndarray) -> bytes:
    """BYTES in the binary extension: each element as its 4-byte little-endian length, then
    its bytes."""
    out = bytearray()
    for value in values.ravel():
        data = str(value).encode()
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


@dataclass(frozen=True)
class Refusal:
    """A protocol route's 4xx, answered by admission's `refuse` (code -> status: serving/errors)."""

    code: str
    detail: str


class ProtocolRoutes:
    """The protocol's routes other than infer, and `/health`; inside admission, so the API key
    and the request log apply (security.public_paths opens the health routes). `models`: the
    served models, the default first."""

    def __init__(self, app: ASGIApp, *, models: Sequence[ProtocolModel],
                 service_name: str) -> None:
        self.app = app
        self.models = {model.name: model for model in models}
        self.default = models[0]
        self.infer_routes = {model.infer_route for model in models}
        self.service_name = service_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.infer_routes \
                or not (path == "/health" or path == "/v2" or path.startswith("/v2/")):
            return await self.app(scope, receive, send)
        answer = await self._answer(scope)
        if isinstance(answer, Refusal):  # the same body, status and count as every refusal
            allow = [(b"allow", b"GET")] if answer.code == "method_not_allowed" else []
            return await refuse(send, answer.code, answer.detail, allow)
        status, document = answer
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope) -> tuple[int, dict[str, Any]] | Refusal:
        path = scope["path"].rstrip("/") or "/"
        if scope["method"] not in ("GET", "HEAD") and not path.endswith("/infer"):
            return Refusal("method_not_allowed", f"{path} takes GET, not {scope['method']}")
        if path == "/health":
            ready = await self._ready(scope)
            return (200 if ready else 503), {
                "status": "healthy" if ready else "unavailable", "model_loaded": ready,
                "gpu_available": gpu_available(),
                "model": self.default.stored_tag}
        if path == "/v2":
            return 200, {"name": self.service_name, "version": "2",
                         "extensions": ["binary_tensor_data"]}
        if path == "/v2/health/live":
            return 200, {"live": True}
        if path == "/v2/health/ready":
            ready = await self._ready(scope)
            return (200 if ready else 503), {"ready": ready}
        parts = path.split("/")[3:] if path.startswith("/v2/models/") else None
        if not parts:
            return Refusal("not_found", f"no route {path}: the protocol's routes are "
                           f"/v2/health/live, /v2/health/ready and /v2/models/<name>"
                           f"[/versions/<version>][/ready|/infer]")
        name, rest = parts[0], parts[1:]
        model = self.models.get(name)
        if model is None:
            names = ", ".join(repr(n) for n in self.models)
            return Refusal("unknown_model", f"no model {name!r}: this server serves {names} "
                           f"(GET /v2/models/<name>)")
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or rest[1] != model.version:
                return Refusal("unknown_model", f"model {name!r} has no version "
                               f"{rest[1] if len(rest) > 1 else ''!r}: it serves version "
                               f"{model.version!r}")
            rest = rest[2:]
        if rest == []:
            return 200, model.metadata()
        if rest == ["ready"]:
            ready = await self._ready(scope)
            return (200 if ready else 503), {"name": name, "ready": ready}
        if rest == ["infer"]:  # another method than POST on the infer route
            return Refusal("method_not_allowed",
                           f"{path} takes POST with {how_to_send(model)}")
        return Refusal("not_found", f"no route {path}")

    async def _ready(self, scope: Scope) -> bool:
        """Ready as /readyz says: the model is loaded and answering."""
        status = 503

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        probe = {**scope, "path": "/readyz", "raw_path": b"/readyz", "method": "GET",
                 "query_string": b""}
        await self.app(probe, receive, send)
        return bool(status == 200)


class ProtocolPaths:
    """Outside every other middleware: the versioned infer path is the infer route; and on /v2
    paths an error's `error` carries its code and reason, since the protocol's clients
    (tritonclient, KServe's) show that field alone."""

    def __init__(self, app: ASGIApp, *, models: Sequence[ProtocolModel]) -> None:
        self.app = app
        self.versioned_infer = {
            f"/v2/models/{model.name}/versions/{model.version}/infer": model.infer_route
            for model in models}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v2"):
            return await self.app(scope, receive, send)
        if route := self.versioned_infer.get(scope["path"]):
            scope = {**scope, "path": route, "raw_path": route.encode()}
        await self.app(scope, receive, ProtocolErrors(send).send)


class ProtocolErrors:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: Message | None = None
        self._body = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self._held = message
            return
        if self._held is None or message["type"] != "http.response.body":
            return await self._send(message)
        self._body += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = self._body
        if is_error_body(body):
            document = json.loads(body)
            body = json.dumps({"error": f"{document['error']}: {document['detail']}",
                               "detail": document["detail"]}).encode()
        headers = [(k, v) for k, v in self._held.get("headers", [])
                   if k.lower() != b"content-length"]
        await self._send({**self._held,
                          "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body})
