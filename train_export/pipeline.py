"""train -> export -> check -> store, for the embedded digits or an ImageFolder (`--data`); the
export and store go through the one path every import takes (store.export_and_store)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from serving.contract import GraphSpec, InputSpec, Lineage, ModelCard, Parity

from .classification import FEATURES_NAME, export_classifier, serving_wrapper
from .config import DEFAULT_ARCHITECTURE, TrainConfig
from .data import (
    DIGITS_DATASET,
    FOLDER_DATASET,
    Split,
    channel_stats,
    load_digits_split,
    load_image_folder,
)
from .examples import write_examples
from .models import build_model
from .reference import ReferenceSample
from .store import library_versions
from .train import accuracy, class_accuracy, to_float, train

logger = logging.getLogger(__name__)

# The digits are light ink on a dark background, about 0.12 bright on average.
DIGITS_MEAN, DIGITS_STD = (0.13,), (0.28,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_spec_for(config: TrainConfig) -> InputSpec:
    """For the digits, their known statistics; for a folder, placeholders until it is measured."""
    grey = (config.color_mode or ("L" if config.architecture == DEFAULT_ARCHITECTURE else "RGB")
            ) == "L"
    channels: Literal[1, 3] = 1 if grey else 3
    polarity: Literal["natural", "light_on_dark"]
    if config.data_dir is not None:
        mean, std, polarity = (0.5,) * channels, (0.25,) * channels, "natural"
    else:
        mean, std = (DIGITS_MEAN, DIGITS_STD) if grey else (IMAGENET_MEAN, IMAGENET_STD)
        polarity = "light_on_dark"
    return InputSpec(
        height=config.input_size,
        width=config.input_size,
        channels=channels,
        color_mode="L" if grey else "RGB",
        resize="bilinear",
        polarity=polarity,
        mean=mean,
        std=std,
    )


def load_data(config: TrainConfig, spec: InputSpec) -> tuple[Split, InputSpec, Lineage]:
    """The split to train on, the input spec measured on it, and its lineage."""
    if config.data_dir is None:
        split = load_digits_split(spec.height, spec.channels, config.holdout_fraction,
                                  config.seed)
        return split, spec, Lineage(dataset=DIGITS_DATASET, data_sha256=split.data_hash)
    folder = load_image_folder(Path(config.data_dir), spec, config.holdout_fraction, config.seed)
    if folder.skipped:
        logger.warning("skipped %d files that are not images: %s", len(folder.skipped),
                       ", ".join(folder.skipped[:10]))
    mean, std = channel_stats(folder.split.train_x)
    spec = spec.model_copy(update={"mean": mean, "std": std})
    return folder.split, spec, Lineage(dataset=FOLDER_DATASET,
                                       data_dir=str(Path(config.data_dir).resolve()),
                                       data_sha256=folder.split.data_hash,
                                       skipped_files=folder.skipped)


def train_and_export(config: TrainConfig) -> str:
    """Train, export, check parity, save to the store; return the tag."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    split, spec, data_lineage = load_data(config, input_spec_for(config))
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)

    model = build_model(config.architecture, len(split.labels), spec.channels)
    if config.epochs > 0:
        model = train(model, split.train_x, split.train_y, mean, std, config)
    else:  # export the untrained model as is: benchmarks need speed, not accuracy
        model.eval()
    holdout_x = to_float(split.holdout_x, mean, std)
    holdout_accuracy = accuracy(model, holdout_x, split.holdout_y)
    per_class = class_accuracy(model, holdout_x, split.holdout_y, split.labels)
    train_seconds = time.perf_counter() - started

    wrapper = serving_wrapper(model, spec, split.holdout_x[:8])
    card = ModelCard(
        name=config.name,
        architecture=config.architecture,
        labels=split.labels,
        input=spec,
        graph=GraphSpec(feature_dim=wrapper.feature_dim),
        accuracy={"holdout": holdout_accuracy},
        class_accuracy=per_class,
        training=config.to_record(train_seconds),
        lineage=data_lineage.model_copy(update={
            "train_samples": int(len(split.train_y)),
            "holdout_samples": int(len(split.holdout_y)),
            "versions": library_versions(),
        }),
    )
    stored = export_classifier(
        wrapper, split.holdout_x, card, config.parity_tolerance,
        store_labels={"task": "image-classification", "architecture": config.architecture,
                      "dataset": "image-folder" if config.data_dir else "sklearn-digits"},
        reference=ReferenceSample(split.train_x, config.seed, FEATURES_NAME),
    )
    parity = stored.card.parity
    assert isinstance(parity, Parity)  # export_and_store measured it, with ProbabilityParity

    if config.examples_dir is not None and config.data_dir is None:
        write_examples(split.holdout_x, split.holdout_y, split.labels, Path(config.examples_dir),
                       config.examples_per_format)
    print(
        f"held-out accuracy: {holdout_accuracy:.4f} ({len(split.holdout_y)} images) | "
        f"parity max abs diff: onnxruntime {parity.onnxruntime_max_abs_diff:.2e}, "
        f"torchscript {parity.torchscript_max_abs_diff:.2e} | saved {stored.tag} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return stored.tag
