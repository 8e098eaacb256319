"""What both peers share with our service: the stored graph, decode, runtime and postprocess.
Only the serving layer differs between the three servers."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.contract import ONNX_FILE, ModelCard
from serving.runtime import OnnxRuntime
from serving.settings import parse_settings, read_config_file


def parse_args(extra: dict[str, type] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    for name, kind in (extra or {}).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind)
    return parser.parse_args()


def load(model_dir: Path, threads: int = 0) -> tuple[ModelCard, OnnxRuntime, int]:
    """Card, runtime (the service's providers; `threads` ORT threads, 0 = ORT's default of one
    per core, spinning, as a tutorial server has it), and the service's top_k."""
    settings = parse_settings(read_config_file())
    card = ModelCard.read(model_dir)
    runtime = OnnxRuntime(model_dir / ONNX_FILE, card.input, card.graph,
                          settings.model.providers, threads, spin=True)
    return card, runtime, settings.response.top_k
