"""Detection scenes: scikit-learn's 8x8 digits (no download) composed on canvases of varied size.

The rules (`SceneRules`): canvases 64 to 512 pixels a side with aspect ratios from 1:2 to 2:1;
1 to 8 digits, each a square cell 12-35% of the canvas's shorter side; plain, gradient or noisy
backgrounds; digits may touch and overlap, but no digit loses 30% or more of its ink to the
digits drawn after it.

How a digit is drawn: its 0-16 intensities become an alpha mask (0-1), upscaled with Pillow's
bilinear filter to the cell size, and composited in one ink colour over what is already there:
`canvas = canvas * (1 - alpha) + ink * alpha`. The weight a digit keeps in the final image is
therefore `alpha * prod(1 - alpha_later)` over the digits drawn after it: its *visible alpha*.

Ground-truth boxes come exactly from that composition: a digit's box is the tight box of its
visible ink, the pixels where its visible alpha is >= 0.5 (where the digit, not what is under
it, dominates the pixel). Boxes are x1, y1, x2, y2 floats in canvas pixels with pixel *edges* as
coordinates: ink in columns 3..7 gives x1 = 3, x2 = 8 (COCO's convention, and the one Pillow's
resize maps linearly, so letterboxing moves boxes exactly). Occlusion is the share of a digit's
own ink pixels (alpha >= 0.5 when drawn alone) whose visible alpha fell below 0.5.

Held-out scenes use source digits never seen in training: the 1797 source digits are split by a
seeded stratified split (`split_sources`) before anything is composed.
Every scene is a pure function of (seed, stream, index), so any subset can be rebuilt, in any
order or process, and gives the same pixels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

LABELS = [str(d) for d in range(10)]
BACKGROUNDS = ("plain", "gradient", "noisy")
# Seed streams: training and held-out scenes never share a random sequence, even for one seed.
TRAIN_STREAM, HELDOUT_STREAM = 0, 1
# ITU-R BT.601 luma weights: the brightness the eye (and a grey conversion) sees.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Side of the shared noise bank (noisy backgrounds are crops of it): twice the largest canvas.
NOISE_BANK = 1024


@dataclass(frozen=True)
class SceneRules:
    min_side: int = 64
    max_side: int = 512
    # Longer side / shorter side at most 2 (1:2 to 2:1).
    max_aspect: float = 2.0
    min_digits: int = 1
    max_digits: int = 8
    # A digit's cell side as a share of the canvas's shorter side.
    min_digit_fraction: float = 0.12
    max_digit_fraction: float = 0.35
    # A digit may lose strictly less than this share of its ink to later digits.
    max_occlusion: float = 0.30
    # Visible alpha at or above this is ink: the digit dominates the pixel.
    ink_threshold: float = 0.5
    # Min luma difference (0-1) between ink and background colours: legible in grey too.
    min_contrast: float = 0.3
    # Noisy backgrounds: Gaussian noise with a standard deviation drawn from this range (0-1).
    noise_std: tuple[float, float] = (0.03, 0.12)
    # Random positions tried for a digit before it is left out (crowded small canvases).
    placement_tries: int = 30


@dataclass
class Scene:
    """One composed canvas and what is in it, in drawing order."""

    image: np.ndarray  # uint8 (H, W, 3), RGB
    boxes: np.ndarray  # float32 (M, 4): x1, y1, x2, y2, tight box of visible ink, pixel edges
    class_ids: np.ndarray  # int64 (M,): the digit, 0-9
    source_ids: np.ndarray  # int64 (M,): index of the digit in load_digits()
    cell_sizes: np.ndarray  # int64 (M,): side of the digit's square cell in pixels
    occlusion: np.ndarray  # float32 (M,): share of the digit's ink hidden by later digits
    background: str  # one of BACKGROUNDS

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class SourceSplit:
    """Indices into load_digits(): training scenes use train_ids only, held-out heldout_ids."""

    train_ids: np.ndarray
    heldout_ids: np.ndarray


@functools.lru_cache(maxsize=1)
def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """(alpha masks float32 (1797, 8, 8) in 0-1, labels int64 (1797,)), loaded once."""
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_sources(seed: int = 0, heldout_fraction: float = 0.2) -> SourceSplit:
    """Seeded stratified split of the source digits: each class held out in equal share."""
    _, labels = source_digits()
    train_ids, heldout_ids = train_test_split(
        np.arange(len(labels)), test_size=heldout_fraction, random_state=seed, stratify=labels)
    return SourceSplit(np.sort(train_ids), np.sort(heldout_ids))


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def canvas_size(rng: np.random.Generator, rules: SceneRules) -> tuple[int, int]:
    """(width, height): the longer side uniform, the aspect log-uniform, either orientation."""
    longer = int(rng.integers(rules.min_side, rules.max_side + 1))
    aspect = math.exp(rng.uniform(0.0, math.log(rules.max_aspect)))
    # ceil keeps longer/shorter <= max_aspect after rounding; shorter <= longer as longer >= min.
    shorter = max(rules.min_side, math.ceil(longer / aspect))
    return (longer, shorter) if rng.random() < 0.5 else (shorter, longer)


def luma(colours: np.ndarray) -> np.ndarray:
    return colours @ LUMA


def colour_with_luma(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A uniform RGB colour (0-1) whose luma lies in [low, high] (rejection sampling)."""
    while True:
        colour = rng.random(3, dtype=np.float32)
        if low <= luma(colour) <= high:
            return colour


