"""Serving wrappers for detectors trained elsewhere: the letterboxed frame as uint8 pixels
(N, H, W, 3) in, the detection card's outputs out, whatever the model answers:

- `boxes` (N, A, 4): x1, y1, x2, y2 in the frame's pixels;
- `scores` (N, A, K): per-class scores in [0, 1], one column per label;
- `features` (N, D): a pooled tensor, for drift detection.

Two answer formats are understood (`answer_format` tells which one a model gives):

- DETR-style: `logits` (N, Q, K + 1), the last class "no object" (`pred_logits` in
  facebookresearch/detr), and `pred_boxes` (N, Q, 4), centre x, centre y, width, height as
  fractions of the input; in a dict or as attributes (a Hugging Face ModelOutput is both).
  The wrapper does what DETR's post-processing does before its threshold: softmax over the K + 1
  classes, the last one dropped, boxes to corners in the frame's pixels. Serving then keeps each
  query's best class (DetectionSpec multi_label=False) and runs no NMS (nms=False).
- torchvision-style: one dict per image with `boxes` (M, 4) in input pixels, `scores` (M,) and
  `labels` (M,), label 0 being the background. The model has already thresholded, suppressed
  and capped its detections; the wrapper pads them to a fixed K rows, each row's score in its
  label's column and 0 elsewhere (a padding row scores 0 everywhere, so no threshold keeps it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

OutputFormat = Literal["detr", "torchvision"]
OUTPUT_NAMES = ("boxes", "scores", "features")


def answer_field(answer: Any, *names: str) -> torch.Tensor | None:
    """The first of `names` that `answer` holds as a key or an attribute, if a tensor."""
    for name in names:
        value = answer.get(name) if isinstance(answer, Mapping) else getattr(answer, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def detr_outputs(answer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits (N, Q, K + 1), pred_boxes (N, Q, 4)) of a DETR-style answer, else None."""
    logits = answer_field(answer, "logits", "pred_logits")
    boxes = answer_field(answer, "pred_boxes")
    if logits is None or boxes is None or logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2]:
        return None
    return logits, boxes


def answer_format(answer: Any) -> OutputFormat | None:
    """Which of the two understood formats `answer` (a model's output on a batch) is in."""
    if detr_outputs(answer) is not None:
        return "detr"
    if isinstance(answer, Sequence) and answer and all(
            isinstance(image, Mapping) and {"boxes", "scores", "labels"} <= set(image)
            for image in answer):
        return "torchvision"
    return None


def takes_pixel_values(model: nn.Module) -> bool:
    """Whether the model's forward names its input `pixel_values` (Hugging Face's, and many
    training repositories'); else the input is passed positionally."""
    import inspect

    return "pixel_values" in inspect.signature(model.forward).parameters


class Pixels(nn.Module):
    """uint8 (N, H, W, C) -> float (N, C, H, W), (x / 255 - mean) / std as one multiply-add."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift


class CalledModel(nn.Module):
    """The model, called the way its forward takes a batch: `pixel_values=`, positionally, or
    (torchvision's detectors) as a list of images."""

    def __init__(self, model: nn.Module, keyword: bool, as_list: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.keyword = keyword
        self.as_list = as_list

    def forward(self, x: torch.Tensor) -> Any:
        if self.as_list:
            return self.model(list(x))
        return self.model(pixel_values=x) if self.keyword else self.model(x)


class DetrStyle(nn.Module):
    """A DETR-style model for serving: uint8 frames -> (boxes, scores, features).

    `features`: the mean over queries of the decoder's last hidden state where the answer has
    one (`last_hidden_state`, as Hugging Face's DETR answers), else the mean over queries of the
    logits (N, K + 1), a coarser summary, but one every DETR-style answer has.
    """

    frame: torch.Tensor

    def __init__(self, model: CalledModel, height: int, width: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.pixels = Pixels(mean, std)
        self.model = model
        # as DETR's post-processing scales its boxes: by (width, height, width, height)
        self.register_buffer("frame", torch.tensor([width, height, width, height],
                                                   dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        answer = self.model(self.pixels(pixels))
        outputs = detr_outputs(answer)
        assert outputs is not None, "checked by answer_format before the wrapper was built"
        logits, pred_boxes = outputs
        scores = torch.softmax(logits, dim=-1)[..., :-1]
        cx, cy, w, h = pred_boxes.unbind(-1)
        boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        hidden = answer_field(answer, "last_hidden_state")
        pooled = hidden if hidden is not None and hidden.dim() == 3 else logits
        return boxes * self.frame, scores, pooled.mean(dim=1)


class TorchvisionStyle(nn.Module):
    """A torchvision-style model for serving: uint8 frames -> (boxes (N, K, 4), scores
    (N, K, classes), features), its own detections padded to `detections` rows.

    `features`: `backbone`'s output where the model has one (torchvision's detectors do), its
    last (coarsest) feature map averaged over space; else each class's best score (N, classes).
    The export traces one image (torchvision's detectors loop over the images of a batch in
    Python): the graph takes a batch of 1.
    """

    class_ids: torch.Tensor

    def __init__(self, model: CalledModel, mean: Sequence[float], std: Sequence[float],
                 classes: int, detections: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.pixels = Pixels(mean, std)
        self.model = model
        self.detections = detections
        # label 0 is the background: label l scores in column l - 1
        self.register_buffer("class_ids", torch.arange(1, classes + 1))
        self._maps: list[torch.Tensor] = []
        if backbone is not None:
            backbone.register_forward_hook(self._keep_last_map)

    def _keep_last_map(self, module: nn.Module, inputs: Any, output: Any) -> None:
        maps = list(output.values()) if isinstance(output, Mapping) else [output]
        self._maps.append(maps[-1])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._maps.clear()
        answer = self.model(self.pixels(pixels))
        boxes, scores = [], []
        for image in answer:
            found_boxes = image["boxes"].to(torch.float32)
            one_hot = (image["labels"][:, None] == self.class_ids[None, :]).to(torch.float32)
            per_class = one_hot * image["scores"][:, None].to(torch.float32)
            # Padded by concatenating K blank rows and keeping the first K: a fixed shape
            # whatever M is, and the model's own order (torchvision's: by score) kept.
            boxes.append(torch.cat([found_boxes, found_boxes.new_zeros((self.detections, 4))])
                         [:self.detections])
            scores.append(torch.cat([per_class, per_class.new_zeros(
                (self.detections, len(self.class_ids)))])[:self.detections])
        stacked_scores = torch.stack(scores)
        if self._maps:
            features = F.adaptive_avg_pool2d(self._maps[-1], 1).flatten(1)
        else:
            features = stacked_scores.amax(dim=1)
        return torch.stack(boxes), stacked_scores, features


def detections_per_image(model: nn.Module) -> int | None:
    """The cap torchvision's detectors put on their detections per image, where there is one
    (`roi_heads.detections_per_img` for Faster/Mask R-CNN, `detections_per_img` for SSD,
    RetinaNet, FCOS)."""
    for owner in (getattr(model, "roi_heads", None), model):
        value = getattr(owner, "detections_per_img", None)
        if isinstance(value, int):
            return value
    return None
