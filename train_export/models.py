"""Architectures: the default small CNN, or any torchvision.models classifier (weights=None)."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from .config import DEFAULT_ARCHITECTURE


class SmallCNN(nn.Module):
    """Three conv stages and global average pooling: ~100k parameters, 128-d features."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.body = nn.Sequential(
            stage(in_channels, 32), stage(32, 32), nn.MaxPool2d(2),
            stage(32, 64), nn.MaxPool2d(2),
            stage(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.dropout(self.body(x)))
        return logits


def build_model(architecture: str, num_classes: int, in_channels: int) -> nn.Module:
    if architecture == DEFAULT_ARCHITECTURE:
        return SmallCNN(num_classes, in_channels)
    known = torchvision.models.list_models(module=torchvision.models)
    if architecture not in known:
        raise SystemExit(
            f"unknown architecture {architecture!r}: use {DEFAULT_ARCHITECTURE!r} or one of "
            f"torchvision's classification models, e.g. resnet18, mobilenet_v3_small "
            f"(all: {', '.join(known)})"
        )
    if in_channels != 3:
        raise SystemExit(f"{architecture} takes RGB input: use 3 channels")
    model: nn.Module = torchvision.models.get_model(architecture, weights=None,
                                                    num_classes=num_classes)
    return model


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Split a classifier into (backbone -> penultimate features, final Linear head).

    Works for every model whose output is its last nn.Linear (the small CNN and torchvision's
    classifiers); the caller checks that head(backbone(x)) == model(x).
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to use as its classification head")
    name, head = linears[-1]
    backbone = copy.deepcopy(model)
    backbone.set_submodule(name, nn.Identity())
    return backbone, copy.deepcopy(head)
