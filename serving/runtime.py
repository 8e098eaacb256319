"""Batch -> runtime: one ONNX Runtime session, on the best execution provider available, and on
this worker's GPU when there are several (worker_device_id); on a CPU, a second session on every
core for a call alone (serving/cores.py)."""

from __future__ import annotations

import functools
import importlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from .calibration import run_in_pieces
from .contract import GraphSpec, InputSpec
from .cores import REQUEST_ALONE, CoreShare
from .weights import large_weights

if TYPE_CHECKING:
    import onnxruntime as ort


def onnxruntime() -> ModuleType:
    """ONNX Runtime, imported when a worker first needs it: BentoML's supervisor imports the
    service module to read its definition, and importing ONNX Runtime there would add about
    30 MB to a process that never runs a model."""
    return importlib.import_module("onnxruntime")

logger = logging.getLogger(__name__)

_PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# model.cudnn_conv_algo_search -> the CUDA provider's option of that name.
_CONV_ALGO_SEARCH = {"exhaustive": "EXHAUSTIVE", "heuristic": "HEURISTIC", "default": "DEFAULT"}
# One device file per NVIDIA GPU the process may use (a container sees only the ones it is given).
_GPU_DEVICE_FILES = "nvidia[0-9]*"


def choose_providers(
    preferred: Sequence[str], available: Sequence[str], gpu_present: bool
) -> list[str]:
    """The preferred providers that this onnxruntime build offers, CPU always last.

    onnxruntime-gpu lists CUDA and TensorRT even on machines without a GPU, and asking for them
    there logs a loud load failure before it falls back; so GPU providers need a device too.
    """
    usable = [p for p in available if gpu_present or p not in _GPU_PROVIDERS]
    chosen = [_PROVIDER_NAMES[p] for p in preferred if _PROVIDER_NAMES[p] in usable]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntime:
    """Runs uint8 NHWC batches and returns the graph's outputs as float32 arrays: by default
    (probabilities, features), a classifier's; `output_names` chooses others (a detector's).
    A graph whose card fixes its batch size (`graph.batch_size`) is run a piece at a time."""

    def __init__(
        self,
        model_path: Path,
        input_spec: InputSpec,
        graph: GraphSpec,
        providers: Sequence[str] = ("cuda", "cpu"),
        intra_op_threads: int = 0,
        spin: bool = False,
        output_names: Sequence[str] | None = None,
        device_id: int | None = None,
        conv_algo_search: str = "heuristic",
    ) -> None:
        """`spin`: whether ORT's threads spin between operators (session_options). `device_id`:
        the CUDA device (an index among those visible) the GPU providers use; None: CUDA's
        default, the first. `conv_algo_search`: how the CUDA provider picks each convolution's
        cuDNN algorithm (model.cudnn_conv_algo_search)."""
        ort_module = onnxruntime()
        self.model_path, self.intra_op_threads, self.spin = model_path, intra_op_threads, spin
        # Whether the other workers' runtimes are running: a process of its own (the shadow's,
        # a test's) has none; a worker's deployment gives it the worker's (cores.worker_share).
        self.cores = CoreShare()
        # serving/cores.py: the session on every core for a call of one image made while the
        # other workers' runtimes are idle, its threads, and what counts its calls.
        self.lone_session: ort.InferenceSession | None = None
        self.lone_threads = 0
        self.count_lone_call: Callable[[], None] = lambda: None
        self._shared_weights: list[ort.OrtValue] = []  # must outlive both sessions
        requested = choose_providers(providers, ort_module.get_available_providers(),
                                     gpu_available())
        if "CUDAExecutionProvider" in requested:
            # The CUDA/cuDNN libraries come as pip wheels (nvidia-*), which are not on the
            # loader's path; ORT's helper finds and loads them.
            ort_module.preload_dlls(directory="")
        if requested == ["CPUExecutionProvider"]:
            self.open_session: Callable[[], ort.InferenceSession] = functools.partial(
                cpu_session_of_optimized_graph, model_path, intra_op_threads, spin)
        else:
            self.open_session = functools.partial(
                ort_module.InferenceSession, str(model_path),
                session_options(intra_op_threads, spin),
                providers=on_device(requested, device_id, conv_algo_search))
        self.session = self.open_session()
        # Where settle_batch_shapes made one: the session for calls of more than one image, all
        # padded to `batch_rows`.
        self.batch_session: ort.InferenceSession | None = None
        self.batch_rows = 0
        # A provider can be listed as available yet fail to initialise (no driver, no GPU):
        # ORT then falls back silently, so report what the session really uses.
        self.providers: list[str] = self.session.get_providers()
        # The device this worker was given; on a GPU, the one the session says it runs on.
        self.device_id = session_device_id(self.session) if self.on_gpu else device_id
        self.input_spec = input_spec
        self.graph = graph
        self.output_names = list(output_names or [graph.probabilities_name, graph.features_name])
        logger.info("ONNX Runtime %s session on %s%s", ort_module.__version__, self.providers[0],
                    f" (CUDA device {self.device_id})" if self.on_gpu else "")
        self.run(np.zeros((1, *input_spec.shape), dtype=np.uint8))  # warm-up before ready

    @property
    def active_provider(self) -> str:
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        return self.active_provider in _GPU_PROVIDERS

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        """The outputs named by `output_names`, in that order, for a batch of any size."""
        with self.cores.call():
            size = self.graph.batch_size
            if size is not None and len(pixels) != size:
                # A graph exported for a fixed batch (torchvision's detectors: 1): one call per
                # piece of that size, the last one padded with blank rows.
                return run_in_pieces(self._run, pixels, size, pad=True)
            if self.batch_session is not None and len(pixels) > 1:
                return run_in_pieces(functools.partial(self._run, session=self.batch_session),
                                     pixels, self.batch_rows, pad=True)
            if self.lone_session is not None and len(pixels) == 1 and REQUEST_ALONE.get() \
                    and self.cores.others_idle():
                self.count_lone_call()
                return self._run(pixels, session=self.lone_session)
            return self._run(pixels)

    def open_lone_session(self, threads: int, counted: Callable[[], None] = lambda: None
                          ) -> bool:
        """From now on, a call of one image for a request alone in its worker, made while the
        other workers' runtimes are idle, runs on a session of `threads` threads
        (serving/cores.py); both sessions are opened again over one copy of the graph's large
        weights. CPU only; False, with a warning, where it cannot be done (the worker's session
        stays as it was). `counted`: called at each such call (a metric)."""
        if self.active_provider != "CPUExecutionProvider" or self.graph.batch_size is not None:
            return False
        try:
            (own, lone), shared = cpu_sessions_sharing_weights(
                self.model_path, [session_options(self.intra_op_threads, self.spin),
                                  lone_call_options(threads)])
        except Exception as error:  # a latency gain, not a condition to serve
            logger.warning("No session on %d threads for calls alone: %s", threads, error)
            return False
        self.session, self.lone_session, self._shared_weights = own, lone, shared
        self.lone_threads, self.count_lone_call = threads, counted
        blank = np.zeros((1, *self.input_spec.shape), dtype=np.uint8)
        self._run(blank)  # each session allocates before the first request
        self._run(blank, session=self.lone_session)
        logger.info("A call of one image alone runs on %d threads (%d weights shared)",
                    threads, len(shared))
        return True

    def settle_batch_shapes(self, rows: int, even_on_cpu: bool = False) -> None:
        """On a GPU, from now on: a call of one image on this session, and every other call on
        a second session of the same graph, filled up to `rows` images. Each session then meets
        one input shape for the rest of its life. Nothing on a CPU (`even_on_cpu`: the same
        there, for tests), for a graph of a fixed batch size, or for `rows` of 1.

        Why: the CUDA provider builds every convolution's cuDNN plan again whenever a call's
        input shape differs from the previous call's; it keeps no plan per shape (ONNX Runtime's
        core/providers/cuda/nn/conv.cc, UpdateState, cuDNN 9). On an H200, resnet50's calls
        took 148-163 ms each while their sizes alternated, against 1 ms at batch 1 in the
        runtime's ceiling, which repeats one size; and a server whose batches changed size made
        75 batches in 5 s at 16 connections (docs/performance.md, round 7). The second session
        holds a second copy of the weights on the device; a call of 2 images runs as `rows`,
        which a GPU runs in little more time (the same runs' ceiling: 3.3 ms for 8 images
        against 2.6 ms for 4, per process)."""
        if not (self.on_gpu or even_on_cpu) or self.graph.batch_size is not None or rows <= 1:
            return
        self.batch_session = self.open_session()
        self.batch_rows = rows
        blank = np.zeros((rows, *self.input_spec.shape), dtype=np.uint8)
        # Each session meets its shape before the first request.
        self._run(blank, session=self.batch_session)
        self._run(blank[:1])

    def _run(self, pixels: np.ndarray, options: ort.RunOptions | None = None,
             session: ort.InferenceSession | None = None) -> tuple[np.ndarray, ...]:
        """One call on `session` (default: the first one)."""
        return tuple((session or self.session).run(
            self.output_names, {self.graph.input_name: pixels}, options))

    def shrink_arena(self, rows: int) -> None:
        """Give back the CPU memory arena's chunks that a call of `rows` images does not use.
        Why: ONNX Runtime's arena keeps its largest call's memory for the session's life, and the
        start-up calibration (serving/calibration.py) tries calls of up to max_batch_size images
        that serving, in pieces of the size it chose, never makes again (mobilenet_v3_small at
        224x224: the whole server idled at 863 MB with them kept, at 429 MB since; `make bench`,
        docs/performance.md). ORT's run option `memory.enable_memory_arena_shrinkage` frees them
        at the end of one such call."""
        options = onnxruntime().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            self._run(np.zeros((rows, *self.input_spec.shape), dtype=np.uint8), options)
        except Exception as error:  # memory given back is a saving, not a condition to serve
            logger.warning("ONNX Runtime kept its memory arena after the calibration on %s: %s",
                           self.active_provider, error)

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The same, by output name."""
        return dict(zip(self.output_names, self.run(pixels)))


def session_options(intra_op_threads: int, spin: bool = False) -> ort.SessionOptions:
    """`spin`: ONNX Runtime's threads keep spinning for work between operators (its default).
    Why off in a server: spinning threads take the cores the other workers decode and run on.
    In `make bench`'s levers table (2 cores, 2 workers x 2 threads), mobilenet_v3_small at 64
    connections answered 424/s with threads that sleep and 225/s with threads that spin, and
    resnet18 at 4 connections as many either way (46 and 47/s) with a p99 of 241 against 399 ms.
    Spinning pays for small operators when nothing else wants the cores (mobilenet_v3_small at
    1 connection: 246 against 210/s): the offline client's case, one process on every core."""
    options = onnxruntime().SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.graph_optimization_level = onnxruntime().GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def lone_call_options(threads: int) -> ort.SessionOptions:
    """The session for calls alone (serving/cores.py): its threads spin between operators while
    a call runs, and stop as soon as it returns (`session.force_spinning_stop`).

    Why spin: such a call runs only while the other workers' runtimes are idle, and threads
    that sleep between operators cost a light model's image what splitting it saves (round 10's
    levers table, mobilenet_v3_small at 1 connection: 179/s with 2 workers x 2 ORT threads
    against 215 shipped; with spinning threads 244/s). Why stop: a thread that spins on after
    the call takes a core from the next request's decoding, or from another worker's request.

    It plans no memory pattern (one block for all of a call's activations, kept per input
    shape): resnet18's server peaked at 604 MB with it in a targeted `python -m bench --models
    resnet18` run, at 592 without it in `make bench` (docs/performance.md, round 10). Its arena
    stays: without it, the heap glibc kept of the calls' freed activations grew resnet18's
    server by 50 MB over 360 calls alone (the same targeted run, its 1-connection level)."""
    options = session_options(threads, spin=True)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_mem_pattern = False
    return options


