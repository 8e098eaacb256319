"""The multi-model deployment's settings and route tables, without a server (the served whole:
tests/test_model_server.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from serving import settings
from serving.admission import Admission, Route
from serving.model_server import TASKS, default_aliases
from tests.helpers import http_scope, run_asgi


def parse(model_server: dict[str, Any]) -> settings.ModelServerSettings:
    document = {"services": {"ModelServer": {"model_server": model_server}}}
    parsed: settings.ModelServerSettings = settings.parse_settings(
        document, "test.yaml", settings.MODEL_SERVER, settings.ModelServerSettings)
    return parsed


TWO = [{"name": "digits", "task": "classification"}, {"name": "scenes", "task": "detection"}]


def test_each_model_gets_its_task_defaults_and_its_path() -> None:
    parsed = parse({"models": TWO})
    digits, scenes = parsed.models
    assert isinstance(digits, settings.ClassifierEntry)
    assert isinstance(scenes, settings.DetectorEntry)
    assert (digits.model_tag, scenes.model_tag) == ("digits-classifier:latest",
                                                    "digits-detector:latest")
    assert scenes.where.key("limits") == "services.ModelServer.model_server.models[1].limits"
    assert digits.where.model_tag_env == "MODEL_SERVER_DIGITS_MODEL_TAG"
    assert parsed.default == "digits"
    assert parsed.batching_dispatch == "refill"


def test_a_model_tag_variable_pins_one_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_SERVER_SCENES_MODEL_TAG", "digits-detector:v2")
    digits, scenes = parse({"models": TWO}).models
    assert [v.tag for v in scenes.served_variants()] == ["digits-detector:v2"]
    assert [v.tag for v in digits.served_variants()] == ["digits-classifier:latest"]


@pytest.mark.parametrize(("model_server", "message"), [
    ({"models": []}, "models"),
    ({"models": [TWO[0], TWO[0]]}, "listed twice"),
    ({"models": TWO, "default_model": "other"}, "default_model 'other'"),
    ({"models": [{"name": "Digits", "task": "classification"}]}, "name"),
    ({"models": [{"name": "digits", "task": "segmentation"}]}, "segmentation"),
    ({"models": [{**TWO[0], "security": {}}]}, "security is one per deployment"),
    ({"models": [{**TWO[0], "detection": {}}]}, "detection"),
    ({"models": [TWO[0], {**TWO[1], "batching": {"dispatch": "cork"}}]},
     "batching.dispatch differs"),
    ({"models": [{**TWO[1], "limits": {"max_images_per_request": 0}}]},
     "models.0.detection.limits.max_images_per_request"),
])
def test_invalid_model_lists_are_refused_with_the_key(model_server: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(settings.ConfigurationError, match=message.replace("[", r"\[")):
        parse(model_server)


def served(name: str, task: str) -> Any:
    routes = TASKS[task]
    return SimpleNamespace(name=name, routes=routes,
                           route=lambda endpoint: f"/models/{name}/{endpoint}")


def test_unprefixed_routes_go_to_the_default_model_of_their_task() -> None:
    models = [served("a", "classification"), served("b", "classification"),
              served("c", "detection")]
    aliases = default_aliases(models, default="b")
    assert aliases == {"/classify": "/models/b/classify",
                       "/classify_tensor": "/models/b/classify_tensor",
                       "/detect": "/models/c/detect", "/detect_tensor": "/models/c/detect_tensor"}


def test_each_models_routes_count_their_own_requests_in_flight() -> None:
    """A model at its max_concurrency is refused; another model is not."""
    async def hold(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    tight = settings.LimitsSettings(max_concurrency=1)
    routes = {path: Route("application/json", "{}") for path in ("/models/a/x", "/models/b/x")}
    admission = Admission(hold, routes=routes, limits=settings.LimitsSettings(), public_paths=[],
                          api_key=None, route_limits={"/models/a/x": (tight, "models[0].limits")})
    admission.budgets["/models/a/x"].in_flight = 1  # one request of model a in flight
    refused = run_asgi(admission, http_scope("/models/a/x"))
    assert refused.status == 429 and "models[0].limits.max_concurrency" in refused.json()["detail"]
    assert run_asgi(admission, http_scope("/models/b/x")).status == 200
