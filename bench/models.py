"""`make bench-models`: what each extra model costs a multi-model deployment (service:ModelServer).

For 1, 2 and 3 models in one deployment (the digits classifier; + the detector; + a second copy
of the classifier under another name, which loads its own session), one worker each time: the
seconds from `bentoml serve` to ready, and the RSS of the worker and of the whole process tree
once ready and after a few answers. Beside them, the single-model services for reference.
Writes docs/multi-model-cost.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from devtools.processes import free_port, stop_tree, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digit_7_00.png"
SCENE = ROOT / "examples" / "scene_example.png"
ANSWERS = 20


def model_server_config(models: list[dict]) -> dict:
    return {"services": {"ModelServer": {"workers": 1, "metrics": {"enabled": True},
                                         "model_server": {"models": models}}}}


DIGITS = {"name": "digits", "task": "classification", "model": {"tag": "digits-classifier:latest"}}
SCENES = {"name": "scenes", "task": "detection", "model": {"tag": "digits-detector:latest"}}
DIGITS_AGAIN = {**DIGITS, "name": "digits-b"}

SETUPS = [
    ("ImageClassifier alone", "service:ImageClassifier",
     {"services": {"ImageClassifier": {"workers": 1}}}, [("/classify", EXAMPLE)]),
    ("ObjectDetector alone", "service:ObjectDetector",
     {"services": {"ObjectDetector": {"workers": 1}}}, [("/detect", SCENE)]),
    ("ModelServer, 1 model (digits)", "service:ModelServer", model_server_config([DIGITS]),
     [("/models/digits/classify", EXAMPLE)]),
    ("ModelServer, 2 models (+ detector)", "service:ModelServer",
     model_server_config([DIGITS, SCENES]),
     [("/models/digits/classify", EXAMPLE), ("/models/scenes/detect", SCENE)]),
    ("ModelServer, 3 models (+ digits again)", "service:ModelServer",
     model_server_config([DIGITS, SCENES, DIGITS_AGAIN]),
     [("/models/digits/classify", EXAMPLE), ("/models/scenes/detect", SCENE),
      ("/models/digits-b/classify", EXAMPLE)]),
]


def rss_mb(process: psutil.Process) -> tuple[float, float]:
    """(the largest worker's RSS, the whole tree's), in MB."""
    from bench.load import rss_mb as tree_rss_mb

    workers = [c for c in process.children(recursive=True)
               if "_bentoml_impl.worker" in " ".join(c.cmdline())]
    worker = max((w.memory_info().rss for w in workers), default=0)
    return worker / 2**20, tree_rss_mb(process.pid)


def measure(name: str, target: str, config: dict, calls: list[tuple[str, Path]],
            workdir: Path) -> dict:
    path = workdir / f"{name.split()[0]}-{len(calls)}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "BENTOML_CONFIG": str(path)}
    started = time.perf_counter()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1",
         "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(f"{url}/readyz", lambda: server.poll() is None, 300)
        ready_s = time.perf_counter() - started
        process = psutil.Process(server.pid)
        ready_worker, ready_tree = rss_mb(process)
        for _ in range(ANSWERS):
            for route, image in calls:
                answer = httpx.post(url + route, files={"images": image.open("rb")}, timeout=60)
                answer.raise_for_status()
        worker, tree = rss_mb(process)
    finally:
        stop_tree(server)
    return {"setup": name, "ready_s": ready_s, "ready_worker": ready_worker,
            "ready_tree": ready_tree, "worker": worker, "tree": tree}


def report(rows: list[dict], note: str) -> str:
    from bench.report import machine

    host = machine()
    lines = [
        "# What each model costs a multi-model deployment",
        "",
        f"`make bench-models` (bench/models.py), {time.strftime('%Y-%m-%d %H:%M')}, on "
        f"{host['cpu']} ({host['cores']} cores, {host['memory_gib']} GiB), {host['os']}. "
        "One worker per server; RSS once "
        f"ready and after {ANSWERS} answers per model. {note}",
        "",
        "| setup | seconds to ready | worker RSS ready / after (MB) "
        "| all processes ready / after (MB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['setup']} | {row['ready_s']:.1f} | {row['ready_worker']:.0f} / "
                     f"{row['worker']:.0f} | {row['ready_tree']:.0f} / {row['tree']:.0f} |")
    lines += ["", "Every worker loads every model: a deployment's RSS is about the worker's "
              "times `workers`, plus BentoML's supervisor.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "multi-model-cost.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-models"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [measure(*setup, workdir) for setup in SETUPS]
    args.out.write_text(report(rows, args.note))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
