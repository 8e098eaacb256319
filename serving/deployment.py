"""What one service serves, read from the model store once at start: the variants that answer (with
their weights and router), the shadow, and what each of them needs to run.

Everything here is built once per process from the settings; the serving modules take it as an
argument, so none of them reads service.py's globals.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import NotFound

from . import metrics
from .calibration import best_batch_size
from .contract import ONNX_FILE, ModelCard
from .cores import lone_request_threads, machine_cores, worker_share
from .drift import DriftMonitor
from .predictor import Predictor, Task
from .routing import Router
from .runtime import OnnxRuntime, gpu_available, gpu_device_files, worker_device_id
from .schemas import DeviceInfo, DriftReport, DriftStatus, VariantInfo
from .settings import ConfigurationError, ServiceSettings, VariantSettings
from .shadow import Shadow, task_agreement

logger = logging.getLogger("bentoml.image_classifier")


@dataclass(frozen=True)
class StoreEntry:
    """A model as the store holds it: its exact tag (never `latest`), card and directory."""

    tag: str
    card: ModelCard
    path: Path


def keep_out_of_collections() -> None:
    """Move everything the worker has allocated so far (BentoML, its dependencies, the models:
    ~110,000 objects that live as long as the worker) out of the garbage collector's reach.
    A full collection traverses them all, and the event loop answers nothing meanwhile;
    frozen, they are never traversed again, and the collector scans only what requests
    allocate."""
    gc.collect()
    gc.freeze()


def return_freed_memory() -> None:
    """Hand the heap pages freed while the worker started back to the system (glibc's
    malloc_trim). Why: glibc keeps freed memory for the process to reuse, and starting frees a
    lot that serving never asks for again: the session that writes the optimized graph, the
    calibration's larger calls. resnet18's whole server idled at 520-522 MB in `python -m
    bench` before this, at 469-495 since (docs/performance.md, round 6). Without glibc (musl,
    macOS) there is nothing to call."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def packed_models(settings: ServiceSettings) -> dict[str, bentoml.models.BentoModel]:
    """Every model the configuration names, by tag. Set as class attributes of the service, they
    are what `bentoml build` packs: a container then holds its variants, shadow and rollback
    targets."""
    return {tag: bentoml.models.BentoModel(tag) for tag in settings.packed_tags()}


def read_store_entry(model: bentoml.models.BentoModel, settings: ServiceSettings
                     ) -> StoreEntry:
    """The stored model behind a tag, its card checked against its files (a damaged entry stops
    startup here, with the fix)."""
    stored = model.stored
    if stored is None:
        where = settings.where
        raise NotFound(
            f"model {model.tag!s} is not in the BentoML model store: train and export it with "
            f"{where.how_to_train}, or set {where.key('model.tag')} (or rollout.variants, or "
            f"${where.model_tag_env}) to a tag that `bentoml models list` shows."
        )
    card = ModelCard.read(Path(stored.path))
    card.verify(Path(stored.path), str(stored.tag))
    return StoreEntry(str(stored.tag), card, Path(stored.path))


def check_task(entry: StoreEntry, task: str, settings: ServiceSettings) -> None:
    if entry.card.task != task:
        where = settings.where
        raise ConfigurationError(
            f"model {entry.tag} is a {entry.card.task} model, and {where.service} serves "
            f"{task}: set {where.key('model.tag')} to a {task} model, or serve this one with "
            "the other service (`bentoml serve service:ImageClassifier` for classification, "
            "`service:ObjectDetector` for detection).")


def check_interchangeable(entries: list[StoreEntry]) -> None:
    """Variants and the shadow answer the same API, so they must agree on labels and input."""
    first = entries[0]
    for other in entries[1:]:
        for field, what in (("labels", "labels"), ("input", "input spec")):
            if getattr(other.card, field) != getattr(first.card, field):
                raise ConfigurationError(
                    f"models {first.tag} and {other.tag} differ in their {what}: variants and "
                    "the shadow must be interchangeable. Serve models with different "
                    "labels or input sizes as separate deployments."
                )


