"""One typed settings model per service for the project's section of configuration.yaml.

configuration.yaml is a BentoML configuration file: BentoML's own keys for each service under
`services.<Service>` (traffic, workers, metrics), and inside that block our section
(`image_classifier:` for ImageClassifier), validated here. The file is `$BENTOML_CONFIG` when set,
else the configuration.yaml next to service.py (also inside a built bento and its container).

Why our section sits inside the service block and the file has no `version: 2` line: BentoML
1.4.39's CLI and worker processes validate $BENTOML_CONFIG against the v1 schema when they start,
which rejects `version: 2` and every unknown top-level key ("Key 'version' error: <lambda>(2)
should evaluate to True"). Only `services:` passes both schemas, and without `version` the v2
loader that configures the service assumes version 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configuration.yaml"

Provider = Literal["tensorrt", "cuda", "cpu"]
MIN_API_KEY_LENGTH = 16
TAG_PATTERN = r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$"
# BentoML's own request timeout stays on as a backstop behind ours (which answers with our JSON).
BENTOML_TIMEOUT_MARGIN_S = 10


@dataclass(frozen=True)
class ServiceSection:
    """Where one service's settings live in configuration.yaml, and its service-specific
    defaults: what error messages name, and what an operator sets to roll back."""

    service: str  # the BentoML service (class) name, the key under `services:`
    section: str  # our block inside it
    default_model: str
    # One variable to roll back (or pin) the served model without editing the file.
    model_tag_env: str
    api_key_env: str
    how_to_train: str

    @property
    def path(self) -> str:
        return f"services.{self.service}.{self.section}"

    def key(self, name: str) -> str:
        """The full path of one setting, as an error message names it."""
        return f"{self.path}.{name}"


CLASSIFIER = ServiceSection(
    service="ImageClassifier",
    section="image_classifier",
    default_model="digits-classifier:latest",
    model_tag_env="IMAGE_CLASSIFIER_MODEL_TAG",
    api_key_env="IMAGE_CLASSIFIER_API_KEY",
    how_to_train="`make train` (or `python -m train_export`)",
)
DETECTOR = ServiceSection(
    service="ObjectDetector",
    section="object_detector",
    default_model="digits-detector:latest",
    model_tag_env="OBJECT_DETECTOR_MODEL_TAG",
    api_key_env="OBJECT_DETECTOR_API_KEY",
    how_to_train="`make train-detector` (or `python -m train_export --task detection`)",
)
# Kept for callers that name the classifier's section directly.
SECTION, SERVICE_NAME = CLASSIFIER.section, CLASSIFIER.service
MODEL_TAG_ENV = CLASSIFIER.model_tag_env


class ConfigurationError(BentoMLException):
    """configuration.yaml is missing or holds a value outside what is allowed.

    A BentoMLException, so that `bentoml serve` and `bentoml build`, which import the service
    (and so read the file) before anything else, print it as one line, `Error: [cli] `serve`
    failed: <message>`, and exit 1, without a Python traceback (BENTOML_DEBUG shows one)."""


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(_Section):
    tag: str | None = Field(
        default=None,
        pattern=TAG_PATTERN,
        description="BentoML model tag, name[:version]; 'latest' follows the newest export. "
        "Default: the service's default model (digits-classifier:latest for ImageClassifier). "
        "The service's MODEL_TAG variable (IMAGE_CLASSIFIER_MODEL_TAG), when set, wins over "
        "this and over rollout.variants (rollback).",
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
    lone_request_threads: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        default="auto",
        description="On a CPU: threads for the call of a request alone in its worker (one "
        "image) made while no other worker's runtime is busy, on a second session of the "
        "graph that shares its weights "
        "(serving/cores.py); 0 = one per core; no more than intra_op_threads: none. auto: one "
        "per core. Its threads spin between operators while the call runs and stop when it "
        "returns.",
    )
    thread_spinning: bool = Field(
        default=False,
        description="With more than one thread: ONNX Runtime's threads spin between operators "
        "instead of sleeping (its own default). Faster for small operators in a worker that has "
        "the machine to itself; with several workers, spinning threads take the cores the "
        "others need.",
    )
    cudnn_conv_algo_search: Literal["heuristic", "exhaustive", "default"] = Field(
        default="heuristic",
        description="On the CUDA provider: how each convolution's cuDNN plan is chosen when a "
        "session meets a new input shape. heuristic: cuDNN's rules, at once. exhaustive (ONNX "
        "Runtime's own default): every algorithm timed, hundreds of milliseconds per call that "
        "meets a new shape; a GPU worker's sessions each meet theirs while it starts "
        "(serving/runtime.py, settle_batch_shapes). default: one fixed algorithm.",
    )


class VariantSettings(_Section):
    tag: str = Field(pattern=TAG_PATTERN)
    weight: float = Field(
        ge=0,
        description="Share of traffic, relative to the other variants' weights. 0 packs the "
        "model into the bento and loads it, but sends it nothing: a rollback target in the image.",
    )


class ShadowSettings(_Section):
    tag: str = Field(pattern=TAG_PATTERN)
    fraction: float = Field(
        default=1.0, gt=0, le=1,
        description="Share of images copied to the shadow model. It runs in a process of its "
        "own per worker, at the lowest CPU priority, and drops copies rather than queue them "
        "when it falls behind.",
    )
    queue_batches: int = Field(default=4, gt=0, description="Batches waiting for the shadow.")


class RolloutSettings(_Section):
    """Several models behind one API: A/B variants with weights, and a shadow (docs/rollout.md)."""

    variants: list[VariantSettings] = Field(
        default=[],
        description="Models that share the traffic by weight, instead of model.tag alone. All "
        "variants and the shadow must have the same labels and input spec.",
    )
    sticky_headers: list[str] = Field(
        default=["X-Client-ID", "X-Request-ID"],
        description="The first of these headers a request has is its routing key: a key always "
        "goes to the same variant. Requests with none are routed at random by weight.",
    )
    shadow: ShadowSettings | None = Field(
        default=None,
        description="A candidate that sees a copy of the traffic; its answers are compared with "
        "the served ones (agreement and latency in /metrics and the log), never returned.",
    )

    @model_validator(mode="after")
    def _some_variant_gets_traffic(self) -> RolloutSettings:
        if self.variants and not any(v.weight > 0 for v in self.variants):
            raise ValueError("rollout.variants: every weight is 0; give one variant a weight")
        tags = [v.tag for v in self.variants]
        if len(set(tags)) != len(tags):
            raise ValueError("rollout.variants lists a tag twice; merge their weights")
        return self


class BatchingSettings(_Section):
    # BentoML requires max_batch_size > 1 for a batchable API.
    max_batch_size: int = Field(default=64, gt=1, le=4096)
    max_latency_ms: int = Field(default=1000, gt=0)
    runtime_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        default="auto",
        description="Images per runtime call: a batch from the queue runs in pieces of this "
        "size. auto: measured in each worker at start, the smallest power of two within 10% of "
        "the best images per second (serving/calibration.py); a CPU is often fastest at 4-16, "
        "and ONNX Runtime keeps memory for the largest call it has made.",
    )
    dispatch: Literal["refill", "eager", "cork"] = Field(
        default="refill",
        description="When a batch leaves the queue. eager: as soon as no batch is running (a "
        "lone request waits for nothing; serving/batcher.py). refill: the same, except that "
        "after a batch of several requests the next waits up to 2 ms for as many (the clients "
        "just answered, sending again). cork: BentoML's own rule, which holds requests back "
        "while it predicts that a bigger batch pays. One rule per worker: in a multi-model "
        "deployment every model must name the same.",
    )
    fast_lane: bool = Field(
        default=True,
        description="Batched routes are answered without BentoML's router and endpoint "
        "machinery, with the same validation, limits, batcher and answer (serving/fast_lane.py); "
        "a request that finds its model idle in its worker (nothing else in flight) skips the "
        "batcher too. false: BentoML's whole path, for a comparison. One setting per worker: in "
        "a multi-model deployment the first model's holds.",
    )


class LimitsSettings(_Section):
    """What one request may ask of the service; each refusal has its own status
    (docs/limits-and-security.md)."""

    max_request_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0,
        description="Request body size; refused (413) from Content-Length, or while streaming "
        "when there is none, before the body is read.",
    )
    # Checked from the image header, before decoding: decoding runs in a worker's event loop, and
    # Pillow only warns (does not refuse) below 179 Mpx. 40 Mpx covers any phone camera.
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_images_per_request: int = Field(
        default=32, gt=0,
        description="Images (or tensor rows) in one request; more are refused (413). At most "
        "batching.max_batch_size: one request must fit one batch.",
    )
    max_images_per_job: int = Field(
        default=1000, gt=0,
        description="Images in one asynchronous job (/classify_batch/submit); the body is "
        "still bounded by max_request_bytes.",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0,
        description="A request not answered in this time gets 504; also bounds how long a "
        "graceful shutdown waits for requests in flight.",
    )
    max_concurrency: int = Field(
        default=512, gt=0,
        description="Requests a worker process holds, waiting at the gate or past it; more get "
        "429 with Retry-After. Per worker, not per service: workers share connections, not "
        "requests.",
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="Retry-After sent with 429 and 503 answers."
    )
    target_wait_ms: int = Field(
        default=500, ge=0,
        description="The gate in front of a worker lets through what it answers in this time at "
        "its measured pace (Little's law: answers/s x this), so that a request past it waits "
        "about this long; the others wait their turn with their body unread. Below "
        "batching.max_latency_ms, so that the batcher does not drop uploads already decoded. "
        "0: no gate (every request up to max_concurrency goes in at once).",
    )
    max_queue_wait_ms: int = Field(
        default=10_000, gt=0,
        description="How long a request may wait at the gate for its turn (at most "
        "request_timeout_s); then 503 overloaded with Retry-After.",
    )


class SecuritySettings(_Section):
    api_key_env: str | None = Field(
        default=None,
        description="Environment variable holding the API key; unset or empty = no key. "
        "Default: IMAGE_CLASSIFIER_API_KEY for ImageClassifier.",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File holding the API key (a mounted secret); read at startup, wins over "
        "the environment variable.",
    )
    public_paths: list[str] = Field(
        default=["/livez", "/readyz", "/healthz", "/health", "/v2/health/live",
                 "/v2/health/ready", "/metrics",
                 "/", "/docs.json", "/schema.json", "/static_content/", "/assets/"],
        description="Paths open without the key; an entry ending in '/' opens that prefix. "
        "Everything else, every model endpoint included, needs it.",
    )


class DriftSettings(_Section):
    """Online drift detection (serving/drift.py), per worker, for models exported with reference
    features."""

    enabled: bool = True
    window_size: int = Field(default=500, ge=20, le=20_000,
                             description="Recent images whose features are tested.")
    min_samples: int = Field(default=100, ge=10,
                             description="No test before the window holds this many images.")
    interval_s: float = Field(default=30.0, gt=0, description="Seconds between tests.")
    reference_size: int = Field(default=500, ge=20,
                                description="Reference images used (a fixed subsample of the "
                                "stored ones); with window_size, this sets each test's cost.")
    permutations: int = Field(default=1000, ge=100, le=100_000,
                              description="Random relabellings for the p-value.")
    p_value_threshold: float = Field(default=0.01, gt=0, lt=1,
                                     description="Drift is flagged when the p-value is below.")

    @model_validator(mode="after")
    def _min_fits_window(self) -> DriftSettings:
        if self.min_samples > self.window_size:
            raise ValueError("drift.min_samples is larger than drift.window_size")
        return self


class RequestLogSettings(_Section):
    enabled: bool = Field(
        default=True,
        description="One JSON line per API request on stdout (logger image_classifier.requests): "
        "request id, route, status, outcome, latency, model tags, and per image the answer's "
        "summary (top class and confidence). Never image bytes.",
    )


class CacheSettings(_Section):
    """Answers kept per worker and given again for the same upload bytes, model tag and options
    (serving/cache.py, docs/caching-and-rate-limits.md); /classify and /detect uploads only."""

    enabled: bool = Field(
        default=False,
        description="Off: every upload is decoded and run. On: a repeated upload is answered "
        "from memory, `cached: true`, without decoding or inference.")
    max_entries: int = Field(default=10_000, gt=0, description="Answers kept per worker.")
    max_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0,
        description="Memory the answers may take per worker (each answer's JSON plus 512 bytes "
        "for its key and bookkeeping); the least recently used go first.")


ClientKey = Literal["api_key", "client_id", "remote_address"]


class RateLimitSettings(_Section):
    """A token bucket per client on the model endpoints (serving/rate_limit.py,
    docs/caching-and-rate-limits.md); over it: 429 `rate_limited` with Retry-After."""

    enabled: bool = False
    requests_per_s: float = Field(
        default=10.0, gt=0,
        description="A client's sustained rate for the whole service. Each of the N worker "
        "processes enforces requests_per_s / N: the sum never exceeds the rate, and a client "
        "whose requests all reach one worker (one keep-alive connection) gets 1/N of it.")
    burst: int = Field(
        default=20, ge=1,
        description="Requests a client may send at once above the rate: its bucket's size "
        "(burst / N per worker, at least 1).")
    client_key: list[ClientKey] = Field(
        default=["api_key", "client_id", "remote_address"], min_length=1,
        description="How a client is known: the first of these its request has. api_key: its "
        "bearer token; client_id: its X-Client-ID header; remote_address: the connection's "
        "peer (behind a proxy, the proxy's). A request with none shares one bucket with the "
        "others that have none.")
    max_clients: int = Field(
        default=10_000, gt=0,
        description="Buckets a worker keeps; past it, the least recently seen client's bucket "
        "is dropped (it starts again full).")

    @model_validator(mode="after")
    def _each_key_once(self) -> RateLimitSettings:
        if len(set(self.client_key)) != len(self.client_key):
            raise ValueError(f"rate_limit.client_key lists a key twice ({self.client_key})")
        return self


class ConnectionSettings(_Section):
    balance: bool = Field(
        default=True,
        description="A worker holding more than its share of the service's active connections "
        "answers some with `Connection: close`, so that their clients reconnect, most often to "
        "a less busy worker (serving/balance.py). Keep-alive connections otherwise stay with "
        "whichever worker accepted them. No effect with one worker.")


class ResponseSettings(_Section):
    top_k: int = Field(default=3, ge=1, description="Classes listed per image in `top_k`.")


class SharedSettings(_Section):
    """What the HTTP surface of any service needs: its limits, API key and request log
    (serving/wiring.py). A single-model service adds its model's sections (ServiceSettings);
    the multi-model one, its list of models (ModelServerSettings)."""

    limits: LimitsSettings = LimitsSettings()
    security: SecuritySettings = SecuritySettings()
    request_log: RequestLogSettings = RequestLogSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    connections: ConnectionSettings = ConnectionSettings()
    # Which service these are: set by parse_settings, read by error messages and defaults.
    _where: ServiceSection = PrivateAttr(default=CLASSIFIER)

    @property
    def where(self) -> ServiceSection:
        return self._where

    @property
    def batching_dispatch(self) -> str:
        """The workers' rule for releasing a batch (serving/batcher.py)."""
        return "refill"

    @property
    def batching_fast_lane(self) -> bool:
        """Whether a request that finds its model idle skips the batcher (serving/fast_lane.py)."""
        return True

    def api_key(self) -> str | None:
        """The configured API key, or None when the service runs without one."""
        if self.security.api_key_file is not None:
            path = self.security.api_key_file
            if not path.is_file():
                raise ConfigurationError(
                    f"security.api_key_file {path} does not exist: mount the secret there or "
                    "remove the setting."
                )
            key = path.read_text().strip()
        else:
            variable = self.security.api_key_env or self._where.api_key_env
            key = os.environ.get(variable, "").strip()
        if key and len(key) < MIN_API_KEY_LENGTH:
            raise ConfigurationError(
                f"the API key is {len(key)} characters; use at least {MIN_API_KEY_LENGTH}, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return key or None


class ServiceSettings(SharedSettings):
    """The operational sections every single-model service has; a task adds its own
    (ClassifierSettings)."""

    model: ModelSettings = ModelSettings()
    rollout: RolloutSettings = RolloutSettings()
    batching: BatchingSettings = BatchingSettings()
    drift: DriftSettings = DriftSettings()
    cache: CacheSettings = CacheSettings()

    @property
    def model_tag(self) -> str:
        return self.model.tag or self._where.default_model

    @property
    def batching_dispatch(self) -> str:
        return self.batching.dispatch

    @property
    def batching_fast_lane(self) -> bool:
        return self.batching.fast_lane

    @model_validator(mode="after")
    def _the_gate_lets_in_less_than_the_batcher_drops(self) -> ServiceSettings:
        if self.limits.target_wait_ms >= self.batching.max_latency_ms:
            raise ValueError(
                f"limits.target_wait_ms ({self.limits.target_wait_ms}) is not below "
                f"batching.max_latency_ms ({self.batching.max_latency_ms}): the batcher would "
                "drop decoded uploads the gate let in; lower the first (about half the second) "
                "or set it to 0 for no gate"
            )
        return self

    @model_validator(mode="after")
    def _one_request_fits_one_batch(self) -> ServiceSettings:
        if self.limits.max_images_per_request > self.batching.max_batch_size:
            raise ValueError(
                f"limits.max_images_per_request ({self.limits.max_images_per_request}) is larger "
                f"than batching.max_batch_size ({self.batching.max_batch_size}): lower the first "
                "or raise the second"
            )
        return self

    def served_variants(self) -> list[VariantSettings]:
        """The models that answer, with their weights: the service's MODEL_TAG variable
        ($IMAGE_CLASSIFIER_MODEL_TAG) alone when it is set, else rollout.variants, else
        model.tag alone."""
        variable = self._where.model_tag_env
        pinned = os.environ.get(variable, "").strip()
        if pinned:
            try:
                return [VariantSettings(tag=pinned, weight=1)]
            except ValidationError:
                raise ConfigurationError(
                    f"${variable}={pinned!r} is not a model tag: use name[:version], as "
                    "`bentoml models list` shows it") from None
        return list(self.rollout.variants) or [VariantSettings(tag=self.model_tag, weight=1)]

    def packed_tags(self) -> list[str]:
        """Every model `bentoml build` packs: the served ones, every variant listed (weight 0
        included: rollback targets) and the shadow. model.tag is not among them when
        rollout.variants replaces it."""
        tags = [*(v.tag for v in self.served_variants()), *(v.tag for v in self.rollout.variants)]
        if self.rollout.shadow is not None:
            tags.append(self.rollout.shadow.tag)
        return list(dict.fromkeys(tags))


class ClassifierSettings(ServiceSettings):
    """`services.ImageClassifier.image_classifier`."""

    response: ResponseSettings = ResponseSettings()


class DetectionSettings(_Section):
    """A detector's defaults; a request may override each (form fields on /detect, JSON keys on
    /detect_tensor)."""

    confidence_threshold: float = Field(
        default=0.5, ge=0, le=1,
        description="Detections scoring at or below this are dropped.")
    iou_threshold: float = Field(
        default=0.5, ge=0, le=1,
        description="Per-class NMS: of two boxes of one class overlapping more than this, the "
        "lower-scoring one is dropped.")
    max_detections: int = Field(default=100, ge=1, le=1000,
                                description="At most this many detections per image.")


class DetectorSettings(ServiceSettings):
    """`services.ObjectDetector.object_detector`."""

    detection: DetectionSettings = DetectionSettings()


Settings = ClassifierSettings  # the classifier's, under the name callers have always used


# --- many models in one deployment (models_service.py) --------------------------------------------

MODEL_SERVER = ServiceSection(
    service="ModelServer",
    section="model_server",
    default_model="digits-classifier:latest",
    model_tag_env="MODEL_SERVER_MODEL_TAG",
    api_key_env="MODEL_SERVER_API_KEY",
    how_to_train="`python -m train_export` (or an import: docs/models.md)",
)
# A model's name is a path segment (/models/<name>/classify) and the protocol's model name.
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_SHARED_ONLY = ("security", "request_log", "rate_limit")  # one per deployment, not per model


class _ModelEntry:
    """What a model entry adds to a single-model service's settings: its name and task."""

    @model_validator(mode="after")
    def _shared_sections_stay_shared(self) -> Any:
        fields_set: set[str] = getattr(self, "model_fields_set", set())
        for name in _SHARED_ONLY:
            if name in fields_set:
                raise ValueError(f"{name} is one per deployment: set model_server.{name}, not "
                                 "a model's")
        return self


class ClassifierEntry(_ModelEntry, ClassifierSettings):
    name: str = Field(pattern=MODEL_NAME_PATTERN,
                      description="Its routes' path segment and its protocol name.")
    task: Literal["classification"]


class DetectorEntry(_ModelEntry, DetectorSettings):
    name: str = Field(pattern=MODEL_NAME_PATTERN,
                      description="Its routes' path segment and its protocol name.")
    task: Literal["detection"]


ModelEntry = Annotated[ClassifierEntry | DetectorEntry, Field(discriminator="task")]
DEFAULT_TAGS = {"classification": CLASSIFIER.default_model, "detection": DETECTOR.default_model}


class ModelServerSettings(SharedSettings):
    """`services.ModelServer.model_server`: several models, each with its own sections (model,
    rollout, batching, limits, drift, and its task's), served by one process set. Requests
    without a model name go to `default_model` (the first model of their task otherwise)."""

    default_model: str | None = Field(default=None, description="A model's name; default: "
                                      "the first listed.")
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_are_unique_and_default_exists(self) -> ModelServerSettings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: a name is listed twice ({names}); names must be unique")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not a listed model's "
                             f"name ({names})")
        if len({m.batching.dispatch for m in self.models}) > 1:
            raise ValueError("models: batching.dispatch differs between models; a worker has "
                             "one dispatch rule, set the same (refill, eager or cork) for every "
                             "model")
        return self

    @property
    def batching_dispatch(self) -> str:
        return self.models[0].batching.dispatch

    @property
    def batching_fast_lane(self) -> bool:
        return self.models[0].batching.fast_lane

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name

    def place_models(self) -> None:
        """Each model's settings learn where they live (for messages) and their defaults."""
        for index, entry in enumerate(self.models):
            variable = "MODEL_SERVER_" + "".join(c if c.isalnum() else "_"
                                                 for c in entry.name.upper()) + "_MODEL_TAG"
            entry._where = ServiceSection(
                service=self._where.service, section=f"{self._where.section}.models[{index}]",
                default_model=DEFAULT_TAGS[entry.task], model_tag_env=variable,
                api_key_env=self._where.api_key_env, how_to_train=self._where.how_to_train)


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


