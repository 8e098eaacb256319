"""python -m classifier_client: the service from the command line.

  predict IMAGE... --url URL              labels for a few images
  folder DIR --url URL --out preds.csv    every image under DIR (concurrent, resumable)
  offline DIR --model TAG --out preds.csv the same with the stored model, no server
  smoke --url URL                         health, one known prediction, latency percentiles
  load --url URL --concurrency C --duration S   closed-loop load and a summary table

The API key, when the service has one, comes from --api-key or $IMAGE_CLASSIFIER_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:3000"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digit_7_00.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m classifier_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_url(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
        sub.add_argument("--api-key", default=os.environ.get("IMAGE_CLASSIFIER_API_KEY"),
                         help="sent as `Authorization: Bearer`; default $IMAGE_CLASSIFIER_API_KEY")
        return sub

    predict = with_url(commands.add_parser("predict", help="labels for a few images"))
    predict.add_argument("images", nargs="+", type=Path)

    folder = with_url(commands.add_parser("folder", help="every image under a folder"))
    folder.add_argument("folder", type=Path)
    folder.add_argument("--out", type=Path, required=True, help="results, .csv or .jsonl")
    folder.add_argument("--concurrency", type=int, default=8)

    offline = commands.add_parser("offline", help="a folder through the stored model, no server")
    offline.add_argument("folder", type=Path)
    offline.add_argument("--out", type=Path, required=True, help="results, .csv or .jsonl")
    offline.add_argument("--model", default="digits-classifier:latest", help="model store tag")

    smoke = with_url(commands.add_parser("smoke", help="check a fresh deployment"))
    smoke.add_argument("--image", type=Path, default=EXAMPLE)
    smoke.add_argument("--expect", default="7", help="the label --image must get")
    smoke.add_argument("--requests", type=int, default=50, help="for the latency percentiles")

    load = with_url(commands.add_parser("load", help="closed-loop load, summary table"))
    load.add_argument("--image", type=Path, default=EXAMPLE)
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--duration", type=float, default=10, help="seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "predict":
        from .retry import RetryingClient

        with RetryingClient(args.url, api_key=args.api_key) as client:
            for path, answer in zip(args.images, client.classify(args.images)):
                print(json.dumps({"path": str(path), "label": answer["label"],
                                  "confidence": round(answer["confidence"], 6)}))
        return 0
    if args.command in ("folder", "offline"):
        if args.command == "folder":
            from .folder import classify_folder

            answered, failed = classify_folder(args.url, args.folder, args.out,
                                               concurrency=args.concurrency, api_key=args.api_key)
        else:
            from .offline import classify_folder_offline

            answered, failed = classify_folder_offline(args.model, args.folder, args.out)
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


if __name__ == "__main__":
    sys.exit(main())
