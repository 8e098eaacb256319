"""`python -m train_export.drift_report` (`make drift-report`): how well does a kernel MMD test on
the model's features tell shifted inputs from the training data?

The stored model's reference features (a sample of its training split) against streams of
features of: clean held-out digits, the same digits Gaussian-blurred at several sigmas, and two
out-of-distribution sets drawn with Pillow (geometric shapes, and letters), all light on dark like
the digits. For each stream and each of TorchDrift's kernels (Gaussian, Exponential, Rational
Quadratic): the MMD p-value on a window of 200 images, and the smallest window that detects the
shift (p < 0.01). One figure shows 2-D embeddings (PCA and Isomap, fitted on everything at once)
of the reference against each stream. Writes docs/drift.md and docs/drift.png.
"""

from __future__ import annotations

import argparse
import string
import time
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
import torch
import torchdrift
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from serving.contract import ONNX_FILE, ModelCard

from .classification import FEATURES_NAME
from .data import DIGITS_DATASET, split_from_card
from .graph import run_graph

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 200
REFERENCE = 500
WINDOWS = (10, 20, 50, 100, 200)
ALPHA = 0.01
BLUR_SIGMAS = (0.5, 1.0, 2.0)
KERNELS = {
    "Gaussian": torchdrift.detectors.mmd.GaussianKernel,
    "Exponential": torchdrift.detectors.mmd.ExpKernel,
    "Rational Quadratic": torchdrift.detectors.mmd.RationalQuadraticKernel,
}


@dataclass(frozen=True)
class Effort:
    """How hard the report tries: permutations per MMD test, and clean windows tested for false
    alarms."""

    permutations: int
    clean_windows: int


FULL = Effort(permutations=1000, clean_windows=100)
QUICK = Effort(permutations=200, clean_windows=5)  # a smoke run, not the report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train_export.drift_report",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-classifier:latest",
                        help="a stored model trained on the embedded digits")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "drift.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.permutations} permutations and {QUICK.clean_windows} clean "
                        "windows: a smoke run, not the report")
    args = parser.parse_args(argv)
    args.effort = QUICK if args.quick else FULL
    return args


def blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(p[..., 0]).filter(
        ImageFilter.GaussianBlur(sigma)))[..., None] for p in pixels])


