"""`python -m bench` (or `make bench`): the runtime ceiling, the decode cost, and this project's
server and its peers (FastAPI, LitServe, Ray Serve, TorchServe) on the same ONNX graph under the
same closed-loop load; the default detector beside the classifiers (its ceiling with the
per-image work around the runtime, and its service on /detect); writes docs/benchmarks.md,
plots, raw JSON. `--quick`: a short smoke run that writes under build/."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from bench import with_quick_defaults

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench"
# --quick: what it changes where the option is left at its default.
QUICK = {"servers": ["bentoml"], "concurrency": [1, 16, 64, 128], "duration": 3,
         "ceiling_seconds": 0.5, "levers": False, "out": WORK / "quick"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=["digits", "mobilenet_v3_small", "resnet18", "detector"],
                        help="bench models (bench/assets.py MODELS); `detector` is the default "
                        "digits-detector, served by service:ObjectDetector only")
    parser.add_argument("--servers", nargs="+",
                        default=["bentoml", "fastapi", "litserve", "ray", "torchserve"],
                        help="servers for the classifiers; the detector gets bentoml only. ray "
                        "and torchserve run from venvs of their own, made on first use "
                        "(bench/peers/venvs.py, a few minutes)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64, 128, 256])
    parser.add_argument("--duration", type=int, default=10, help="seconds per load level")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0)
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the configuration levers on the light model")
    parser.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                        help="also sweep image size, images per request and connections "
                        "(bench/curves.py) for the digits, mobilenet_v3_small and detector "
                        "models among --models; not with --gpu")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU run: resnet50 at 224x224, served vs raw GPU throughput")
    parser.add_argument("--config", type=Path, default=ROOT / "configuration.yaml",
                        help="the service configuration to benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--home", type=Path, default=WORK / "home",
                        help="the BentoML store the models come from; a model it lacks is "
                        "exported (trained, for digits and the detector) into it")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report and plots from the saved results.json")
    parser.add_argument("--levers-only", action="store_true",
                        help="measure the levers again into the saved results.json")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run, not a result: where not given, --servers bentoml "
                        "--concurrency 1 16 64 128 --duration 3 --ceiling-seconds 0.5 "
                        "--no-levers --out build/bench/quick (docs/ is left alone); e.g. "
                        "--quick --models detector")
    return with_quick_defaults(parser.parse_args(argv), parser, QUICK)


def main() -> None:
    args = parse_args()
    args.home = args.home.resolve()
    os.environ["BENTOML_HOME"] = str(args.home)  # a store of its own, before bentoml loads
    os.environ["BENTOML_CONFIG"] = str(args.config.resolve())  # what the service and peers read
    if args.report_only or args.levers_only:
        rewrite_saved(args)
    else:
        run(args)


def rewrite_saved(args: argparse.Namespace) -> None:
    """Rebuild the report from results.json, after measuring the levers again if asked."""
    from bench import report
    from bench.assets import write_images

    suffix = "-gpu" if args.gpu else ""
    path = args.out / "bench" / f"results{suffix}.json"
    saved = json.loads(path.read_text())
    if args.levers_only:
        saved["levers"], saved["profile"] = measure_levers(
            saved["models"], write_images(WORK / "images"), args.duration)
        saved["levers_measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    saved["analysis"] = report.analysis(saved)
    path.write_text(json.dumps(saved, indent=1))
    report.write(saved, args.out, suffix)


def run(args: argparse.Namespace) -> None:
    from bench import report
    from bench.assets import MODELS, write_images
    from serving.settings import parse_settings, read_config_file, service_config

    unknown = [k for k in args.models if k not in MODELS]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {list(MODELS)}")
    if args.gpu:
        args.models = ["resnet50"]
    document = read_config_file(args.config)
    settings = parse_settings(document)
    workers = workers_of(service_config(document, settings))
    providers = list(settings.model.providers)
    WORK.mkdir(parents=True, exist_ok=True)
    images = write_images(WORK / "images")
    results: dict = {"machine": report.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "service": {"workers": workers, "intra_op_threads":
                                 settings.model.intra_op_threads,
                                 "lone_request_threads": settings.model.lone_request_threads,
                                 "providers": providers,
                                 "max_batch_size": settings.batching.max_batch_size,
                                 "max_latency_ms": settings.batching.max_latency_ms,
                                 "connections_balance": settings.connections.balance},
                     "images": {k: p.stat().st_size for k, p in images.items()}, "models": {}}

    if args.quick:
        results["quick"] = True  # the report says it is a smoke run

    litserve_config: dict = {}
    if "litserve" in args.servers and any(MODELS[k].task == "classification"
                                          for k in args.models):
        litserve_config, results["litserve_tuning"] = tune_litserve(
            args.models[0] if args.gpu else "mobilenet_v3_small", images, args.duration,
            args.home)

    for key in args.models:
        if MODELS[key].task == "detection":
            results["models"][key] = measure_detector(key, args, document)
        else:
            results["models"][key] = measure_model(key, args, settings, workers, images,
                                                   litserve_config)

    suffix = "-gpu" if args.gpu else ""
    saved = args.out / "bench" / f"results{suffix}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    if not args.levers:  # the levers table last measured stays in the report, with its date
        results.update(saved_levers(saved))
    # Saved before the levers, so that a failed lever loses none of the measurements above
    # (`--levers-only` measures them again into this file).
    saved.write_text(json.dumps(results, indent=1))
    if args.levers:
        results["levers"], results["profile"] = measure_levers(results["models"], images,
                                                               args.duration)
    if args.curves and not args.gpu:  # writes OUT/bench/curves.json, which report.write reads
        measure_curves(args)
    results["analysis"] = report.analysis(results)
    saved.write_text(json.dumps(results, indent=1))
    report.write(results, args.out, suffix)
    for name, figure, met in report.targets(results):
        verdict = "-   " if met is None else ("PASS" if met else "MISS")
        print(f"target {verdict} {name}: {figure}", flush=True)
    print(f"wrote {args.out / f'benchmarks{suffix}.md'}"
          + (" (--quick: a smoke run, not a result)" if args.quick else ""))


def saved_levers(path: Path) -> dict:
    """The levers, profiles and the time they were measured, from a saved results.json (none
    when there is none): what a run with --no-levers keeps."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if not saved.get("levers"):
        return {}
    return {"levers": saved["levers"], "profile": saved.get("profile", {}),
            "levers_measured": saved.get("levers_measured", saved.get("started"))}


