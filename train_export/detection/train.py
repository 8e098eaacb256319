"""Train the default detector on composed digit scenes: deterministic for a seed, with a progress
bar, in a few minutes on 2 CPU cores.

Entry point: `train_detector(DetectorConfig()) -> TrainedDetector`.

Training images go through serving's own letterbox (serving/boxes.py), so the model learns from
exactly the pixels the service will give it. Targets and losses (FCOS's centre sampling with
GFL's quality focal loss):
- positives: the stride-4 cells inside a digit's box within `centre_radius` strides of its
  centre (and always the cell holding the centre); a cell in two regions goes to the smaller
  digit;
- class scores: quality focal loss, target = IoU of the cell's predicted box at its digit's
  class, 0 everywhere else;
- boxes: GIoU loss at the positives, each digit's cells weighted to sum to 1, so that a small
  digit counts as much as a large one.
The whole training set is composed up front (in `workers` processes) and held in memory as
letterboxed uint8 frames: about 50 kB per scene at 128 x 128.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from serving.boxes import to_model_pixels

from .model import (
    DetectorInput,
    DetectorServingWrapper,
    DigitDetector,
    decode_boxes,
    location_centres,
    to_frame,
)
from .scenes import (
    LABELS,
    TRAIN_STREAM,
    Scene,
    SceneRules,
    compose_scenes,
    heldout_scenes,
    split_sources,
)


@dataclass
class DetectorConfig:
    # The frame the graph takes, square. At 128 the smallest digits (12% of the shorter side
    # of a 2:1 canvas) are 8 px, about their 8x8 source. 160 costs 1.55x per step: in the same
    # time (657 steps against 1000) it reached 0.933 mAP@0.5 against 0.945 at 128.
    input_size: int = 128
    # RGB: backgrounds and inks are coloured, and uploads are colour images; the first conv's
    # cost for 3 channels instead of 1 is negligible. 1 (grey) runs too (not tuned).
    channels: int = 3
    # Mean and std of the letterboxed training scenes (measured once, seed 0, rounded): random
    # colours on both polarities average near mid-grey.
    mean: tuple[float, ...] = (0.49, 0.49, 0.49)
    std: tuple[float, ...] = (0.23, 0.25, 0.23)
    # Letterbox padding: YOLO's neutral grey, away from both black and white backgrounds.
    fill: tuple[int, ...] = (114, 114, 114)
    # Backbone widths at strides 2, 4, 8, 16, convs per stage at 4, 8, 16, and the width of
    # the stride-4 head: the stride-4 path is where accuracy comes from (head 48 -> 64: +0.03
    # mAP@0.5; stride-4 stage 32 -> 48: +0.005) and where the time goes.
    widths: tuple[int, int, int, int] = (16, 48, 64, 128)
    depths: tuple[int, int, int] = (2, 2, 2)
    head_width: int = 64
    # 1000 steps of 32: about 150 s on 2 idle cores. 8000 scenes x 4 epochs and 16000 x 2
    # tied (measured), so scenes are reused to save composing time (2 ms per scene and core,
    # 15 s in all on 2 workers).
    train_scenes: int = 8000
    epochs: int = 4
    batch_size: int = 32
    # AdamW with one-cycle (15% warm-up, then cosine decay): measured at 1000 steps, peak 5e-3
    # and 8e-3 tie (mAP@0.5 0.962 and 0.961); 3e-3 was 0.003 lower.
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    # GIoU loss weight against the quality focal loss (GFL uses 2). Measured: 5 lost 0.05
    # mAP@0.5 (classification starves), 1 gained 0.006 mAP@0.5 but lost 0.02 mAP@[.5:.95].
    box_loss_weight: float = 2.0
    # Positives: cells inside the box within this many strides of its centre (FCOS's centre
    # sampling): 2x2 or 3x3 cells. Measured mAP@0.5: radius 0.6 0.954, 1.0 0.962, 1.5 0.953
    # (2.5: 0.929 at lr 3e-3); one positive per digit (CenterNet's Gaussian heatmap with
    # focal loss) learned the classes more slowly: 0.013 below radius 1.5.
    centre_radius: float = 1.0
    # Share of the 1797 source digits held out, stratified: 360 digits, 36 per class.
    heldout_fraction: float = 0.2
    # >= 500 held-out scenes (about 2,200 digits, 220 per class).
    heldout_scenes: int = 500
    seed: int = 0
    # The training budget is 2 CPU cores; more threads only add contention there.
    threads: int = 2
    # bfloat16 autocast for the forward pass (weights, loss and optimizer stay float32): on
    # this project's 2-core EPYC machines (AVX512-BF16) training took 168 s instead of 272 s
    # for the same mAP (0.950 both). Where bfloat16 would be emulated it is likely slower (not
    # measured), so None uses it only where the CPU has it natively (AVX512-BF16 or AMX).
    # The exported graph is float32 either way.
    bfloat16: bool | None = None
    # Processes that compose scenes before training (forked; 1 composes in-process).
    workers: int = 2
    rules: SceneRules = field(default_factory=SceneRules)

    def to_record(self) -> dict:
        return asdict(self)


@dataclass
class TrainedDetector:
    wrapper: DetectorServingWrapper  # eval mode, uint8 NHWC -> (boxes, scores, features)
    input: DetectorInput
    labels: list[str]
    heldout: list[Scene]  # original-size uint8 canvases with ground-truth boxes (image pixels)
    train_seconds: float  # scene composition + training, wall clock
    compose_seconds: float  # of which composing, letterboxing and encoding the scenes
    config: DetectorConfig
    losses: list[float]  # mean training loss per epoch


@dataclass
class TrainingSet:
    pixels: np.ndarray  # uint8 (N, S, S, C), letterboxed
    labels: np.ndarray  # int8 (N, G*G): class of the digit a cell is positive for, -1 if none
    box_targets: np.ndarray  # float32 (N, G*G, 4) x1, y1, x2, y2 in frame pixels
    box_weights: np.ndarray  # float32 (N, G*G); each digit's cells' weights sum to 1


def input_spec(config: DetectorConfig) -> DetectorInput:
    return DetectorInput(size=config.input_size, channels=config.channels,
                         mean=tuple(config.mean)[:config.channels],
                         std=tuple(config.std)[:config.channels],
                         fill=tuple(config.fill))


def encode_targets(boxes: np.ndarray, class_ids: np.ndarray, size: int, stride: int,
                   config: DetectorConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's frame-pixel boxes -> per cell (row-major, as the graph flattens):
    (class id, -1 for background; box target; box weight, each digit's summing to 1).

    A digit's positive cells: centre inside the box and within centre_radius strides of the
    box centre, and always the cell holding the centre (a digit thinner than a stride may
    contain no cell centre at all)."""
    cells = size // stride
    owner = np.full((cells, cells), -1, dtype=np.int64)
    centres = (np.arange(cells, dtype=np.float32) + 0.5) * stride
    radius = config.centre_radius * stride
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Largest first: where regions overlap, the smaller digit owns the cell (FCOS's rule).
    for i in np.argsort(-areas, kind="stable"):
        x1, y1, x2, y2 = boxes[i]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        in_x = (centres >= max(x1, cx - radius)) & (centres <= min(x2, cx + radius))
        in_y = (centres >= max(y1, cy - radius)) & (centres <= min(y2, cy + radius))
        region = np.outer(in_y, in_x)
        region[min(int(cy / stride), cells - 1), min(int(cx / stride), cells - 1)] = True
        owner[region] = i
    owners = owner.reshape(-1)
    labels = np.full(cells * cells, -1, dtype=np.int8)
    targets = np.zeros((cells * cells, 4), dtype=np.float32)
    weights = np.zeros(cells * cells, dtype=np.float32)
    for i in np.unique(owners[owners >= 0]):
        mine = owners == i
        labels[mine] = class_ids[i]
        targets[mine] = boxes[i]
        weights[mine] = 1.0 / np.count_nonzero(mine)
    return labels, targets, weights


def _letterboxed_chunk(args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compose, letterbox and encode scenes start..start+count-1 (runs in a worker process)."""
    seed, start, count, source_ids, config = args
    spec = input_spec(config)
    pixels: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for scene in compose_scenes(count, seed, TRAIN_STREAM, source_ids, config.rules, start):
        frame, lb = to_frame(scene.image, spec)
        encoded = encode_targets(to_model_pixels(scene.boxes, lb), scene.class_ids, spec.size,
                                 DigitDetector.stride, config)
        pixels.append(frame)
        for part, store in zip(encoded, (labels, targets, weights)):
            store.append(part)
    return np.stack(pixels), np.stack(labels), np.stack(targets), np.stack(weights)


def build_training_set(config: DetectorConfig, source_ids: np.ndarray) -> TrainingSet:
    """Scenes in chunks over `workers` forked processes; each scene depends only on its index,
    so the result is the same for any number of workers."""
    chunk = 250
    jobs = [(config.seed, start, min(chunk, config.train_scenes - start), source_ids, config)
            for start in range(0, config.train_scenes, chunk)]
    if config.workers > 1 and sys.platform == "linux":
        # fork: the workers inherit the loaded digits and import nothing; they run numpy and
        # Pillow only, never torch, so torch's thread pools in the parent are no hazard.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(config.workers, mp_context=context) as pool:
            parts = list(pool.map(_letterboxed_chunk, jobs))
    else:
        parts = [_letterboxed_chunk(job) for job in jobs]
    return TrainingSet(*(np.concatenate([p[k] for p in parts]) for k in range(4)))


def quality_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL's quality focal loss (beta 2), summed: a soft target in [0, 1] per (cell, class)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (target - torch.sigmoid(logits)).abs().pow(2)).sum()


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalized IoU, per box pair (x1, y1, x2, y2)."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = area_p + area_t - inter
    hull = (torch.maximum(pred[:, 2:], target[:, 2:])
            - torch.minimum(pred[:, :2], target[:, :2])).prod(dim=1)
    iou = inter / union.clamp(min=1e-6)
    return 1.0 - iou + (hull - union) / hull.clamp(min=1e-6)


def detection_loss(logits: torch.Tensor, box_raw: torch.Tensor, labels: torch.Tensor,
                   box_targets: torch.Tensor, box_weights: torch.Tensor, centres: torch.Tensor,
                   config: DetectorConfig) -> torch.Tensor:
    """Quality focal loss on the class scores + weighted GIoU on the positive cells' boxes.

    The class target at a positive cell is the IoU of the box it predicts (detached), 0
    elsewhere (GFL): a score then means "this digit, this well boxed", so detections rank by
    box quality, which is what AP over IoU thresholds rewards, and no centre-ness branch is
    needed to demote the boxes of off-centre cells.
    """
    positive = labels >= 0  # (N, A)
    boxes = decode_boxes(box_raw, centres, DigitDetector.stride)  # (N, A, 4)
    target = torch.zeros(logits.shape[0], logits.shape[2] * logits.shape[3], logits.shape[1])
    if positive.any():
        with torch.no_grad():
            quality = box_iou(boxes[positive], box_targets[positive])
        target[positive, labels[positive].long()] = quality
    logits = logits.flatten(2).transpose(1, 2)  # (N, A, K), the graph's layout
    cls_loss = quality_focal_loss(logits, target) / positive.sum().clamp(min=1)
    # Per digit: each digit's box weights sum to 1, so small digits count as much as big ones.
    digits = box_weights.sum().clamp(min=1.0)
    box_loss = (giou_loss(boxes[positive], box_targets[positive])
                * box_weights[positive]).sum() / digits
    return cls_loss + config.box_loss_weight * box_loss


def box_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain IoU per box pair (the quality target)."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1)
    area_t = (target[:, 2:] - target[:, :2]).prod(dim=1)
    return inter / (area_p + area_t - inter).clamp(min=1e-6)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Linux: the flags in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def normalizer(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x * scale + shift = (x/255 - mean)/std, as the serving wrapper."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def train(model: DigitDetector, data: TrainingSet, config: DetectorConfig) -> list[float]:
    """Train `model` in place; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    spec = input_spec(config)
    scale, shift = normalizer(spec.mean, spec.std)
    cells = config.input_size // model.stride
    centres = location_centres(cells, cells, model.stride)
    pixels = torch.from_numpy(data.pixels)
    labels = torch.from_numpy(data.labels)
    box_targets = torch.from_numpy(data.box_targets)
    box_weights = torch.from_numpy(data.box_weights)
    steps_per_epoch = math.ceil(len(pixels) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch,
        pct_start=0.15)
    bfloat16 = cpu_has_bfloat16() if config.bfloat16 is None else config.bfloat16
    model.train()
    losses = []
    # One bar over all steps: an epoch of a few thousand scenes takes most of a minute.
    progress = tqdm(total=config.epochs * steps_per_epoch, desc="training detector",
                    unit="step")
    for epoch in range(config.epochs):
        order = torch.randperm(len(pixels), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = pixels[batch].permute(0, 3, 1, 2).to(torch.float32) * scale + shift
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                logits, box_raw, _ = model(x)
            loss = detection_loss(logits.float(), box_raw.float(), labels[batch],
                                  box_targets[batch], box_weights[batch], centres, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
            progress.update()
            if step % 20 == 0:
                progress.set_postfix(epoch=epoch + 1, loss=f"{total / (step + 1):.3f}")
        losses.append(total / steps_per_epoch)
    progress.close()
    model.eval()
    return losses


def build_detector(config: DetectorConfig) -> DigitDetector:
    return DigitDetector(len(LABELS), config.channels, widths=config.widths,
                         depths=config.depths, head_width=config.head_width)


def train_detector(config: DetectorConfig | None = None) -> TrainedDetector:
    """Compose scenes, train, wrap for serving; the held-out scenes come along for evaluation
    (`evaluate.evaluate_detector`) and for the export's parity check."""
    config = config or DetectorConfig()
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, config.threads))
    try:
        torch.manual_seed(config.seed)
        split = split_sources(config.seed, config.heldout_fraction)
        data = build_training_set(config, split.train_ids)
        compose_seconds = time.perf_counter() - started
        model = build_detector(config)
        losses = train(model, data, config) if config.epochs > 0 else []
        model.eval()
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - started
    heldout = heldout_scenes(config.heldout_scenes, config.seed, split, config.rules)
    spec = input_spec(config)
    wrapper = DetectorServingWrapper(model, spec.size, spec.mean, spec.std).eval()
    return TrainedDetector(
        wrapper=wrapper,
        input=spec,
        labels=list(LABELS),
        heldout=heldout,
        train_seconds=train_seconds,
        compose_seconds=compose_seconds,
        config=config,
        losses=losses,
    )
