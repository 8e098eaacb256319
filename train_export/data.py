"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, upscaled (no download)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclass
class Split:
    """uint8 images (N, H, W, C) with light ink on a dark background, and integer labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    labels: list[str]
    data_hash: str


def upscale(images_8x8: np.ndarray, size: int) -> np.ndarray:
    """Digits' 0-16 intensities -> 0-255, bilinear upscale to size x size."""
    pixels = np.clip(np.rint(images_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.stack(
        [
            np.asarray(Image.fromarray(img, mode="L").resize((size, size), Image.Resampling.BILINEAR))
            for img in pixels
        ]
    )


def load_digits_split(size: int, channels: int, holdout_fraction: float, seed: int) -> Split:
    digits = load_digits()
    images = upscale(digits.images, size)[..., np.newaxis]
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    target = digits.target.astype(np.int64)
    train_x, holdout_x, train_y, holdout_y = train_test_split(
        images, target, test_size=holdout_fraction, random_state=seed, stratify=target
    )
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(digits.images).tobytes())
    digest.update(np.ascontiguousarray(digits.target).tobytes())
    return Split(
        train_x=train_x,
        train_y=train_y,
        holdout_x=holdout_x,
        holdout_y=holdout_y,
        labels=[str(name) for name in digits.target_names],
        data_hash=digest.hexdigest(),
    )