def measure_model(key: str, args: argparse.Namespace, settings, workers: int, images: dict,
                  litserve_config: dict) -> dict:
    """The ceiling, the decode cost, and each server under load, for one model."""
    import bentoml

    from bench import ceiling
    from bench.assets import MODELS, ensure_model, upload_of

    model = MODELS[key]
    providers = list(settings.model.providers)
    tag = ensure_model(model, args.home, ROOT)
    model_dir = Path(bentoml.models.get(tag).path)
    print(f"[{key}] ceiling", flush=True)
    entry = {
        "tag": tag, "kind": model.kind,
        "runtime_service_threads": ceiling.parallel_runtime_throughput(
            model_dir, providers, workers, settings.model.intra_op_threads,
            args.ceiling_seconds),
        "runtime_all_threads": ceiling.runtime_throughput(
            model_dir, providers, 0, args.ceiling_seconds),
        "decode_ms": ceiling.decode_cost_ms(model_dir, images, args.ceiling_seconds),
        "served": {},
        "upload": model.upload,
    }
    if args.gpu:  # what a change of batch shape costs the runtime there
        entry["shape_changes_ms"] = ceiling.shape_change_ms(model_dir, providers, 0)
    upload, content_type = upload_of(key, images)
    for server in args.servers:
        overrides = litserve_config if server == "litserve" else {}
        entry["served"][server] = measure_served(key, server, tag, model_dir, overrides, args,
                                                 upload, content_type=content_type)
    return entry


