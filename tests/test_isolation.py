"""Serving never needs torch, torchvision or train_export: not imported, and not importable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import python

pytestmark = pytest.mark.e2e

# Makes `import torch`, `import torchvision` and `import train_export` fail in the child process,
# as on a serving host that never installed them.
BLOCK_TRAINING_STACK = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'train_export'):\n"
    "    sys.modules[name] = None\n"
)


# BentoML's app for a service's routes (with aiohttp): imported by the worker that builds it.
SERVICE_APP = "_bentoml_impl.server.app"


def modules_loaded_by(service: str) -> set[str]:
    """The modules a fresh process has loaded once it imported `service` from service.py (which
    reads the service's model from the store)."""
    result = python("-c", f"import sys, json; from service import {service}; "
                    "print(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_importing_the_classifier_loads_no_training_module(trained_model: str) -> None:
    loaded = modules_loaded_by("ImageClassifier")
    assert not {"torch", "torchvision", "train_export"} & loaded, "serving imported training code"
    assert "serving.deployment" in loaded, "the service read its model from the store"
    assert "onnxruntime" not in loaded, \
        "ONNX Runtime waits for a worker: BentoML's supervisor imports the service module too"
    assert SERVICE_APP not in loaded, \
        "BentoML's service app waits for a worker (serving/wiring.py patched_when_built)"


def test_importing_the_detector_loads_no_training_module(trained_detector: str) -> None:
    loaded = modules_loaded_by("ObjectDetector")
    assert not {"torch", "torchvision", "train_export"} & loaded, "serving imported training code"
    assert "serving.deployment" in loaded, "the service read its model from the store"
    assert "onnxruntime" not in loaded, \
        "ONNX Runtime waits for a worker: BentoML's supervisor imports the service module too"
    assert SERVICE_APP not in loaded, \
        "BentoML's service app waits for a worker (serving/wiring.py patched_when_built)"


def test_a_built_app_has_the_projects_dispatcher_and_no_idle_tracing(trained_model: str) -> None:
    """What importing the service defers (BentoML's service app, 10 MB of `bentoml serve`'s
    main process) is done when a worker builds its app: the dispatcher batching.dispatch names
    and the middleware list without OpenTelemetry's."""
    script = (
        "import sys\n"
        "from service import ImageClassifier\n"
        f"assert {SERVICE_APP!r} not in sys.modules\n"
        "ImageClassifier.to_asgi()\n"
        "from _bentoml_impl.server import app\n"
        "from serving import batcher\n"
        "import classifier_service\n"
        "dispatch = classifier_service.SETTINGS.batching_dispatch\n"
        "built = app.CorkDispatcher\n"
        "assert built is batcher.DISPATCHERS[dispatch], (dispatch, built)\n"
        "assert app.ServiceAppFactory.middlewares.fget.idle_tracing_left_out\n"
        "print('patched', dispatch)\n")
    result = python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["patched", "refill"], result.stdout


def test_stored_model_predicts_where_torch_cannot_be_imported(trained_model: str,
                                                              examples_dir: Path) -> None:
    example = sorted(examples_dir.glob("*.png"))[0]
    script = BLOCK_TRAINING_STACK + f"""
import numpy as np
from pathlib import Path
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch should not be importable here")
import bentoml
import pytest
from serving.contract import ModelCard, ONNX_FILE
from serving.preprocess import decode_image
from serving.runtime import OnnxRuntime
entry = Path(bentoml.models.get({trained_model!r}).path)
card = ModelCard.read(entry)
runtime = OnnxRuntime(entry / ONNX_FILE, card.input, card.graph, providers=["cpu"])
probabilities, _ = runtime.run(decode_image(Path({str(example)!r}), card.input)[np.newaxis])
print(card.labels[int(probabilities.argmax())])
"""
    result = python("-c", script)
    assert result.returncode == 0, result.stderr
    true_label = example.name.split("_")[1]
    assert result.stdout.split()[-1] == true_label