def assigned_device_id() -> int | None:
    """This worker's GPU among the visible ones (serving/runtime.py, worker_device_id): by
    BentoML's worker index, over the CUDA_VISIBLE_DEVICES that BentoML gives every worker of
    the service (`resources.gpu`) or that was set by hand."""
    return worker_device_id(bentoml.server_context.worker_index,
                            os.environ.get("CUDA_VISIBLE_DEVICES"), gpu_device_files())


def device_info(runtime: OnnxRuntime) -> DeviceInfo:
    """/model_info's `device`: where the answering worker's runtime runs."""
    return DeviceInfo(worker_index=bentoml.server_context.worker_index,
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                      device_id=runtime.device_id, on_gpu=runtime.on_gpu,
                      lone_request_threads=runtime.lone_threads)


@dataclass(frozen=True)
class Deployment:
    settings: ServiceSettings
    variants: list[VariantSettings]
    served: list[StoreEntry]  # in the order of `variants`
    shadow: StoreEntry | None
    router: Router

    @classmethod
    def read(cls, settings: ServiceSettings, models: dict[str, bentoml.models.BentoModel],
             task: str) -> Deployment:
        """The served models and the shadow, read from the store and checked: each is a model
        of `task`, intact, and interchangeable with the others."""
        variants = settings.served_variants()
        served = [read_store_entry(models[v.tag], settings) for v in variants]
        shadow_settings = settings.rollout.shadow
        shadow = (read_store_entry(models[shadow_settings.tag], settings)
                  if shadow_settings is not None else None)
        for entry in served + ([shadow] if shadow else []):
            check_task(entry, task, settings)
        check_interchangeable(served + ([shadow] if shadow else []))
        router = Router([v.weight for v in variants], settings.rollout.sticky_headers)
        return cls(settings, variants, served, shadow, router)

    @property
    def card(self) -> ModelCard:
        """Labels and input spec: the same for every variant (check_interchangeable)."""
        return self.served[0].card

    def start(self, task: Task) -> Predictor:
        """In a worker: every served model's runtime and drift monitor, and the shadow, loaded
        once; the predictor that answers with them."""
        runtimes = [self.load_runtime(entry, task) for entry in self.served]
        pieces = [self.piece_size(runtime) for runtime in runtimes]
        for entry, runtime in zip(self.served, runtimes):  # after the calibration: the
            self.add_lone_session(entry, runtime)           # session its calls grew is replaced
        predictor = Predictor(task, self.card.graph, runtimes, [e.tag for e in self.served],
                              [self.drift_monitor(e) for e in self.served], self.load_shadow(task),
                              pieces)
        self.announce(runtimes, pieces)
        keep_out_of_collections()
        return_freed_memory()
        return predictor

    def piece_size(self, runtime: OnnxRuntime) -> int | None:
        """Images per runtime call (batching.runtime_batch_size; auto: measured here, now);
        None for a graph with a fixed batch size, which the runtime runs its own way."""
        batching = self.settings.batching
        if runtime.graph.batch_size is not None:
            return None
        if batching.runtime_batch_size != "auto":
            size = batching.runtime_batch_size
        else:
            size = best_batch_size(runtime.run, runtime.input_spec.shape,
                                   batching.max_batch_size)
            runtime.shrink_arena(size)  # what the larger calls tried grew, serving never uses
        runtime.settle_batch_shapes(size)
        return size

    def load_runtime(self, entry: StoreEntry, task: Task) -> OnnxRuntime:
        """In a worker: `entry`'s runtime, publishing its calls to the other workers
        (serving/cores.py)."""
        runtime = self.runtime_loader(entry, task)()
        runtime.cores = worker_share()
        return runtime

    def add_lone_session(self, entry: StoreEntry, runtime: OnnxRuntime) -> None:
        """A session on every core for calls alone, where model.lone_request_threads asks for
        one (serving/cores.py); on a CPU only."""
        model = self.settings.model
        if runtime.on_gpu:
            return
        threads = lone_request_threads(model.lone_request_threads, model.intra_op_threads,
                                       machine_cores())
        if threads:
            runtime.open_lone_session(threads, metrics.lone_calls().labels(model=entry.tag).inc)

    def runtime_loader(self, entry: StoreEntry, task: Task, intra_op_threads: int | None = None
                       ) -> Callable[[], OnnxRuntime]:
        """What loads `entry`'s runtime, as a value that pickles (the shadow's process calls
        it)."""
        model = self.settings.model
        return functools.partial(
            OnnxRuntime,
            entry.path / ONNX_FILE,
            entry.card.input,
            entry.card.graph,
            providers=model.providers,
            intra_op_threads=model.intra_op_threads if intra_op_threads is None
            else intra_op_threads,
            spin=model.thread_spinning,
            output_names=task.output_names(entry.card.graph),
            device_id=assigned_device_id(),
            conv_algo_search=model.cudnn_conv_algo_search,
        )

    def load_shadow(self, task: Task) -> Shadow | None:
        """The shadow's own process, its model loaded there (serving/shadow.py)."""
        rollout = self.settings.rollout.shadow
        if self.shadow is None or rollout is None:
            return None
        # One thread: the shadow's process has one core's worth of work at the lowest priority.
        load = self.runtime_loader(self.shadow, task, intra_op_threads=1)
        return Shadow(load, self.shadow.tag, rollout.fraction, rollout.queue_batches,
                      task_agreement(task, self.shadow.card.graph))

    def drift_monitor(self, entry: StoreEntry) -> DriftMonitor | None:
        """A monitor for a model exported with reference features (imports without data have
        none)."""
        reference = entry.card.drift_reference
        drift = self.settings.drift
        if not drift.enabled or reference is None:
            return None
        features = np.load(entry.path / reference.file)
        if len(features) > drift.reference_size:  # a fixed subsample: the same in every worker
            features = features[np.random.default_rng(0).permutation(len(features))
                                [:drift.reference_size]]
        return DriftMonitor(entry.tag, features, drift.window_size, drift.min_samples,
                            drift.interval_s, drift.permutations, drift.p_value_threshold)

    def describe(self, index: int, runtime: OnnxRuntime) -> dict[str, Any]:
        """What /model_info says of every task's served model `index` (the task adds its own)."""
        entry, batching = self.served[index], self.settings.batching
        card = entry.card
        return {
            "tag": entry.tag, "task": card.task, "architecture": card.architecture,
            "labels": card.labels, "input": card.input,
            "active_provider": runtime.active_provider, "providers": runtime.providers,
            "gpu_available": gpu_available(), "device": device_info(runtime),
            "accuracy": card.accuracy, "lineage": card.lineage,
            "variants": [VariantInfo(tag=e.tag, weight=v.weight)
                         for v, e in zip(self.variants, self.served)],
            "shadow": self.shadow.tag if self.shadow else None,
            "max_batch_size": batching.max_batch_size, "max_latency_ms": batching.max_latency_ms,
        }

    def drift_report(self, monitors: Sequence[DriftMonitor | None], test_now: bool
                     ) -> DriftReport:
        """/drift: each served model's last test in this worker (or one run now)."""
        states = [m.test_now() if test_now else m.state() for m in monitors if m is not None]
        return DriftReport(
            enabled=self.settings.drift.enabled,
            models=[DriftStatus(**asdict(state)) for state in states],
            without_reference=[e.tag for e, m in zip(self.served, monitors)
                               if m is None and e.card.drift_reference is None],
        )

    def announce(self, runtimes: list[OnnxRuntime], pieces: list[int | None]) -> None:
        """`model_info` series and one log line per model, once the runtimes are loaded."""
        for variant, entry, runtime, piece in zip(self.variants, self.served, runtimes, pieces):
            metrics.model_info().labels(entry.tag, "variant", f"{variant.weight:g}").set(1)
            logger.info("Serving %s (weight %g) on %s, %s images per runtime call", entry.tag,
                        variant.weight, runtime.active_provider, piece or "all the batch's")
        if self.shadow is not None and self.settings.rollout.shadow is not None:
            metrics.model_info().labels(self.shadow.tag, "shadow", "0").set(1)
            logger.info("Shadowing with %s on %.0f%% of images", self.shadow.tag,
                        100 * self.settings.rollout.shadow.fraction)