def drawn(count: int, size: int, seed: int, kind: str) -> np.ndarray:
    """Light-on-dark drawings at the model's input size: shapes, or letters (Pillow's font)."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=size * 0.8)
    images = []
    for _ in range(count):
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        ink = int(rng.integers(180, 256))
        if kind == "letters":
            letter = str(rng.choice(list(string.ascii_uppercase)))
            draw.text((size / 2 + rng.integers(-2, 3), size / 2 + rng.integers(-2, 3)), letter,
                      fill=ink, font=font, anchor="mm")
        else:
            side = int(rng.integers(size // 3, size - 6))
            x0, y0 = (int(v) for v in rng.integers(2, size - side - 1, 2))
            box = [x0, y0, x0 + side, y0 + side]
            shape = rng.integers(3)
            if shape == 0:
                draw.ellipse(box, outline=ink, width=3)
            elif shape == 1:
                draw.rectangle(box, outline=ink, width=3)
            else:
                draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)],
                             outline=ink, width=3)
        images.append(np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)))[..., None])
    return np.stack(images)


def p_value(reference: np.ndarray, window: np.ndarray, kernel: str, permutations: int) -> float:
    detector = torchdrift.detectors.KernelMMDDriftDetector(
        return_p_value=True, n_perm=permutations, kernel=KERNELS[kernel]())
    detector.fit(torch.from_numpy(reference))
    return float(detector(torch.from_numpy(window)))


def smallest_window(reference: np.ndarray, stream: np.ndarray, kernel: str,
                    permutations: int) -> int | None:
    for size in WINDOWS:
        if p_value(reference, stream[:size], kernel, permutations) < ALPHA:
            return size
    return None


def embedding_figure(reference: np.ndarray, streams: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import Isomap

    everything = np.concatenate([reference, *streams.values()])
    methods = {"PCA": PCA(n_components=2, random_state=0),
               "Isomap": Isomap(n_components=2, n_neighbors=12)}
    figure, axes = plt.subplots(len(methods), len(streams), figsize=(3.2 * len(streams), 6.6),
                                squeeze=False)
    for row, (method, model) in enumerate(methods.items()):
        points = model.fit_transform(everything)
        ref_points, start = points[:len(reference)], len(reference)
        for column, (name, stream) in enumerate(streams.items()):
            ax = axes[row][column]
            mine = points[start:start + len(stream)]
            start += len(stream)
            ax.scatter(ref_points[:, 0], ref_points[:, 1], s=4, c="#bbbbbb", label="reference")
            ax.scatter(mine[:, 0], mine[:, 1], s=4, c="#d62728", label=name)
            ax.set_title(f"{method}: {name}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].legend(loc="best", fontsize=7, markerscale=3)
    figure.suptitle("Penultimate-layer features: training reference (grey) vs each stream (red)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    effort = args.effort
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    stored = bentoml.models.get(args.model)
    card = ModelCard.read(Path(stored.path))
    split = split_from_card(card) if card.lineage.dataset == DIGITS_DATASET else None
    if split is None:
        raise SystemExit(f"{stored.tag} was not trained on the embedded digits; the report's "
                         "streams are digits")
    session = ort.InferenceSession(str(Path(stored.path) / ONNX_FILE),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(args.seed)
    reference_pixels = split.train_x[rng.permutation(len(split.train_x))[:REFERENCE]]
    reference = run_graph(session, FEATURES_NAME, reference_pixels)
    clean = split.holdout_x[rng.permutation(len(split.holdout_x))[:WINDOW]]
    size = card.input.height
    streams = {"clean held-out": clean,
               **{f"blur sigma {s:g}": blur(clean, s) for s in BLUR_SIGMAS},
               "shapes (OOD)": drawn(WINDOW, size, args.seed, "shapes"),
               "letters (OOD)": drawn(WINDOW, size, args.seed + 1, "letters")}
    stream_features = {name: run_graph(session, FEATURES_NAME, pixels)
                       for name, pixels in streams.items()}

    p_values = {(name, kernel): p_value(reference, feats, kernel, effort.permutations)
                for name, feats in stream_features.items() for kernel in KERNELS}
    windows = {(name, kernel): smallest_window(reference, feats, kernel, effort.permutations)
               for name, feats in stream_features.items() for kernel in KERNELS}
    figure = args.out.with_suffix(".png")
    embedding_figure(reference, stream_features, figure)
    alarms = false_alarms(session, split.holdout_x, reference, args.seed, effort)
    write_report(args, stored, stream_features, p_values, windows,
                 (alarms, len(split.holdout_x)), figure, time.perf_counter() - started)


def false_alarms(session: ort.InferenceSession, holdout: np.ndarray, reference: np.ndarray,
                 seed: int, effort: Effort) -> int:
    """How often the service's own detector (serving.drift, numpy) flags clean data: random
    windows of held-out digits, each tested like a full window in production."""
    from serving.drift import kernel_mmd

    rng = np.random.default_rng(seed + 100)
    features = run_graph(session, FEATURES_NAME, holdout)
    flagged = 0
    for _ in range(effort.clean_windows):
        window = features[rng.permutation(len(features))[:WINDOW]]
        flagged += kernel_mmd(window, reference, effort.permutations, rng=rng)[1] < ALPHA
    return int(flagged)


def write_report(args: argparse.Namespace, stored: bentoml.Model,
                 streams: dict[str, np.ndarray], p_values: dict[tuple[str, str], float],
                 windows: dict[tuple[str, str], int | None], clean_alarms: tuple[int, int],
                 figure: Path, seconds: float) -> None:
    kernels = list(KERNELS)
    effort = args.effort
    alarms, pool = clean_alarms
    blurs = [name for name in streams if name.startswith("blur")]
    ood = [name for name in streams if "OOD" in name]

    def window_text(value: int | None) -> str:
        return f"{value}" if value is not None else f"> {WINDOWS[-1]}"

    def detect_cost(kernel: str, names: list[str]) -> int:
        # A miss counts as twice the largest window.
        return sum(windows[(n, kernel)] or 2 * WINDOWS[-1] for n in names)

    best = min(kernels, key=lambda k: (detect_cost(k, blurs), p_values[(blurs[0], k)]))
    tied = [k for k in kernels if detect_cost(k, blurs) == detect_cost(best, blurs)]
    why = ("it needs the fewest images" if len(tied) == 1 else
           f"the kernels need the same windows, and at sigma {BLUR_SIGMAS[0]:g} its p-value is the "
           "lowest (" + ", ".join(f"{k} {p_values[(blurs[0], k)]:.3f}" for k in kernels) + ")")
    blur_windows = [windows[(n, best)] or 2 * WINDOWS[-1] for n in blurs]
    ood_windows = [windows[(n, best)] or 2 * WINDOWS[-1] for n in ood]
    easier = ("easier to detect than any blur but the strongest, and no harder than it"
              if max(ood_windows) <= min(blur_windows) else
              "not uniformly easier to detect than blur")
    false_alarms = [k for k in kernels if p_values[("clean held-out", k)] < ALPHA]
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{p_values[(name, k)]:.3f}" for k in kernels) + " | "
        + " | ".join(window_text(windows[(name, k)]) for k in kernels) + " |"
        for name in streams)
    header = (f"| stream | p-value, {' | p-value, '.join(kernels)} | smallest window with "
              f"p < {ALPHA}, {' | smallest window, '.join(kernels)} |")
    clean_verdict = ("no kernel flags the clean held-out digits" if not false_alarms else
                     "flagged by " + ", ".join(false_alarms) + " (a false alarm)")
    clean_p_values = ", ".join(f"{p_values[('clean held-out', k)]:.2f}" for k in kernels)
    args.out.write_text(f"""# Data drift: what a kernel MMD test on the features can see

