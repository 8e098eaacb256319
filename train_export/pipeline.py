"""train -> export -> check -> store, for the default digits dataset."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from serving.contract import GraphSpec, InputSpec, ModelCard, Parity

from .config import DEFAULT_ARCHITECTURE, TrainConfig
from .data import load_digits_split
from .examples import write_examples
from .export import ServingWrapper, check_head_split, export_all
from .models import build_model, split_head
from .store import library_versions, save_to_store
from .train import accuracy, to_float, train

logger = logging.getLogger(__name__)

# The digits are light ink on a dark background, about 0.12 bright on average.
DIGITS_MEAN, DIGITS_STD = (0.13,), (0.28,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_spec_for(config: TrainConfig) -> InputSpec:
    grey = config.architecture == DEFAULT_ARCHITECTURE
    return InputSpec(
        height=config.input_size,
        width=config.input_size,
        channels=1 if grey else 3,
        color_mode="L" if grey else "RGB",
        resize="bilinear",
        polarity="light_on_dark",
        mean=DIGITS_MEAN if grey else IMAGENET_MEAN,
        std=DIGITS_STD if grey else IMAGENET_STD,
    )


def train_and_export(config: TrainConfig) -> str:
    """Train on the embedded digits, export, check parity, save to the store; return the tag."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    spec = input_spec_for(config)
    split = load_digits_split(spec.height, spec.channels, config.holdout_fraction, config.seed)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)

    model = build_model(config.architecture, len(split.labels), spec.channels)
    if config.epochs > 0:
        model = train(model, split.train_x, split.train_y, mean, std, config)
    else:  # export the untrained model as is: benchmarks need speed, not accuracy
        model.eval()
    holdout_accuracy = accuracy(model, to_float(split.holdout_x, mean, std), split.holdout_y)
    train_seconds = time.perf_counter() - started

    backbone, head = split_head(model)
    wrapper = ServingWrapper(backbone, head, spec.mean, spec.std).eval()
    check_head_split(model, wrapper, torch.from_numpy(split.holdout_x[:8]))
    with torch.no_grad():
        _, features = wrapper(torch.from_numpy(split.holdout_x[:1]))

    with tempfile.TemporaryDirectory() as tmp:
        artifacts, parity = export_all(
            wrapper, split.holdout_x, Path(tmp), config.parity_tolerance
        )
        card = ModelCard(
            name=config.name,
            architecture=config.architecture,
            labels=split.labels,
            input=spec,
            graph=GraphSpec(feature_dim=int(features.shape[1])),
            parity=Parity(**vars(parity)),
            accuracy={"holdout": holdout_accuracy},
            training={**config.to_record(), "train_seconds": round(train_seconds, 1)},
            lineage={
                "dataset": "sklearn.datasets.load_digits",
                "data_sha256": split.data_hash,
                "train_samples": int(len(split.train_y)),
                "holdout_samples": int(len(split.holdout_y)),
                "versions": library_versions(),
            },
        )
        tag = save_to_store(
            card,
            artifacts,
            store_labels={"task": "image-classification", "dataset": "sklearn-digits",
                          "architecture": config.architecture},
        )

    if config.examples_dir is not None:
        write_examples(split.holdout_x, split.holdout_y, split.labels, Path(config.examples_dir),
                       config.examples_per_format)
    print(
        f"held-out accuracy: {holdout_accuracy:.4f} ({len(split.holdout_y)} images) | "
        f"parity max abs diff: onnxruntime {parity.onnxruntime_max_abs_diff:.2e}, "
        f"torchscript {parity.torchscript_max_abs_diff:.2e} | saved {tag} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return tag