def write_optimized_graph(model_path: Path, directory: Path, intra_op_threads: int,
                          spin: bool = False) -> Path:
    """The graph ONNX Runtime's optimizations (all levels) make of `model_path` for this CPU,
    written into `directory` by a session that is then dropped."""
    optimized = directory / model_path.name
    writer = session_options(intra_op_threads, spin)
    writer.optimized_model_filepath = str(optimized)
    writer.log_severity_level = 3  # the hardware warning: this machine is where it runs
    onnxruntime().InferenceSession(str(model_path), writer, providers=["CPUExecutionProvider"])
    return optimized


def cpu_sessions_sharing_weights(model_path: Path, sessions_options: Sequence[ort.SessionOptions]
                                 ) -> tuple[list[ort.InferenceSession], list[ort.OrtValue]]:
    """Sessions of `model_path`'s optimized graph, one per options in `sessions_options`, over
    one copy of its large weights (serving/weights.py); and those weights, which must outlive
    the sessions. The graph is optimized with the first session's threads."""
    ort_module = onnxruntime()
    with tempfile.TemporaryDirectory(prefix="onnx-optimized-") as scratch:
        optimized = write_optimized_graph(model_path, Path(scratch),
                                          sessions_options[0].intra_op_num_threads)
        shared = [(name, ort_module.OrtValue.ortvalue_from_numpy(array))
                  for name, array in large_weights(optimized.read_bytes()).items()]
        sessions = []
        for options in sessions_options:
            for name, value in shared:
                options.add_initializer(name, value)
            # From the file: a session made from bytes keeps them (ORT's Python wrapper holds
            # them for its life), a second copy of the weights.
            sessions.append(ort_module.InferenceSession(str(optimized), options,
                                                        providers=["CPUExecutionProvider"]))
    return sessions, [value for _, value in shared]


