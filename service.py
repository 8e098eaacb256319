"""The project's BentoML services, one per task: `bentoml serve service:ImageClassifier` (image
classification, classifier_service.py) or `bentoml serve service:ObjectDetector` (object
detection, detector_service.py); and `service:ModelServer` (models_service.py), several models of
either task in one deployment.

Each lives in its own module, imported only when it is asked for: a service reads its model
from the store when its module is imported, so serving one task never needs the other's model.
"""

from __future__ import annotations

import importlib
from typing import Any

MODULES = {"ImageClassifier": "classifier_service", "ObjectDetector": "detector_service",
           "ModelServer": "models_service"}


def __getattr__(name: str) -> Any:
    if name not in MODULES:
        raise AttributeError(f"module 'service' has no service {name!r}; serve one of "
                             f"{', '.join(sorted(MODULES))}, e.g. `bentoml serve service:"
                             f"ImageClassifier`")
    return getattr(importlib.import_module(MODULES[name]), name)


def __dir__() -> list[str]:
    return sorted(MODULES)