`python -m train_export.drift_report` (`make drift-report`), {time.strftime('%Y-%m-%d')},
{seconds:.0f} s. Model `{stored.tag}`; reference: the features (its `features` output,
{next(iter(streams.values())).shape[1]}-d) of {REFERENCE} images of its training split. Each
stream is {WINDOW} images: clean held-out digits (never trained on), the same digits
Gaussian-blurred at sigma {", ".join(f"{s:g}" for s in BLUR_SIGMAS)} px (at
28x28), and two out-of-distribution sets drawn with Pillow, light on dark like the digits:
outlined circles, squares and triangles, and capital letters. TorchDrift 0.1.0.post1
`KernelMMDDriftDetector`, {effort.permutations} permutations, lengthscale = median pairwise \
distance.

{header}
|---|{"---|" * (2 * len(kernels))}
{rows}

(Windows tried: {", ".join(map(str, WINDOWS))} images; a p-value of 0.000 means no permutation
of the pooled samples gave a larger statistic.)

![PCA and Isomap embeddings of the reference and each stream]({figure.name})

## What it says

- **Clean data:** {clean_verdict} (p-values {clean_p_values}).
  The service's own detector (serving/drift.py, the Gaussian kernel in numpy) flagged
  **{alarms} of {effort.clean_windows}** random windows of {WINDOW} clean held-out digits at \
p < {ALPHA}
  (a false-alarm rate of {alarms / effort.clean_windows:.0%}; the windows are drawn from the same
  {pool} held-out images, so they overlap).
- **Blur:** the {best} kernel separated the blurred digits best: {why}. Windows needed:
  {", ".join(window_text(windows[(n, best)]) for n in blurs)} images for sigma
  {", ".join(f"{s:g}" for s in BLUR_SIGMAS)}. The slightest blur is the hard case; by sigma 2
  every kernel sees it in a small window.
- **Out of distribution vs blur:** out-of-distribution images were {easier}: with the
  {best} kernel, {", ".join(f"{n} at {window_text(windows[(n, best)])}" for n in ood)} images,
  against {", ".join(window_text(windows[(n, best)]) for n in blurs)} for the blurs. They move
  the features far from every digit at once, where blur moves them gradually (the figure).
""")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