def cpu_session_of_optimized_graph(model_path: Path, intra_op_threads: int, spin: bool = False
                                   ) -> ort.InferenceSession:
    """A CPU session loaded from the graph ONNX Runtime's optimizations make of `model_path`,
    written by a first session that is then dropped.

    Why: a session of the stored graph frees the weights its layout optimizations replace
    (NCHWc copies, on x86), and glibc keeps that heap for the process: resnet18 (a 43 MB graph)
    grew a fresh interpreter by 147 MB as a session of the stored graph and by 72 MB so
    (tests/serving/test_runtime.py's session_memory without its trim), at the same speed
    (36.9 against 37.5 ms per image, one thread). A worker now also hands freed heap back once
    its models are loaded (deployment.return_freed_memory), after which both hold 60 MB
    (2026-12-04); this still spares the processes that load a runtime and do not trim (the
    shadow's, serving/shadow.py). The optimized graph fits this machine's CPU only (ORT warns
    about that when it writes one), so it is made here, at
    start, in a temporary directory, and never kept. Where ONNX Runtime cannot write it (a graph
    too large for one file, say), the session loads the stored graph as before."""
    ort_module = onnxruntime()
    providers = ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="onnx-optimized-") as scratch:
        try:
            optimized = write_optimized_graph(model_path, Path(scratch), intra_op_threads, spin)
            return ort_module.InferenceSession(str(optimized),
                                               session_options(intra_op_threads, spin),
                                               providers=providers)
        except Exception as error:  # a saving, not a condition to serve
            logger.warning("Serving %s as stored: ONNX Runtime could not load its optimized "
                           "graph (%s)", model_path, error)
    return ort_module.InferenceSession(str(model_path), session_options(intra_op_threads, spin),
                                       providers=providers)