def measure_served(key: str, server: str, tag: str, model_dir: Path, overrides: dict,
                   args: argparse.Namespace, upload: Path, task: str = "classification",
                   content_type: str = "image/jpeg") -> dict:
    """One server on one model: warm-up, then each concurrency level under wrk."""
    from bench import load, servers

    route = servers.ROUTES[task]
    with servers.serve(server, tag, model_dir, WORK, overrides, task=task) as running:
        time.sleep(2)  # settled: what the server holds before any request
        idle_rss_processes_mb = load.rss_by_process_mb(running.pid)
        idle_rss_mb = sum(idle_rss_processes_mb)
        lone_threads = served_lone_request_threads(running.url) if server == "bentoml" else None
        print(f"[{key}] {server}: ready in {running.ready_s:.2f}s, idle RSS {idle_rss_mb:.0f} MB",
              flush=True)
        load.run_wrk(running.url, running.pid, upload, 16, 3, content_type=content_type,
                     route=route)  # warm up
        levels = []
        for concurrency in args.concurrency:
            result = load.run_wrk(running.url, running.pid, upload, concurrency, args.duration,
                                  sample_batches=server == "bentoml", content_type=content_type,
                                  route=route)
            print(f"[{key}] {server} c={concurrency}: {result.throughput:.1f} req/s "
                  f"p99 {result.p99_ms:.0f} ms"
                  + (f" ({result.requests - result.ok} not 200)" if result.requests > result.ok
                     else ""), flush=True)
            levels.append(asdict(result))
        floor = (load.floor(running.url, 5, running.pid)
                 if server == "bentoml" and task == "classification" else {})
    return {"ready_s": running.ready_s, "idle_rss_mb": idle_rss_mb,
            "idle_rss_processes_mb": idle_rss_processes_mb, "levels": levels, "floor": floor,
            **({"lone_request_threads": lone_threads} if lone_threads is not None else {})}


