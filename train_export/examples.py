"""Sample images from the held-out split, for users to try the service at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_examples(
    images: np.ndarray, targets: np.ndarray, labels: list[str], directory: Path, per_format: int
) -> list[Path]:
    """Write `per_format` PNG and JPEG images, alternating, named `digit_<label>_<index>.<ext>`
    (e.g. digit_7_00.png): the true label is the second field of the name."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(2 * per_format, len(images))):
        pixels = images[i][..., 0] if images.shape[-1] == 1 else images[i]
        fmt = "png" if i % 2 == 0 else "jpg"
        path = directory / f"digit_{labels[int(targets[i])]}_{i:02d}.{fmt}"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=95)  # PNG ignores it
        written.append(path)
    return written
