"""`python -m bench.curves` (also part of `make bench`): how cost grows as work grows, for this
project's service. Three sweeps, each against one running server per model:

- image size: a 224x224 JPEG, the bench's 640x480 JPEG, a 12-megapixel photo, a 1920x1080 PNG
  screenshot (bench/assets.py write_curve_images), one per request, at a fixed concurrency;
- images per request: 1, 8, 32 at the same concurrency;
- connections: 1, 2, 4, ..., 512 with one small upload per request.

The light model (mobilenet_v3_small) and the default digits classifier get all three; the
detector the last two (its upload: the bench scene). Each point: answers/s, goodput (200
answers/s) and images/s, p50 and p99 of every answer, answers by status, the server's CPU per
image. Writes docs/bench/curves.json, docs/bench/curves-*.png and the "How cost grows" section
of docs/benchmarks.md. `--quick`: a smoke run under build/bench/quick."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import with_quick_defaults

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench"

MODELS = ("mobilenet_v3_small", "digits", "detector")
SWEEPS = ("image_size", "images_per_request", "connections")
# The detector letterboxes every upload to 128x128 and is benched on its own scene: its image
# size sweep would repeat the classifiers' decode costs.
DETECTOR_SWEEPS = ("images_per_request", "connections")
# The upload of each sweep that does not vary it: the bench's usual photo for images per
# request (what a client batching photos sends); the smallest JPEG for connections, so that the
# curve shows the serving layer's queueing and refusals rather than decode time.
PER_REQUEST_UPLOAD, CONNECTIONS_UPLOAD, SCENE = "jpeg-640x480", "jpeg-224", "scene"


@dataclass(frozen=True)
class Defaults:
    concurrency: int = 16  # image size, images per request: the main bench's middle level
    images_per_request: tuple[int, ...] = (1, 8, 32)  # 32: the shipped max_images_per_request
    connections: tuple[int, ...] = tuple(2**i for i in range(10))  # 1 ... 512
    duration: int = 10  # seconds per point, as make bench's levels
    warmup: int = 2  # seconds at each point before it is measured, discarded


DEFAULTS = Defaults()
# --quick: what it changes where the option is left at its default.
QUICK = {"duration": 2, "warmup": 1, "connections": [1, 16, 128, 512], "out": WORK / "quick"}


@dataclass(frozen=True)
class Point:
    """One measurement: this upload, this many times per request, over this many connections."""

    sweep: str
    upload: str  # a key of the uploads (write_curve_images(), or SCENE)
    images_per_request: int
    concurrency: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.curves", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    parser.add_argument("--concurrency", type=int, default=DEFAULTS.concurrency,
                        help="connections of the image size and images per request sweeps")
    parser.add_argument("--images-per-request", nargs="+", type=int,
                        default=list(DEFAULTS.images_per_request))
    parser.add_argument("--connections", nargs="+", type=int,
                        default=list(DEFAULTS.connections))
    parser.add_argument("--duration", type=int, default=DEFAULTS.duration,
                        help="seconds per point")
    parser.add_argument("--warmup", type=int, default=DEFAULTS.warmup,
                        help="seconds of load before each point, not measured")
    parser.add_argument("--config", type=Path, default=ROOT / "configuration.yaml",
                        help="the service configuration to measure")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="writes OUT/bench/curves.json, OUT/bench/curves-*.png and the "
                        "section in OUT/benchmarks.md")
    parser.add_argument("--home", type=Path, default=WORK / "home",
                        help="the BentoML store the models come from (exported into it if "
                        "missing, as `python -m bench` does)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the plots and the section from the saved curves.json")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run, not a result: where not given, --duration 2 "
                        "--warmup 1 --connections 1 16 128 512 --out build/bench/quick")
    return with_quick_defaults(parser.parse_args(argv), parser, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.home = args.home.resolve()
    os.environ["BENTOML_HOME"] = str(args.home)  # a store of its own, before bentoml loads
    os.environ["BENTOML_CONFIG"] = str(args.config.resolve())  # what bench.servers reads
    if args.report_only:
        from bench import report

        report.write_curves(json.loads(curves_path(args.out).read_text()), args.out)
        print(f"wrote {args.out / 'benchmarks.md'} (How cost grows)")
        return
    run(args)


def curves_path(out: Path) -> Path:
    return out / "bench" / "curves.json"


# --- pure logic: the points, the limits they need, one point's figures ------------------------

def sweep_points(sweep: str, task: str, args: argparse.Namespace,
                 sizes: list[str]) -> list[Point]:
    """The points of one sweep for a model of `task`; `sizes`: the image-size uploads, in
    order. Empty where the sweep does not apply (the detector's image size)."""
    detector = task == "detection"
    if sweep == "image_size":
        return [] if detector else [Point(sweep, key, 1, args.concurrency) for key in sizes]
    if sweep == "images_per_request":
        upload = SCENE if detector else PER_REQUEST_UPLOAD
        return [Point(sweep, upload, n, args.concurrency) for n in args.images_per_request]
    if sweep == "connections":
        upload = SCENE if detector else CONNECTIONS_UPLOAD
        return [Point(sweep, upload, 1, c) for c in args.connections]
    raise ValueError(f"unknown sweep {sweep!r}; choose from {SWEEPS}")


def body_bytes(image_bytes: int, images_per_request: int, content_type: str) -> int:
    """The size of one request's body (bench/load.py multipart_body), without building it."""
    from bench.load import BOUNDARY, multipart_body

    trailer = len(f"--{BOUNDARY}--\r\n")
    per_image = len(multipart_body(b"", 1, content_type=content_type)[1]) - trailer
    return images_per_request * (per_image + image_bytes) + trailer


def refusals(limits: dict, width: int, height: int, images_per_request: int,
             request_bytes: int) -> list[str]:
    """The limits (configuration.yaml `limits:`) that refuse a request of `images_per_request`
    images of width x height in a body of `request_bytes`, each as `key value < needed`."""
    needed = {"max_images_per_request": images_per_request, "max_image_pixels": width * height,
              "max_request_bytes": request_bytes}
    return [f"{key} {limits[key]} < {value}" for key, value in needed.items()
            if value > limits[key]]


def raised_limits(limits: dict, max_batch_size: int, needs: list[dict]) -> dict:
    """The change to our section (`limits:`, and `batching:` where one request would no longer
    fit one batch) that admits every request in `needs` (dicts of the three keys `refusals`
    checks); {} when the limits already do."""
    raised = {key: max([limits[key], *(need[key] for need in needs)]) for key in limits
              if any(need.get(key, 0) > limits[key] for need in needs)}
    if not raised:
        return {}
    change: dict = {"limits": raised}
    if raised.get("max_images_per_request", 0) > max_batch_size:
        change["batching"] = {"max_batch_size": raised["max_images_per_request"]}
    return change


def summarize(result: dict) -> dict:
    """One point's figures from a LoadResult (as a dict): every answer per second, goodput
    (200 answers per second; the API answers 200 or an error), images answered per second,
    refusals per second (429 and 503), and the server's CPU per image answered."""
    seconds = result["seconds"]
    goodput = result["ok"] / seconds
    images = goodput * result["images_per_request"]
    return {
        **result,
        "answers_per_s": result["requests"] / seconds,
        "goodput_per_s": goodput,
        "images_per_s": images,
        "refused_per_s": (result["status_429"] + result["status_503"]) / seconds,
        "cpu_ms_per_image": result["server_cpu_cores"] * 1000 / images if images else None,
    }


# --- measuring ---------------------------------------------------------------------------------

def raise_open_files(connections: int) -> None:
    """wrk holds a socket per connection (and inherits our limit): raise the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + 256
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"{connections} connections need {needed} open files; the hard limit "
                         f"is {hard}: raise it (ulimit -Hn) or pass fewer --connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def run(args: argparse.Namespace) -> dict:
    """Measure every sweep of every model, save curves.json, write the plots and the section."""
    import bentoml

    from bench import report
    from bench.assets import MODELS as BENCH_MODELS
    from bench.assets import CurveImage, ensure_model, write_curve_images, write_scene

    raise_open_files(max([args.concurrency, *args.connections]))
    services = service_settings(args.config)
    sizes = write_curve_images(WORK / "images")
    scene = write_scene(WORK / "images")
    uploads = {**sizes, SCENE: CurveImage(SCENE, f"{scene.width}x{scene.height} PNG scene",
                                          scene.paths["png"], "image/png", scene.width,
                                          scene.height)}
    curves: dict = {
        "machine": report.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
        "concurrency": args.concurrency, "config": str(args.config), "service": services,
        "uploads": {key: {"label": u.label, "file": u.path.name, "content_type": u.content_type,
                          "width": u.width, "height": u.height, "bytes": u.path.stat().st_size}
                    for key, u in uploads.items()},
        "models": {},
    }
    for key in args.models:
        model = BENCH_MODELS[key]
        tag = ensure_model(model, args.home, ROOT)
        model_dir = Path(bentoml.models.get(tag).path)
        entry: dict = {"tag": tag, "kind": model.kind, "task": model.task, "sweeps": {}}
        for sweep in args.sweeps:
            points = sweep_points(sweep, model.task, args, list(sizes))
            if points:
                entry["sweeps"][sweep] = measure_sweep(key, tag, model_dir, model.task, sweep,
                                                       points, uploads, args, services)
        curves["models"][key] = entry
    path = curves_path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curves, indent=1))
    report.write_curves(curves, args.out)
    print(f"wrote {path} and {args.out / 'benchmarks.md'} (How cost grows)"
          + (" (--quick: a smoke run, not a result)" if args.quick else ""), flush=True)
    return curves


def service_settings(config: Path) -> dict:
    """Per task, what the report states of the configuration: workers, runtime threads,
    batching, and the limits the sweeps check."""
    from bench.__main__ import workers_of
    from serving.settings import (
        CLASSIFIER,
        DETECTOR,
        ClassifierSettings,
        DetectorSettings,
        parse_settings,
        read_config_file,
        service_config,
    )

    document = read_config_file(config)
    services = {}
    for task, where, model in (("classification", CLASSIFIER, ClassifierSettings),
                               ("detection", DETECTOR, DetectorSettings)):
        settings = parse_settings(document, str(config), where, model)
        limits = settings.limits
        services[task] = {
            "workers": workers_of(service_config(document, settings)),
            "intra_op_threads": settings.model.intra_op_threads,
            "max_batch_size": settings.batching.max_batch_size,
            "max_latency_ms": settings.batching.max_latency_ms,
            "limits": {"max_images_per_request": limits.max_images_per_request,
                       "max_image_pixels": limits.max_image_pixels,
                       "max_request_bytes": limits.max_request_bytes},
            "max_concurrency": limits.max_concurrency,
        }
    return services


def measure_sweep(key: str, tag: str, model_dir: Path, task: str, sweep: str,
                  points: list[Point], uploads: dict, args: argparse.Namespace,
                  services: dict) -> dict:
    """One sweep on one server under the configuration as given (--config). Points its limits
    refuse are measured as they are (the refusal is the outcome), then again on a second server
    with those limits raised just enough (bench.servers.bentoml_config overrides)."""
    from bench import servers

    service = services[task]
    needs, refused = [], set()
    for point in points:
        upload = uploads[point.upload]
        need = {"max_images_per_request": point.images_per_request,
                "max_image_pixels": upload.width * upload.height,
                "max_request_bytes": body_bytes(upload.path.stat().st_size,
                                                point.images_per_request, upload.content_type)}
        if refusals(service["limits"], upload.width, upload.height, point.images_per_request,
                    need["max_request_bytes"]):
            needs.append(need)
            refused.add(point)
    entry = {"concurrency": args.concurrency if sweep != "connections" else None,
             **measure_points(key, tag, model_dir, task, points, uploads, args, {}, service)}
    change = raised_limits(service["limits"], service["max_batch_size"], needs)
    if change:
        overrides = {servers.SERVICES[task][1]: change}
        print(f"[curves] {key} {sweep}: the configured limits refuse {len(refused)} point(s); "
              f"again with {change}", flush=True)
        again = measure_points(key, tag, model_dir, task, [p for p in points if p in refused],
                               uploads, args, overrides, service)
        entry["raised"] = {"overrides": overrides, "ready_s": again["ready_s"]}
        entry["points"] += again["points"]
    return entry


def measure_points(key: str, tag: str, model_dir: Path, task: str, points: list[Point],
                   uploads: dict, args: argparse.Namespace, overrides: dict,
                   service: dict) -> dict:
    """Start the service once and measure each point after its own warm-up."""
    from bench import load, servers

    route = servers.ROUTES[task]
    measured = []
    with servers.serve("bentoml", tag, model_dir, WORK, overrides, task=task) as running:
        print(f"[curves] {key} {points[0].sweep}: ready in {running.ready_s:.2f}s", flush=True)
        for point in points:
            upload = uploads[point.upload]

            def wrk(seconds: int, sample: bool, point: Point = point, upload=upload):
                return load.run_wrk(running.url, running.pid, upload.path, point.concurrency,
                                    seconds, sample_batches=sample,
                                    content_type=upload.content_type, route=route,
                                    images_per_request=point.images_per_request)

            if args.warmup:
                wrk(args.warmup, False)
            figures = summarize(asdict(wrk(args.duration, True)))
            why = refusals(service["limits"], upload.width, upload.height,
                           point.images_per_request, figures["body_bytes"])
            row = {"upload": point.upload, **figures,
                   "refused_by_limits": why, "limits_raised": bool(overrides)}
            print(f"[curves] {key} {point.sweep} {point.upload} x{point.images_per_request} "
                  f"c={point.concurrency}: {row['goodput_per_s']:.1f} ok/s "
                  f"{row['images_per_s']:.1f} img/s p99 {row['p99_ms']:.0f} ms"
                  + (f" ({row['requests'] - row['ok']} not 200)" if row["requests"] > row["ok"]
                     else ""), flush=True)
            measured.append(row)
    return {"ready_s": running.ready_s, "overrides": overrides, "points": measured}


if __name__ == "__main__":
    main()
