"""image-client (or python -m classifier_client): the services from the command line.

  predict IMAGE... --url URL               labels for a few images (a classifier)
  detect IMAGE... --url URL [--draw DIR]   detections for a few images (a detector); --draw
                                           saves each image with its boxes as DIR/<stem>.boxes.png
  folder DIR --url URL --out FILE          every image under DIR (concurrent): a classifier's
                                           rows (.csv/.jsonl, resumable), a detector's COCO
                                           results (.json); the service's /model_info says which
  offline DIR --model TAG --out FILE       the same with the stored model, no server
  smoke --url URL                          health, one known prediction, latency percentiles
  load --url URL --concurrency C --duration S   closed-loop load and a summary table

What each needs: predict, smoke and load a running ImageClassifier at --url (default
http://127.0.0.1:3000), detect an ObjectDetector, folder either. offline needs no server but the
model in the BentoML model store ($BENTOML_HOME, default ~/bentoml) and onnxruntime: the
`offline` extra, pip install "image-client[offline]" (or the repository's .venv).

The API key, when the service has one, comes from --api-key, else $IMAGE_CLASSIFIER_API_KEY
(predict, smoke, load), $OBJECT_DETECTOR_API_KEY (detect), or whichever of the two is set
(folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from .coco import FORMAT as COCO_FORMAT
from .detector import DetectOptions

DEFAULT_URL = "http://127.0.0.1:3000"
# examples/digit_7_00.png, shipped in the package so that `smoke` and `load` work when installed.
EXAMPLE = Path(__file__).resolve().parent / "data" / "digit_7_00.png"
CLASSIFIER_KEY, DETECTOR_KEY = "IMAGE_CLASSIFIER_API_KEY", "OBJECT_DETECTOR_API_KEY"
FOLDER_OUTPUT = f"""\
A classifier: --out preds.csv or preds.jsonl, one row per image (path, label, confidence,
model); a second run sends only the files not yet in it.