def _service_block(document: dict[str, Any], where: ServiceSection) -> dict[str, Any]:
    return dict((document.get("services") or {}).get(where.service) or {})


def parse_settings(document: dict[str, Any], source: str = "configuration.yaml",
                   where: ServiceSection = CLASSIFIER,
                   model: type[SharedSettings] = ClassifierSettings) -> Any:
    """Our section of one service's block, validated into `model` (ClassifierSettings by
    default); every problem is named by its full path, with the value that was given."""
    try:
        settings = model.model_validate(_service_block(document, where).get(where.section) or {})
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join([where.path, *(str(p) for p in err['loc'])])}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["loc"] else "")
            for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid settings in {source}:\n{problems}") from None
    settings._where = where
    if isinstance(settings, ModelServerSettings):
        settings.place_models()
    return settings


def service_config(document: dict[str, Any], settings: SharedSettings) -> dict[str, Any]:
    """BentoML's own settings for the service (`services.<Service>` less our section), passed
    to `@bentoml.service` so that they apply without BENTOML_CONFIG; when BENTOML_CONFIG is set,
    BentoML reads the same file and the values agree.

    Our request timeout answers 504 with our JSON body; BentoML's own (`traffic.timeout`) is
    kept, unless the file sets it, a little longer as a backstop."""
    block = _service_block(document, settings.where)
    block.pop(settings.where.section, None)
    traffic = dict(block.get("traffic") or {})
    timeouts = [settings.limits.request_timeout_s]
    if isinstance(settings, ModelServerSettings):  # each model's own timeout, the longest
        timeouts += [model.limits.request_timeout_s for model in settings.models]
    traffic.setdefault("timeout", max(timeouts) + BENTOML_TIMEOUT_MARGIN_S)
    block["traffic"] = traffic
    return block


def load(where: ServiceSection = CLASSIFIER, model: type[SharedSettings] = ClassifierSettings
         ) -> tuple[Any, dict[str, Any]]:
    """The settings of one service and BentoML's own configuration of it, from the file."""
    path = config_path()
    document = read_config_file(path)
    settings = parse_settings(document, str(path), where, model)
    return settings, service_config(document, settings)
