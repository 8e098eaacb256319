"""ModelServer: many models in one deployment (`bentoml serve service:ModelServer`), each listed
in configuration.yaml under `services.ModelServer.model_server.models` with its own name, task,
store tag, labels and input size.

Each model is served as ImageClassifier or ObjectDetector serves theirs (the same path, file by
file: classifier_service.py), with its own routes under `/models/<name>/` and the protocol's
`/v2/models/<name>/`, its own batcher queues, limits, metrics labels (its tag), drift monitor and
rollout; serving/model_server.py builds them. The default model also answers `/classify` (or
`/detect`), so a client of a single-model service works unchanged. No torch, no training code.
"""

from __future__ import annotations

from typing import Annotated

import bentoml
from bentoml.validators import ContentType

from serving import settings, wiring
from serving.model_server import (
    ModelServerInfo,
    UnknownModels,
    add_routes,
    default_aliases,
    read_models,
    route_limits,
)
from serving.predictor import Predictor

SETTINGS, BENTOML_SERVICE_CONFIG = settings.load(settings.MODEL_SERVER,
                                                 settings.ModelServerSettings)
MODELS, SERVED = read_models(SETTINGS)
BY_NAME = {model.name: model for model in SERVED}


class ModelServer:
    """Several image models (classifiers and detectors) with ONNX graphs from the model store."""

    def __init__(self) -> None:
        self.predictors: dict[str, Predictor] = {
            model.name: model.deployment.start(model.task) for model in SERVED}

    def __is_ready__(self) -> bool:
        return all(self.predictors[m.name].check_ready(m.deployment.card.input) for m in SERVED)

    def model_info_of(self, name: str, context: bentoml.Context) -> object:
        model = BY_NAME[name]
        index = model.deployment.router.for_request(context.request)
        return model.routes.info(model.deployment, index, self.predictors[name].runtimes[index],
                                 model.settings)

    @bentoml.api(route="/model_info")
    def model_info(
        self, context: bentoml.Context
    ) -> Annotated[ModelServerInfo, ContentType("application/json")]:
        """Every model of the deployment, by name (each as /models/<name>/model_info answers),
        and the default one, which answers /classify or /detect."""
        return ModelServerInfo(default_model=SETTINGS.default, models={
            model.name: self.model_info_of(model.name, context) for model in SERVED})


for served in SERVED:
    add_routes(ModelServer, served)

ModelServer = wiring.as_service(
    ModelServer, settings=SETTINGS, bentoml_config=BENTOML_SERVICE_CONFIG, models=MODELS,
    description_file="service-models.md",
    version=BY_NAME[SETTINGS.default].deployment.served[0].tag,
    protocols=sorted((m.inputs.protocol for m in SERVED),
                     key=lambda protocol: protocol.name != SETTINGS.default),
    route_limits=route_limits(SERVED), aliases=default_aliases(SERVED, SETTINGS.default),
    inner=[(UnknownModels, {"names": [model.name for model in SERVED]})])