def served_lone_request_threads(url: str) -> int | None:
    """The threads a request alone runs on in the service's workers, as /model_info says
    (device.lone_request_threads: what the worker opened, not the setting); None where it does
    not say."""
    import httpx

    try:
        answer = httpx.post(url + "/model_info", json={}, timeout=10)
        return int(answer.json()["device"]["lone_request_threads"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def measure_detector(key: str, args: argparse.Namespace, document: dict) -> dict:
    """The detector: its runtime alone, its runtime with the per-image work the server does
    around it (decode + letterbox of the bench scene, post-processing), the stages one by one,
    and service:ObjectDetector under load on /detect with the scene as a PNG upload."""
    import bentoml

    from bench import ceiling
    from bench.assets import MODELS, ensure_model, write_scene
    from serving.settings import DETECTOR, DetectorSettings, parse_settings, service_config

    model = MODELS[key]
    settings = parse_settings(document, str(args.config), DETECTOR, DetectorSettings)
    workers = workers_of(service_config(document, settings))
    providers = list(settings.model.providers)
    threads = settings.model.intra_op_threads
    detection = settings.detection.model_dump()
    tag = ensure_model(model, args.home, ROOT)
    model_dir = Path(bentoml.models.get(tag).path)
    scene = write_scene(WORK / "images")
    upload = scene.paths["png"]
    data = upload.read_bytes()
    print(f"[{key}] ceiling", flush=True)
    entry = {
        "tag": tag, "kind": model.kind, "task": model.task,
        "service": {"workers": workers, "intra_op_threads": threads, "providers": providers,
                    "max_batch_size": settings.batching.max_batch_size,
                    "max_latency_ms": settings.batching.max_latency_ms,
                    "detection": detection},
        "upload": {"file": upload.name, "content_type": "image/png", "bytes": len(data),
                   "jpeg_bytes": scene.paths["jpeg"].stat().st_size, "width": scene.width,
                   "height": scene.height, "background": scene.background,
                   "labels": scene.labels, "boxes": scene.boxes},
        "runtime_service_threads": ceiling.parallel_runtime_throughput(
            model_dir, providers, workers, threads, args.ceiling_seconds),
        "runtime_all_threads": ceiling.runtime_throughput(
            model_dir, providers, 0, args.ceiling_seconds),
        "pipeline_service_threads": ceiling.parallel_detector_pipeline_throughput(
            model_dir, providers, workers, threads, args.ceiling_seconds, data, detection),
        "decode_ms": ceiling.decode_cost_ms(model_dir, scene.paths, args.ceiling_seconds),
        "stages": ceiling.detector_stages(model_dir, providers, data, detection,
                                          args.ceiling_seconds),
        "served": {},
    }
    found = [d["label"] for d in entry["stages"]["detections"]]
    print(f"[{key}] the scene's {len(scene.labels)} digits {scene.labels}: found {found}",
          flush=True)
    if others := [s for s in args.servers if s != "bentoml"]:
        print(f"[{key}] {', '.join(others)}: classifiers only (bench/peers/), skipped",
              flush=True)
    if "bentoml" in args.servers:
        entry["served"]["bentoml"] = measure_served(key, "bentoml", tag, model_dir, {}, args,
                                                    upload, model.task, "image/png")
    return entry


def measure_curves(args: argparse.Namespace) -> None:
    """bench/curves.py's sweeps for the models it covers among --models, with this run's
    duration, store, configuration and output."""
    from bench import curves

    models = [key for key in curves.MODELS if key in args.models]
    if not models:
        print(f"[curves] none of {list(curves.MODELS)} in --models: skipped", flush=True)
        return
    curves.run(curves.parse_args(
        ["--models", *models, "--duration", str(args.duration), "--config", str(args.config),
         "--home", str(args.home), "--out", str(args.out), *(["--quick"] if args.quick else [])]))


def workers_of(block: dict) -> int:
    """`workers` of a service block (BentoML's key): a number, or cpu_count."""
    workers = block.get("workers", 1)
    return (os.cpu_count() or 1) if workers == "cpu_count" else int(workers)


LITSERVE_GRID = [  # inference workers x ORT threads, batch timeout, API server processes
    {"workers_per_device": w, "threads": t, "batch_timeout": b, "api_servers": a}
    for w, t in ((1, 0), (2, 1)) for b in (0.002, 0.01) for a in (1, 2)
]


def tune_litserve(key: str, images: dict, duration: int, home: Path) -> tuple[dict, dict]:
    """LitServe's best configuration on the light model at c=64, so the comparison is fair."""
    import bentoml

    from bench import load, servers
    from bench.assets import MODELS, ensure_model, upload_of

    tag = ensure_model(MODELS[key], home, ROOT)
    model_dir = Path(bentoml.models.get(tag).path)
    upload, content_type = upload_of(key, images)
    tried = {}
    for config in LITSERVE_GRID:
        with servers.serve("litserve", tag, model_dir, WORK, config) as running:
            load.run_wrk(running.url, running.pid, upload, 16, 3, sample_batches=False,
                         content_type=content_type)
            result = load.run_wrk(running.url, running.pid, upload, 64, duration,
                                  sample_batches=False, content_type=content_type)
        name = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"[litserve tuning] {name}: {result.throughput:.1f} req/s", flush=True)
        tried[name] = {"config": config, "throughput": result.throughput, "p99_ms": result.p99_ms}
    chosen = max(tried.values(), key=lambda r: r["throughput"])["config"]
    return chosen, tried


CORK = {"image_classifier": {"batching": {"dispatch": "cork"}}}
EAGER = {"image_classifier": {"batching": {"dispatch": "eager"}}}
WHOLE_BATCH = {"image_classifier": {"batching": {"runtime_batch_size": 64}}}
NO_GATE = {"image_classifier": {"limits": {"target_wait_ms": 0}}}
NO_LANE = {"image_classifier": {"batching": {"fast_lane": False}}}
# serving/balance.py off: keep-alive connections stay where they were accepted.
UNBALANCED = {"image_classifier": {"connections": {"balance": False}}}
# BentoML's OpenTelemetry middleware back (serving/tracing.py leaves it out with no exporter); at
# sample rate 0 nothing is recorded, as BentoML runs it by default.
TRACED = {"tracing": {"exporter_type": "in_memory"}}
TWO_THREADS = {"workers": 2, "image_classifier": {"model": {"intra_op_threads": 2}}}
# ONNX Runtime's own default: its threads spin between operators (model.thread_spinning).
SPINNING = {"workers": 2, "image_classifier": {"model": {"intra_op_threads": 2,
                                                         "thread_spinning": True}}}
# (name, model, concurrency, change to configuration.yaml[, modules left out]): one at a time
LEVERS = [
    ("shipped defaults", "mobilenet_v3_small", 64, {}),
    ("1 worker, ORT on all cores", "mobilenet_v3_small", 64,
     {"workers": 1, "image_classifier": {"model": {"intra_op_threads": 0}}}),
    ("2 workers x 2 ORT threads", "mobilenet_v3_small", 64, TWO_THREADS),
    ("2 workers x 2 ORT threads, spinning", "mobilenet_v3_small", 64, SPINNING),
    ("access log on", "mobilenet_v3_small", 64, {"logging": {"access": {"enabled": True}}}),
    ("without uvloop and httptools", "mobilenet_v3_small", 64, {}, ("uvloop", "httptools")),
    # A request's images must fit one batch (serving/settings.py checks it at startup).
    ("max_batch_size 8", "mobilenet_v3_small", 64,
     {"image_classifier": {"batching": {"max_batch_size": 8},
                           "limits": {"max_images_per_request": 8}}}),
    ("max_latency_ms 5000", "mobilenet_v3_small", 64,
     {"image_classifier": {"batching": {"max_latency_ms": 5000}}}),
    # A lone request on all cores: FastAPI's runtime has both at 1 connection, each of our
    # workers one (the c=1 latency goal); under load the threads of two workers contend, less
    # when they sleep between operators than when they spin.
    ("shipped defaults", "mobilenet_v3_small", 1, {}),
    ("2 workers x 2 ORT threads", "mobilenet_v3_small", 1, TWO_THREADS),
    ("2 workers x 2 ORT threads, spinning", "mobilenet_v3_small", 1, SPINNING),
    ("shipped defaults", "resnet18", 1, {}),
    ("2 workers x 2 ORT threads", "resnet18", 1, TWO_THREADS),
    ("2 workers x 2 ORT threads, spinning", "resnet18", 1, SPINNING),
    ("2 workers x 2 ORT threads", "resnet18", 4, TWO_THREADS),
    ("2 workers x 2 ORT threads, spinning", "resnet18", 4, SPINNING),
    ("2 workers x 2 ORT threads", "resnet18", 64, TWO_THREADS),
    ("shipped defaults", "mobilenet_v3_small", 4, {}),
    ("max_latency_ms 5000", "mobilenet_v3_small", 4,
     {"image_classifier": {"batching": {"max_latency_ms": 5000}}}),
    ("shipped defaults", "resnet18", 4, {}),
    ("max_latency_ms 5000", "resnet18", 4,
     {"image_classifier": {"batching": {"max_latency_ms": 5000}}}),
    ("shipped defaults", "resnet18", 128, {}),
    ("max_latency_ms 5000", "resnet18", 128,
     {"image_classifier": {"batching": {"max_latency_ms": 5000}}}),
    ("1 worker, ORT on all cores", "resnet18", 128,
     {"workers": 1, "image_classifier": {"model": {"intra_op_threads": 0}}}),
    # serving/batcher.py against BentoML's own dispatch rule; serving/calibration.py's runtime
    # batch size against one runtime call per batch.
    ("BentoML's cork dispatch", "mobilenet_v3_small", 4, CORK),
    ("BentoML's cork dispatch", "mobilenet_v3_small", 64, CORK),
    ("shipped defaults", "digits", 1, {}),
    ("BentoML's cork dispatch", "digits", 1, CORK),
    ("shipped defaults", "digits", 128, {}),
    ("BentoML's cork dispatch", "digits", 128, CORK),
    ("eager dispatch (no refill hold)", "digits", 64, EAGER),
    ("eager dispatch (no refill hold)", "digits", 128, EAGER),
    ("eager dispatch (no refill hold)", "mobilenet_v3_small", 64, EAGER),
    # serving/fast_lane.py against BentoML's whole per-request path.
    ("no fast lane (batching.fast_lane false)", "digits", 1, NO_LANE),
    ("shipped defaults", "digits", 64, {}),
    ("no fast lane (batching.fast_lane false)", "digits", 64, NO_LANE),
    ("no fast lane (batching.fast_lane false)", "digits", 128, NO_LANE),
    ("no fast lane (batching.fast_lane false)", "mobilenet_v3_small", 64, NO_LANE),
    ("BentoML's tracing middleware (exporter in_memory)", "digits", 64, TRACED),
    ("BentoML's tracing middleware (exporter in_memory)", "digits", 128, TRACED),
    ("BentoML's tracing middleware (exporter in_memory)", "mobilenet_v3_small", 64, TRACED),
    ("shipped defaults", "mobilenet_v3_small", 128, {}),
    ("one runtime call per batch", "mobilenet_v3_small", 128, WHOLE_BATCH),
    ("one runtime call per batch", "resnet18", 128, WHOLE_BATCH),
    # serving/admission.py's gate against none: every request goes in and is decoded at once.
    ("shipped defaults", "resnet18", 256, {}),
    ("no gate (limits.target_wait_ms 0)", "resnet18", 256, NO_GATE),
    ("no connection balance (connections.balance false)", "mobilenet_v3_small", 4, UNBALANCED),
    ("no connection balance (connections.balance false)", "mobilenet_v3_small", 64,
     UNBALANCED),
    ("no connection balance (connections.balance false)", "resnet18", 4, UNBALANCED),
    ("no connection balance (connections.balance false)", "digits", 64, UNBALANCED),
]

# Where a worker's CPU goes (py-spy), under the shipped configuration: runs of their own, since
# sampling costs the worker CPU (a profiled run is no row to compare a lever with).
PROFILED = [("mobilenet_v3_small", 64), ("mobilenet_v3_small", 128), ("digits", 64),
            ("digits", 128)]


def measure_levers(models: dict, images: dict, duration: int) -> tuple[list, dict]:
    """Each lever alone against the shipped configuration; and py-spy profiles of one worker
    under the shipped configuration (measure_profiles)."""
    import bentoml

    from bench import load, servers
    from bench.assets import upload_of

    measured = []
    for name, key, concurrency, overrides, *without in LEVERS:
        if key not in models:
            continue
        without = tuple(without[0]) if without else ()
        tag = models[key]["tag"]
        model_dir = Path(bentoml.models.get(tag).path)
        upload, content_type = upload_of(key, images)
        with servers.serve("bentoml", tag, model_dir, WORK, overrides, without) as running:
            load.run_wrk(running.url, running.pid, upload, 16, 3, content_type=content_type)
            result = load.run_wrk(running.url, running.pid, upload, concurrency, duration,
                                  content_type=content_type)
        print(f"[lever] {key} c={concurrency} {name}: {result.throughput:.1f} req/s "
              f"p99 {result.p99_ms:.0f} ms", flush=True)
        measured.append({"name": name, "model": key, "overrides": overrides,
                         "without_modules": list(without), **asdict(result)})
    return measured, measure_profiles(models, images, duration)


def measure_profiles(models: dict, images: dict, duration: int) -> dict:
    """Shares of one worker's busy py-spy samples by stage, by "model, c=N" (PROFILED)."""
    import bentoml

    from bench import load, profile, servers
    from bench.assets import upload_of

    profiles = {}
    for key, concurrency in PROFILED:
        if key not in models:
            continue
        tag = models[key]["tag"]
        upload, content_type = upload_of(key, images)
        with servers.serve("bentoml", tag, Path(bentoml.models.get(tag).path), WORK) as running:
            load.run_wrk(running.url, running.pid, upload, 16, 3, content_type=content_type)
            spy = profile.start(running.pid, max(duration - 2, 3), WORK / "profile.txt")
            load.run_wrk(running.url, running.pid, upload, concurrency, duration,
                         content_type=content_type)
            spy.wait()
        profiles[f"{key}, c={concurrency}"] = profile.summarize(WORK / "profile.txt")
        print(f"[profile] {key} c={concurrency}: " + ", ".join(
            f"{stage} {share:.0%}" for stage, share in profiles[f"{key}, c={concurrency}"].items()),
            flush=True)
    return profiles


if __name__ == "__main__":
    main()
