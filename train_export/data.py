"""Training data: the embedded default (scikit-learn's 8x8 digits, upscaled; no download), or the
user's own images in an ImageFolder layout (`--data DIR`); and a stored model's split, rebuilt from
its card."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from serving.contract import InputSpec, ModelCard, Training

from .config import TrainConfig

# The card's lineage.dataset for each source of training data.
DIGITS_DATASET = "sklearn.datasets.load_digits"
FOLDER_DATASET = "image folder"


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
            np.asarray(Image.fromarray(img, mode="L")
                       .resize((size, size), Image.Resampling.BILINEAR))
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


@dataclass
class FolderData:
    """An ImageFolder dataset decoded the way serving decodes uploads."""

    split: Split
    skipped: list[str]  # files that are not images Pillow can decode, relative to the root


def image_folder_classes(root: Path) -> list[str]:
    """Class names: the sub-folders of `root` that hold files, sorted (torchvision's order)."""
    if not root.is_dir():
        raise SystemExit(f"--data {root}: not a folder. Give a folder with one sub-folder of "
                         "images per class (root/cat/1.jpg, root/dog/2.png, ...).")
    classes = sorted(d.name for d in root.iterdir()
                     if d.is_dir() and not d.name.startswith(".")
                     and any(f.is_file() for f in d.rglob("*")))
    if len(classes) < 2:
        raise SystemExit(f"--data {root}: found {len(classes)} class folder(s); a classifier "
                         "needs at least 2 (root/<class>/<image>)")
    return classes


def load_image_folder(root: Path, spec: InputSpec, holdout_fraction: float,
                      seed: int) -> FolderData:
    """root/<class>/**/<image> -> a stratified train/holdout split of uint8 (N, H, W, C).

    Each file goes through serving's own decode_image, so training sees exactly the pixels an
    upload of the same file would give the served model (resize, colour mode, EXIF rotation).
    """
    from serving.errors import RejectedInput
    from serving.preprocess import decode_image

    classes = image_folder_classes(root)
    images, targets, skipped = [], [], []
    digest = hashlib.sha256()
    for class_id, name in enumerate(classes):
        for path in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            try:
                images.append(decode_image(path, spec))
            except RejectedInput:
                skipped.append(path.relative_to(root).as_posix())
                continue
            targets.append(class_id)
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    counts = np.bincount(np.array(targets, dtype=np.int64), minlength=len(classes))
    too_few = [name for name, count in zip(classes, counts) if count < 2]
    if too_few:
        raise SystemExit(f"--data {root}: classes with fewer than 2 images: {', '.join(too_few)} "
                         "(each class needs images to train on and to hold out)")
    train_x, holdout_x, train_y, holdout_y = train_test_split(
        np.stack(images), np.array(targets, dtype=np.int64), test_size=holdout_fraction,
        random_state=seed, stratify=targets)
    split = Split(train_x, train_y, holdout_x, holdout_y, classes, digest.hexdigest())
    return FolderData(split, skipped)


def channel_stats(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images, on the 0-1 scale."""
    values = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(values.std(axis=0), 1e-3)  # a constant channel must not divide by zero
    return tuple(round(float(m), 4) for m in values.mean(axis=0)), tuple(
        round(float(s), 4) for s in std)


def split_from_card(card: ModelCard, folder: Path | None = None) -> Split | None:
    """A stored model's train/holdout split, rebuilt from its card: the same data, seed and
    holdout fraction (a model without a training record: the defaults).

    Args:
        card: the model's card.
        folder: an ImageFolder to split instead of the model's own data; its classes must be
            named like the model's labels.

    Returns:
        The split, or None for a model whose card names no data (an import) and no `folder`.
    """
    defaults = TrainConfig()
    training = card.training if isinstance(card.training, Training) else None
    seed = training.seed if training else defaults.seed
    fraction = training.holdout_fraction if training else defaults.holdout_fraction
    if folder is None and card.lineage.data_dir is not None:
        folder = Path(card.lineage.data_dir)
    if folder is not None:
        split = load_image_folder(folder, card.input, fraction, seed).split
        if split.labels != card.labels:
            raise SystemExit(f"{folder}: classes {split.labels} are not the model's labels "
                             f"{card.labels}; name the folders after the labels")
        return split
    if card.lineage.dataset == DIGITS_DATASET:
        return load_digits_split(card.input.height, card.input.channels, fraction, seed)
    return None
