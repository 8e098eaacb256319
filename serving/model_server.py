"""Many models in one deployment (models_service.py): each model listed in configuration.yaml
with its own task, store tag, labels and input size, and its own batcher queues, limits, drift
monitor and rollout.

A model is served by the same objects as a single-model service (a Deployment, a task, its
Inputs, a Predictor per worker); what this module adds is its routes, under its name:
`/models/<name>/classify` (or `/detect`), `/models/<name>/classify_tensor`, `/models/<name>/
model_info`, `/models/<name>/drift`, and the protocol's `/v2/models/<name>/infer`. Each route is
a BentoML API of its own, so each model has its own adaptive batcher queue. The default model
also answers the unprefixed routes (`/classify`, ...), as a single-model service does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

from .admission import refuse
from .asgi import ASGIApp, Receive, Scope, Send
from .classification import Classification
from .contract import DetectionSpec
from .deployment import Deployment, packed_models
from .detection import Detection
from .inputs import Inputs
from .predictor import Predictor, Task
from .runtime import OnnxRuntime
from .schemas import (
    DetectionDefaults,
    DetectionResult,
    DetectorInfo,
    DriftReport,
    ModelInfo,
    Prediction,
)
from .settings import (
    ClassifierEntry,
    ConfigurationError,
    DetectorEntry,
    LimitsSettings,
    ModelServerSettings,
)
from .wiring import batching

Entry = ClassifierEntry | DetectorEntry
Info = Callable[[Deployment, int, OnnxRuntime, Any], BaseModel]


def classifier_info(deployment: Deployment, index: int, runtime: OnnxRuntime,
                    settings: Any) -> BaseModel:
    card: Any = deployment.served[index].card  # a classifier's: its parity is a Parity
    return ModelInfo(**deployment.describe(index, runtime), parity=card.parity,
                     class_accuracy=card.class_accuracy, top_k=settings.response.top_k)


def detector_info(deployment: Deployment, index: int, runtime: OnnxRuntime,
                  settings: Any) -> BaseModel:
    card: Any = deployment.served[index].card  # a detector's: its parity is a DetectionParity
    return DetectorInfo(**deployment.describe(index, runtime), parity=card.parity,
                        class_ap=card.class_ap,
                        detection=DetectionDefaults(**settings.detection.model_dump()))


def detection_spec(deployment: Deployment) -> DetectionSpec:
    spec = deployment.card.detection
    if spec is None:  # a detection card always has one (ModelCard's validation)
        raise ConfigurationError(f"model {deployment.served[0].tag} has no detection spec")
    return spec


@dataclass(frozen=True)
class TaskRoutes:
    """What differs between tasks in their routes: the verb, the answers' type, /model_info."""

    verb: str
    answers: Any
    info_type: type[BaseModel]
    info: Info
    # -> the task (a Task; the protocol's Optional options_model is not spelled alike in each)
    make_task: Callable[[Deployment, Any], Any]


TASKS: dict[str, TaskRoutes] = {
    "classification": TaskRoutes(
        "classify", Annotated[list[Prediction], ContentType("application/json")], ModelInfo,
        classifier_info,
        lambda deployment, entry: Classification(deployment.card.labels, entry.response.top_k)),
    "detection": TaskRoutes(
        "detect", Annotated[list[DetectionResult], ContentType("application/json")],
        DetectorInfo, detector_info,
        lambda deployment, entry: Detection(deployment.card.labels, detection_spec(deployment),
                                            entry.detection)),
}


@dataclass(frozen=True)
class ServedModel:
    """One model of the deployment: its settings, what it serves, and its routes' pieces."""

    settings: Entry
    deployment: Deployment
    task: Task
    inputs: Inputs
    routes: TaskRoutes

    @classmethod
    def read(cls, entry: Entry, models: Mapping[str, bentoml.models.BentoModel]) -> ServedModel:
        deployment = Deployment.read(entry, dict(models), task=entry.task)
        routes = TASKS[entry.task]
        task = routes.make_task(deployment, entry)
        return cls(entry, deployment, task, Inputs(deployment, task, entry.name), routes)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def prefix(self) -> str:
        return f"/models/{self.name}"

    def route(self, endpoint: str) -> str:
        return f"{self.prefix}/{endpoint}"

    def api_routes(self) -> list[str]:
        """The routes that take images: they answer under the model's limits."""
        verb = self.routes.verb
        return [self.route(verb), self.route(f"{verb}_tensor"), self.inputs.protocol.infer_route]


class ModelServerInfo(BaseModel):
    """/model_info of a multi-model deployment: every model, by name."""

    default_model: str
    models: dict[str, ModelInfo | DetectorInfo] = Field(
        description="Per model name: what /models/<name>/model_info answers.")


