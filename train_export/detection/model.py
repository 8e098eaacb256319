"""The detector: a small CNN with one anchor-free output level at stride 4 (FCOS/GFL-style).

Design:
- backbone: stride 2, 4, 8, 16 stages of 3x3 conv + BatchNorm + ReLU;
- neck: the stride-16 and stride-8 maps are upsampled and added into the stride-4 map (FPN's
  top-down path, one output): digits' cells are 8 to 45 pixels in the 128 frame, so the output
  needs stride 4 for the small ones and the stride-16 context for the large ones (a head at
  stride 8 predicting 2x2 sub-cells, tried, trains 1.5x faster but lost 0.05 mAP@0.5);
- head: two 3x3 convs at stride 4, then per location K class logits (sigmoid scores trained to
  equal the IoU of the location's box with its digit: GFL's quality focal loss, see train.py)
  and a box: the centre as an offset from the location, and log width and height, in strides
  (a centre offset, unlike FCOS's left/top/right/bottom distances, also fits a digit thinner
  than a stride, such as a small "1", whose box may miss every location's centre).
- widths: measured on 2 cores, the width of the stride-4 path is what buys accuracy (head 48
  -> 64: +0.03 mAP@0.5; stride-4 backbone 32 -> 48: +0.005), and it is where the time goes.

The serving wrapper decodes every location into a box in input pixels and sigmoid scores;
there is no NMS, top-k or threshold in the graph (they run in numpy, serving/boxes.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from serving.boxes import Letterbox, letterbox

# Heatmap logits start at the focal-loss prior: sigmoid(bias) = 0.01, so the many background
# locations do not swamp the first steps with loss (RetinaNet's initialisation).
PRIOR_PROBABILITY = 0.01
# log(width / stride) clamp: exp(6) * 4 = 1600 px, far beyond any frame; keeps exp finite.
MAX_LOG_SIZE = 6.0


@dataclass(frozen=True)
class DetectorInput:
    """What the graph's `pixels` input expects: uint8 (N, size, size, channels), letterboxed
    with `fill`. Recorded for reference: the graph applies mean and std itself."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fill: tuple[int, ...]

    @property
    def color_mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"


def to_frame(image: np.ndarray | Image.Image, spec: DetectorInput) -> tuple[np.ndarray, Letterbox]:
    """An RGB canvas -> the graph's uint8 (size, size, channels) input and its geometry, by
    serving's letterbox: training, evaluation and the service see the same pixels."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    fill = spec.fill if spec.channels == 3 else spec.fill[0]
    return letterbox(image, spec.size, spec.size, fill)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DigitDetector(nn.Module):
    """float NCHW (normalized) -> (class logits (N, K, H/4, W/4), box raw (N, 4, H/4, W/4),
    features (N, D)). `stride` = 4."""

    stride = 4

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int, int] = (16, 48, 64, 128),
                 depths: tuple[int, int, int] = (2, 2, 2), head_width: int = 64,
                 initial_size: float = 16.0) -> None:
        super().__init__()
        w2, w4, w8, w16 = widths

        def stage(cin: int, cout: int, depth: int) -> nn.Sequential:
            """A stride-2 conv, then depth - 1 convs at that resolution."""
            return nn.Sequential(conv_bn_relu(cin, cout, 2),
                                 *(conv_bn_relu(cout, cout) for _ in range(depth - 1)))

        self.stem = conv_bn_relu(in_channels, w2, 2)
        self.stage4 = stage(w2, w4, depths[0])
        self.stage8 = stage(w4, w8, depths[1])
        self.stage16 = stage(w8, w16, depths[2])
        self.lateral16 = nn.Conv2d(w16, w8, 1)
        self.merge8 = conv_bn_relu(w8, w8)
        self.lateral8 = nn.Conv2d(w8, head_width, 1)
        self.lateral4 = nn.Conv2d(w4, head_width, 1)
        self.merge4 = conv_bn_relu(head_width, head_width)
        self.head = conv_bn_relu(head_width, head_width)
        self.classes = nn.Conv2d(head_width, num_classes, 1)
        self.box = nn.Conv2d(head_width, 4, 1)
        self.feature_dim = w16
        class_bias, box_bias = self.classes.bias, self.box.bias
        assert class_bias is not None and box_bias is not None  # nn.Conv2d(bias=True)
        nn.init.constant_(class_bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        nn.init.normal_(self.box.weight, std=0.01)
        # Boxes start centred on their location, initial_size pixels a side.
        nn.init.constant_(box_bias, 0.0)
        with torch.no_grad():
            box_bias[2:] = math.log(initial_size / self.stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c4 = self.stage4(self.stem(x))
        c8 = self.stage8(c4)
        c16 = self.stage16(c8)
        p8 = self.merge8(c8 + F.interpolate(self.lateral16(c16), scale_factor=2.0, mode="nearest"))
        p4 = self.merge4(self.lateral4(c4)
                         + F.interpolate(self.lateral8(p8), scale_factor=2.0, mode="nearest"))
        h = self.head(p4)
        features = torch.flatten(F.adaptive_avg_pool2d(c16, 1), 1)
        return self.classes(h), self.box(h), features


def location_centres(height: int, width: int, stride: int) -> torch.Tensor:
    """(H*W, 2) x, y input-pixel centres of the output cells, row-major like flatten."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    return (torch.stack([xs, ys], dim=-1).reshape(-1, 2) + 0.5) * stride


def decode_boxes(box_raw: torch.Tensor, centres: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, 4, H, W) raw box outputs -> (N, H*W, 4) x1, y1, x2, y2 in input pixels."""
    raw = box_raw.flatten(2).transpose(1, 2)
    centre = centres + raw[..., :2] * stride
    half = torch.exp(raw[..., 2:].clamp(max=MAX_LOG_SIZE)) * (stride / 2)
    return torch.cat([centre - half, centre + half], dim=-1)


class DetectorServingWrapper(nn.Module):
    """uint8 NHWC pixels, letterboxed to size x size -> (boxes (N, A, 4) in input pixels,
    scores (N, A, K) sigmoid, features (N, D)), with (x/255 - mean)/std baked in."""

    scale: torch.Tensor
    shift: torch.Tensor
    centres: torch.Tensor

    def __init__(self, detector: DigitDetector, size: int, mean, std) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.size = size
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add, as in train_export/export.py.
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)
        cells = size // detector.stride
        self.register_buffer("centres", location_centres(cells, cells, detector.stride))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        logits, box_raw, features = self.detector(x)
        boxes = decode_boxes(box_raw, self.centres, self.detector.stride)
        scores = torch.sigmoid(logits).flatten(2).transpose(1, 2)
        return boxes, scores, features
