"""One typed settings model for the project's section of configuration.yaml.

configuration.yaml is a BentoML configuration file: BentoML's own keys for the service under
`services.ImageClassifier` (traffic, workers, metrics), and inside that block our
`image_classifier:` section, validated here. The file is `$BENTOML_CONFIG` when set, else the
configuration.yaml next to service.py (also inside a built bento and its container).

Why our section sits inside the service block and the file has no `version: 2` line: BentoML
1.4.39's CLI and worker processes validate $BENTOML_CONFIG against the v1 schema when they start,
which rejects `version: 2` and every unknown top-level key ("Key 'version' error: <lambda>(2)
should evaluate to True"). Only `services:` passes both schemas, and without `version` the v2
loader that configures the service assumes version 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SECTION = "image_classifier"
SERVICE_NAME = "ImageClassifier"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configuration.yaml"

Provider = Literal["tensorrt", "cuda", "cpu"]


class ConfigurationError(RuntimeError):
    """configuration.yaml is missing or holds a value outside what is allowed."""


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(_Section):
    tag: str = Field(
        default="digits-classifier:latest",
        pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$",
        description="BentoML model tag, name[:version]; 'latest' follows the newest export.",
    )
    providers: list[Provider] = Field(
        default=["cuda", "cpu"],
        min_length=1,
        description="ONNX Runtime execution providers in order of preference; unavailable "
        "ones are skipped, and the CPU is always the last resort.",
    )
    intra_op_threads: int = Field(
        default=1, ge=0,
        description="Threads ONNX Runtime uses per worker; 0 = one per core. One thread per "
        "worker process, and one worker per core, served most on CPU.",
    )


class BatchingSettings(_Section):
    # BentoML requires max_batch_size > 1 for a batchable API.
    max_batch_size: int = Field(default=64, gt=1, le=4096)
    max_latency_ms: int = Field(default=1000, gt=0)


class LimitsSettings(_Section):
    # Checked from the image header, before decoding: decoding runs in a worker's event loop, and
    # Pillow only warns (does not refuse) below 179 Mpx. 40 Mpx covers any phone camera.
    max_image_pixels: int = Field(default=40_000_000, gt=0)


class ResponseSettings(_Section):
    top_k: int = Field(default=3, ge=1, description="Classes listed per image in `top_k`.")


class Settings(_Section):
    model: ModelSettings = ModelSettings()
    batching: BatchingSettings = BatchingSettings()
    limits: LimitsSettings = LimitsSettings()
    response: ResponseSettings = ResponseSettings()


def config_path() -> Path:
    return Path(os.environ.get("BENTOML_CONFIG") or DEFAULT_CONFIG_PATH)


def read_config_file(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    if not path.is_file():
        raise ConfigurationError(
            f"configuration file {path} not found: set BENTOML_CONFIG to an existing YAML file "
            f"or restore configuration.yaml next to service.py."
        )
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path} must hold a YAML mapping at the top level.")
    return document


def _service_block(document: dict[str, Any]) -> dict[str, Any]:
    return dict((document.get("services") or {}).get(SERVICE_NAME) or {})


def parse_settings(document: dict[str, Any], source: str = "configuration.yaml") -> Settings:
    try:
        return Settings.model_validate(_service_block(document).get(SECTION) or {})
    except ValidationError as exc:
        where = f"services.{SERVICE_NAME}.{SECTION}"
        problems = "\n".join(
            f"  {where}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            f" (got {err['input']!r})"
            for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid settings in {source}:\n{problems}") from None


def service_config(document: dict[str, Any]) -> dict[str, Any]:
    """BentoML's own settings for our service (`services.ImageClassifier` less our section),
    passed to `@bentoml.service` so that they apply without BENTOML_CONFIG; when BENTOML_CONFIG
    is set, BentoML reads the same file and the values agree."""
    block = _service_block(document)
    block.pop(SECTION, None)
    return block


def load() -> tuple[Settings, dict[str, Any]]:
    path = config_path()
    document = read_config_file(path)
    return parse_settings(document, str(path)), service_config(document)