def read_models(settings: ModelServerSettings
                ) -> tuple[dict[str, bentoml.models.BentoModel], list[ServedModel]]:
    """Every model the deployment packs (by tag), and each served model, read and checked."""
    packed: dict[str, bentoml.models.BentoModel] = {}
    for entry in settings.models:
        packed.update(packed_models(entry))
    return packed, [ServedModel.read(entry, packed) for entry in settings.models]


def route_limits(served: list[ServedModel]) -> dict[str, tuple[LimitsSettings, str]]:
    """Each model's image routes, with its limits and where they live in the file."""
    return {route: (model.settings.limits, model.settings.where.key("limits"))
            for model in served for route in model.api_routes()}


def default_aliases(served: list[ServedModel], default: str) -> dict[str, str]:
    """The unprefixed routes of each task (/classify, /detect, ...): the default model's when it
    has that task, else the first model's of that task."""
    ordered = sorted(served, key=lambda model: model.name != default)
    aliases: dict[str, str] = {}
    for model in ordered:
        verb = model.routes.verb
        for endpoint in (verb, f"{verb}_tensor"):
            aliases.setdefault(f"/{endpoint}", model.route(endpoint))
    return aliases


def api_name(model: ServedModel, endpoint: str) -> str:
    """A Python identifier for one model's endpoint: BentoML names APIs by attribute."""
    return f"{endpoint}__{re.sub(r'[^0-9a-zA-Z]', '_', model.name)}"


def add_routes(cls: type, model: ServedModel) -> None:
    """The model's endpoints as methods of the service class `cls`, whose instances hold a
    `predictors` dict by model name."""
    name, verb, inputs = model.name, model.routes.verb, model.inputs
    options = batching(model.settings)

    def predict(self: Any, images: Any) -> Any:
        return self.predictors[name].predict(images)

    def predict_tensor(self: Any, pixels: Any) -> Any:
        return self.predictors[name].predict(pixels)

    def infer(self: Any, inputs: Any) -> Any:
        return self.predictors[name].predict_tensors(inputs)

    def model_info(self: Any, context: bentoml.Context) -> Any:
        return self.model_info_of(name, context)

    def drift(self: Any, test_now: bool = False) -> Any:
        predictor: Predictor = self.predictors[name]
        return model.deployment.drift_report(predictor.monitors, test_now)

    protocol_answers = Annotated[list[Any], ContentType("application/json")]
    json = ContentType("application/json")
    endpoints: list[tuple[Callable[..., Any], str, dict[str, Any], dict[str, Any], str]] = [
        (predict, verb, {"images": inputs.image_uploads, "return": model.routes.answers},
         options, f"{verb.capitalize()} uploads (multipart field `images`) with model "
         f"{name!r}, as /{verb} does."),
        (predict_tensor, f"{verb}_tensor", {"pixels": inputs.pixel_tensor,
                                            "return": model.routes.answers},
         options, f"Already-decoded pixels for model {name!r}, as /{verb}_tensor."),
        (infer, "infer", {"inputs": inputs.protocol_images, "return": protocol_answers},
         options, f"The Open Inference Protocol for model {name!r} "
         "(docs/inference-protocol.md)."),
        (model_info, "model_info", {"context": bentoml.Context,
                                    "return": Annotated[model.routes.info_type, json]},
         {}, f"Model {name!r}: tag, labels, input spec, provider, accuracy, variants."),
        (drift, "drift", {"test_now": bool, "return": Annotated[DriftReport, json]}, {},
         f"Online drift of model {name!r} in the worker that answers."),
    ]
    for function, endpoint, types, api_options, doc in endpoints:
        function.__name__ = function.__qualname__ = api_name(model, endpoint)
        function.__annotations__ = types
        function.__doc__ = doc
        route = inputs.protocol.infer_route if endpoint == "infer" else model.route(endpoint)
        setattr(cls, function.__name__, bentoml.api(route=route, **api_options)(function))


class UnknownModels:
    """A request for `/models/<name>/...` naming no served model: a 404 that lists them (inside
    admission, so only a caller with the key learns the names)."""

    def __init__(self, app: ASGIApp, *, names: list[str]) -> None:
        self.app = app
        self.names = set(names)
        self.listed = ", ".join(names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/models/"):
            name = path.split("/")[2]
            if name not in self.names:
                return await refuse(send, "unknown_model", f"no model {name!r}: this deployment "
                                    f"serves {self.listed} (POST /model_info lists them)")
        await self.app(scope, receive, send)