def to_rgb8(colour: np.ndarray) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in np.rint(colour * 255.0))
    return red, green, blue


def draw_background(rng: np.random.Generator, width: int, height: int,
                    rules: SceneRules) -> tuple[Image.Image, str, bool]:
    """(RGB canvas, kind, dark?). Dark backgrounds keep luma <= 0.45 and light ones >= 0.55,
    so that an ink colour `min_contrast` away from all of it always exists.

    Drawn with Pillow in 8 bits: a plain fill, a mask composite or an integer add run in C,
    several times faster than float arrays with a trailing colour axis (milliseconds per scene,
    which would cost more than training on the scene)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    dark = bool(rng.random() < 0.5)
    low, high = (0.0, 0.45) if dark else (0.55, 1.0)
    base = colour_with_luma(rng, low, high)
    canvas = Image.new("RGB", (width, height), to_rgb8(base))
    if kind == "gradient":
        other = Image.new("RGB", (width, height), to_rgb8(colour_with_luma(rng, low, high)))
        angle = rng.uniform(0.0, 2 * math.pi)
        along_x = np.arange(width, dtype=np.float32) * np.float32(math.cos(angle))
        along_y = np.arange(height, dtype=np.float32) * np.float32(math.sin(angle))
        along = along_y[:, np.newaxis] + along_x[np.newaxis, :]
        t = (along - along.min()) * np.float32(255.0 / max(float(np.ptp(along)), 1.0))
        canvas = Image.composite(other, canvas, Image.fromarray((t + 0.5).astype(np.uint8)))
    elif kind == "noisy":
        std = rng.uniform(*rules.noise_std) * 255.0
        noise = noise_crop(rng, width, height) * np.float32(std)
        pixels = np.asarray(canvas, dtype=np.float32) + noise
        canvas = Image.fromarray((np.clip(pixels, 0.0, 255.0) + 0.5).astype(np.uint8))
    return canvas, kind, dark


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Standard normal noise, drawn once per process from a fixed seed: a random crop of it
    costs a slice, where fresh noise for a 512x512 canvas costs milliseconds per scene."""
    return np.random.default_rng(20240).standard_normal((NOISE_BANK, NOISE_BANK, 3),
                                                          dtype=np.float32)