A detector: --out results.json, COCO results, and results.images.json beside it; every run
answers the whole folder and rewrites both. For COCO evaluation pass --confidence-threshold 0.05
(as train_export's evaluation does); unset, the thresholds are the service's defaults.
{COCO_FORMAT}
Failures are listed per file, with the reason, in <out>.failed.jsonl; the exit status is then 1
and they are tried again next run.
"""


NEEDS_CLASSIFIER = ("Needs: an ImageClassifier at --url, and its API key if it has one "
                    f"(--api-key or ${CLASSIFIER_KEY}).")
NEEDS_DETECTOR = ("Needs: an ObjectDetector at --url, and its API key if it has one "
                  f"(--api-key or ${DETECTOR_KEY}).")
NEEDS_EITHER = ("Needs: an ImageClassifier or an ObjectDetector at --url, and its API key if it "
                f"has one (--api-key, ${CLASSIFIER_KEY} or ${DETECTOR_KEY}).")
OFFLINE_EXTRA = ('the `offline` extra: pip install "image-client[offline]" (from where you '
                 'installed image-client, e.g. pip install "./checkout[offline]"); or run it from '
                 "the repository's .venv")
NEEDS_OFFLINE = ("Needs: no server; the model in the BentoML model store ($BENTOML_HOME, default "
                 f"~/bentoml), and onnxruntime: {OFFLINE_EXTRA}.")
# What `offline` imports beyond the base install: onnxruntime, and the serving package's own.
OFFLINE_MODULES = frozenset({"onnxruntime", "yaml", "pydantic", "serving"})


def prog_name() -> str:
    """`image-client` when run as the installed command, else `python -m classifier_client`."""
    name = Path(sys.argv[0]).name
    return "python -m classifier_client" if name in ("__main__.py", "-m", "-c", "") else name


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number from 0 to 1")
    return value


def detection_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number from 1 to 1000")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_url(sub: argparse.ArgumentParser, *key_vars: str) -> argparse.ArgumentParser:
        sub.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
        key = next((os.environ[v] for v in key_vars if os.environ.get(v)), None)
        sub.add_argument("--api-key", default=key,
                         help="sent as `Authorization: Bearer`; default "
                         + " or ".join(f"${v}" for v in key_vars))
        return sub

    def with_thresholds(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        group = sub.add_argument_group("detector thresholds (unset: the service's defaults)")
        group.add_argument("--confidence-threshold", type=unit_interval, metavar="X",
                           help="detections scoring at or below X are dropped (0-1)")
        group.add_argument("--iou-threshold", type=unit_interval, metavar="Y",
                           help="per-class NMS: of two boxes of one class overlapping more than "
                           "Y, the lower-scoring one is dropped (0-1)")
        group.add_argument("--max-detections", type=detection_count, metavar="N",
                           help="at most N detections per image (1-1000)")
        return sub

    predict = with_url(commands.add_parser("predict", help="labels for a few images",
                                           description=NEEDS_CLASSIFIER), CLASSIFIER_KEY)
    predict.add_argument("images", nargs="+", type=Path)

    detect = with_thresholds(with_url(commands.add_parser(
        "detect", help="detections for a few images, optionally drawn",
        description="One request with every image; prints one JSON line per image: "
        '{"path", "width", "height", "detections": [{"label", "class_id", "score", "box": '
        "[x1, y1, x2, y2]}]}, boxes in the image's pixels after its EXIF rotation, best first. "
        + NEEDS_DETECTOR),
        DETECTOR_KEY))
    detect.add_argument("images", nargs="+", type=Path)
    detect.add_argument("--draw", type=Path, metavar="OUTDIR",
                        help="write each image with its boxes and labels to "
                        "OUTDIR/<stem>.boxes.png")

    folder = with_thresholds(with_url(commands.add_parser(
        "folder", help="every image under a folder", description=textwrap.fill(NEEDS_EITHER),
        epilog=FOLDER_OUTPUT,
        formatter_class=argparse.RawDescriptionHelpFormatter), CLASSIFIER_KEY, DETECTOR_KEY))
    folder.add_argument("folder", type=Path)
    folder.add_argument("--out", type=Path, required=True,
                        help="a classifier's .csv or .jsonl, a detector's .json (COCO results)")
    folder.add_argument("--concurrency", type=int, default=8)

    offline = with_thresholds(commands.add_parser(
        "offline", help="a folder through the stored model, no server",
        description=textwrap.fill(
            "The model's card says its task; the output is `folder`'s. A detector's default "
            "thresholds are configuration.yaml's (or $BENTOML_CONFIG's) `detection:`. "
            + NEEDS_OFFLINE),
        epilog=FOLDER_OUTPUT, formatter_class=argparse.RawDescriptionHelpFormatter))
    offline.add_argument("folder", type=Path)
    offline.add_argument("--out", type=Path, required=True,
                         help="a classifier's .csv or .jsonl, a detector's .json (COCO results)")
    offline.add_argument("--model", default="digits-classifier:latest",
                         help="model store tag, a classifier or a detector "
                         "(default digits-classifier:latest)")

    smoke = with_url(commands.add_parser("smoke", help="check a fresh deployment",
                                         description=NEEDS_CLASSIFIER), CLASSIFIER_KEY)
    smoke.add_argument("--image", type=Path, default=EXAMPLE)
    smoke.add_argument("--expect", default="7", help="the label --image must get")
    smoke.add_argument("--requests", type=int, default=50, help="for the latency percentiles")

    load = with_url(commands.add_parser("load", help="closed-loop load, summary table",
                                        description=NEEDS_CLASSIFIER), CLASSIFIER_KEY)
    load.add_argument("--image", type=Path, default=EXAMPLE)
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--duration", type=float, default=10, help="seconds")
    return parser.parse_args(argv)


def detect_options(args: argparse.Namespace) -> DetectOptions:
    return DetectOptions(args.confidence_threshold, args.iou_threshold, args.max_detections)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "predict":
        from .retry import RetryingClient

        with RetryingClient(args.url, api_key=args.api_key) as client:
            for path, answer in zip(args.images, client.classify(args.images)):
                print(json.dumps({"path": str(path), "label": answer["label"],
                                  "confidence": round(answer["confidence"], 6)}))
        return 0
    if args.command == "detect":
        return detect(args)
    if args.command in ("folder", "offline"):
        if args.command == "folder":
            from .folder import run_folder

            answered, failed = run_folder(args.url, args.folder, args.out,
                                          concurrency=args.concurrency, api_key=args.api_key,
                                          options=detect_options(args))
        else:
            try:
                from .offline import run_folder_offline
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] not in OFFLINE_MODULES:
                    raise
                print(f"offline runs the model in this process and needs {exc.name}, which "
                      f"is not installed: {OFFLINE_EXTRA}.", file=sys.stderr)
                return 2
            answered, failed = run_folder_offline(args.model, args.folder, args.out,
                                                  options=detect_options(args))
        print(f"{answered} answered, {failed} failed -> {args.out}"
              + (f" (failures: {args.out.name}.failed.jsonl; run again to retry them)"
                 if failed else ""))
        return 1 if failed else 0
    if args.command == "smoke":
        from .smoke import smoke

        return 0 if smoke(args.url, args.image, args.expect, args.requests, args.api_key) else 1
    from .load import load, print_table

    print_table(load(args.url, args.image, args.concurrency, args.duration, args.api_key))
    return 0


def detect(args: argparse.Namespace) -> int:
    import httpx

    from .detector import DetectorClient
    from .draw import draw_file
    from .folder import reason_of

    try:
        with DetectorClient(args.url, api_key=args.api_key) as client:
            answers = client.detect(args.images, detect_options(args))
    except (httpx.HTTPError, OSError) as exc:  # the service's {"error", "detail"}, or why not
        print(f"{args.url}/detect: {reason_of(exc)}", file=sys.stderr)
        return 1
    for path, answer in zip(args.images, answers):
        print(json.dumps({"path": str(path), "width": answer["width"],
                          "height": answer["height"], "detections": answer["detections"]}))
        if args.draw is not None:
            print(f"drew {draw_file(path, answer, args.draw)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