def gpu_available() -> bool:
    """An NVIDIA device is visible and this onnxruntime build has the CUDA provider."""
    return gpu_device_files() > 0 and \
        "CUDAExecutionProvider" in onnxruntime().get_available_providers()


def gpu_device_files() -> int:
    """How many NVIDIA GPUs this process may open: /dev/nvidia0, /dev/nvidia1, ..."""
    return len(list(Path("/dev").glob(_GPU_DEVICE_FILES)))


def on_device(providers: Sequence[str], device_id: int | None,
              conv_algo_search: str = "heuristic") -> list[str | tuple[str, dict[str, str]]]:
    """`providers` with their options: the GPU ones pinned to `device_id`, CUDA's convolutions
    tuned by `conv_algo_search` (model.cudnn_conv_algo_search)."""
    pinned = {} if device_id is None else {"device_id": str(device_id)}
    chosen: list[str | tuple[str, dict[str, str]]] = []
    for provider in providers:
        options = dict(pinned) if provider in _GPU_PROVIDERS else {}
        if provider == "CUDAExecutionProvider":
            options["cudnn_conv_algo_search"] = _CONV_ALGO_SEARCH[conv_algo_search]
        chosen.append((provider, options) if options else provider)
    return chosen


def session_device_id(session: ort.InferenceSession) -> int | None:
    """The device the session's GPU provider reports it runs on."""
    options = session.get_provider_options()
    for provider in _GPU_PROVIDERS:
        if "device_id" in options.get(provider, {}):
            return int(options[provider]["device_id"])
    return None


def visible_gpus(cuda_visible_devices: str | None, device_files: int) -> int:
    """How many GPUs CUDA will show this process. CUDA_VISIBLE_DEVICES unset: every device file;
    set: its entries up to the first invalid one (empty, or -1: none), but no more than the
    device files where there are some. BentoML's allocator names devices the machine lacks when
    `resources.gpu` asks for more than it has (it only warns), and CUDA skips those."""
    if cuda_visible_devices is None:
        return device_files
    entries = 0
    for entry in cuda_visible_devices.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        entries += 1
    return min(entries, device_files) if device_files else entries


def worker_device_id(worker_index: int | None, cuda_visible_devices: str | None,
                     device_files: int) -> int | None:
    """The GPU a worker's runtime uses, as an index among the visible ones; None: none visible.

    BentoML 1.4.39 gives every worker of a service the same CUDA_VISIBLE_DEVICES, the
    `resources.gpu` devices it assigned to the service (_bentoml_impl/server/allocator.py), so
    each worker would run on the first. Worker k (BentoML's index, 1 to `workers`) takes device
    (k - 1) mod N of the N visible: workers = N puts one on each, workers = 2N two on each."""
    count = visible_gpus(cuda_visible_devices, device_files)
    if count == 0:
        return None
    return ((worker_index or 1) - 1) % count