def noise_crop(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) crop of the noise bank at a random offset, randomly transposed
    or flipped so that crops of different scenes rarely share pixels in the same place."""
    bank = _noise_bank()
    if rng.random() < 0.5:
        bank = bank.transpose(1, 0, 2)
    x = int(rng.integers(NOISE_BANK - width + 1))
    y = int(rng.integers(NOISE_BANK - height + 1))
    return bank[y:y + height, x:x + width][::int(rng.choice((-1, 1)))]


def ink_colour(rng: np.random.Generator, background_dark: bool, rules: SceneRules) -> np.ndarray:
    """Light ink on dark backgrounds, dark ink on light ones, at least min_contrast apart."""
    if background_dark:
        return colour_with_luma(rng, 0.45 + rules.min_contrast, 1.0)
    return colour_with_luma(rng, 0.0, 0.55 - rules.min_contrast)


def digit_alpha(source: np.ndarray, size: int) -> np.ndarray:
    """8x8 alpha (0-1) -> size x size, Pillow bilinear (the same filter letterboxing uses)."""
    image = Image.fromarray(source).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


@dataclass
class _Placed:
    x: int
    y: int
    alpha: np.ndarray  # (s, s) as drawn
    visible: np.ndarray  # (s, s) alpha * prod(1 - alpha of later digits)
    ink: np.ndarray  # bool (s, s): alpha >= ink_threshold
    colour: np.ndarray
    class_id: int
    source_id: int


def _overlap(a: _Placed, x: int, y: int, size: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices of `a`'s cell and of a new cell at (x, y) that cover the same canvas pixels."""
    sa = a.alpha.shape[0]
    x0, x1 = max(a.x, x), min(a.x + sa, x + size)
    y0, y1 = max(a.y, y), min(a.y + sa, y + size)
    if x0 >= x1 or y0 >= y1:
        return None
    return (slice(y0 - a.y, y1 - a.y), slice(x0 - a.x, x1 - a.x),
            slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def _try_place(placed: list[_Placed], x: int, y: int, alpha: np.ndarray,
               rules: SceneRules) -> list[tuple[_Placed, tuple, np.ndarray]] | None:
    """The visible-alpha updates that drawing `alpha` at (x, y) causes, or None if an earlier
    digit would then lose max_occlusion or more of its ink."""
    updates = []
    for other in placed:
        region = _overlap(other, x, y, alpha.shape[0])
        if region is None:
            continue
        oy, ox, ny, nx = region
        visible = other.visible[oy, ox] * (1.0 - alpha[ny, nx])
        hidden = other.visible < rules.ink_threshold
        hidden[oy, ox] = visible < rules.ink_threshold
        ink = np.count_nonzero(other.ink)
        if np.count_nonzero(hidden & other.ink) >= rules.max_occlusion * ink:
            return None
        updates.append((other, (oy, ox), visible))
    return updates


def visible_box(p: _Placed, threshold: float) -> tuple[float, float, float, float]:
    rows = np.flatnonzero((p.visible >= threshold).any(axis=1))
    cols = np.flatnonzero((p.visible >= threshold).any(axis=0))
    return (float(p.x + cols[0]), float(p.y + rows[0]),
            float(p.x + cols[-1] + 1), float(p.y + rows[-1] + 1))


def compose_scene(rng: np.random.Generator, source_ids: np.ndarray,
                  rules: SceneRules = SceneRules()) -> Scene:
    """One scene drawn with `rng`, its digits taken from `source_ids` only."""
    alphas, labels = source_digits()
    width, height = canvas_size(rng, rules)
    canvas, kind, dark = draw_background(rng, width, height, rules)
    shorter = min(width, height)
    smallest = math.ceil(rules.min_digit_fraction * shorter)
    largest = math.floor(rules.max_digit_fraction * shorter)
    placed: list[_Placed] = []
    sizes: list[int] = []
    for _ in range(int(rng.integers(rules.min_digits, rules.max_digits + 1))):
        source_id = int(source_ids[rng.integers(len(source_ids))])
        size = int(np.clip(round(rng.uniform(rules.min_digit_fraction,
                                             rules.max_digit_fraction) * shorter),
                           smallest, largest))
        alpha = digit_alpha(alphas[source_id], size)
        if not (alpha >= rules.ink_threshold).any():
            continue  # no pixel dark enough to be ink (no source digit is that faint)
        for _ in range(rules.placement_tries):
            x = int(rng.integers(width - size + 1))
            y = int(rng.integers(height - size + 1))
            updates = _try_place(placed, x, y, alpha, rules)
            if updates is not None:
                break
        else:
            continue  # no room left for this digit: the scene has one digit fewer
        for other, (oy, ox), visible in updates:
            other.visible[oy, ox] = visible
        placed.append(_Placed(x, y, alpha, alpha.copy(), alpha >= rules.ink_threshold,
                              ink_colour(rng, dark, rules), int(labels[source_id]), source_id))
        sizes.append(size)
    if not placed:  # every digit fits an empty canvas (cell <= 35% of the shorter side)
        raise AssertionError("a scene without digits: the rules cannot be met")
    for p in placed:
        # Pillow blends colour * mask + canvas * (1 - mask) in 8 bits: the float composition
        # above to within one grey level.
        mask = Image.fromarray((p.alpha * 255.0 + 0.5).astype(np.uint8))
        canvas.paste(to_rgb8(p.colour), (p.x, p.y), mask)
    ink = [np.count_nonzero(p.ink) for p in placed]
    hidden = [np.count_nonzero(p.ink & (p.visible < rules.ink_threshold)) for p in placed]
    return Scene(
        image=np.array(canvas, dtype=np.uint8),
        boxes=np.array([visible_box(p, rules.ink_threshold) for p in placed], dtype=np.float32),
        class_ids=np.array([p.class_id for p in placed], dtype=np.int64),
        source_ids=np.array([p.source_id for p in placed], dtype=np.int64),
        cell_sizes=np.array(sizes, dtype=np.int64),
        occlusion=np.array([h / n for h, n in zip(hidden, ink)], dtype=np.float32),
        background=kind,
    )


def compose_scenes(count: int, seed: int, stream: int, source_ids: np.ndarray,
                   rules: SceneRules = SceneRules(), start: int = 0) -> list[Scene]:
    """Scenes start .. start+count-1 of a stream; each depends only on (seed, stream, index)."""
    return [compose_scene(scene_rng(seed, stream, i), source_ids, rules)
            for i in range(start, start + count)]


def training_scenes(count: int, seed: int = 0, split: SourceSplit | None = None,
                    rules: SceneRules = SceneRules()) -> list[Scene]:
    split = split or split_sources(seed)
    return compose_scenes(count, seed, TRAIN_STREAM, split.train_ids, rules)


def heldout_scenes(count: int, seed: int = 0, split: SourceSplit | None = None,
                   rules: SceneRules = SceneRules()) -> list[Scene]:
    """Scenes made only of source digits that training never sees."""
    split = split or split_sources(seed)
    return compose_scenes(count, seed, HELDOUT_STREAM, split.heldout_ids, rules)
