"""Training loop: deterministic for a seed, with a progress bar."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from .config import TrainConfig


def to_float(pixels: np.ndarray | torch.Tensor, mean: torch.Tensor,
             std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalized float NCHW: what the exported graph does in its first ops."""
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 degrees) and shift (+-2 px at 28 px) per image, on float NCHW."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (10 * torch.pi / 180)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (4.0 / x.shape[-1])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(2, 3), keepdim=True)  # pad with the (normalized) background value
    return nn.functional.grid_sample(x - background, grid, align_corners=False) + background


def train(
    model: nn.Module,
    train_x: np.ndarray,
    train_y: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    config: TrainConfig,
) -> nn.Module:
    generator = torch.Generator().manual_seed(config.seed)
    data = TensorDataset(to_float(train_x, mean, std), torch.as_tensor(train_y))
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * len(loader)
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    progress = tqdm(range(config.epochs), desc="training", unit="epoch")
    for _ in progress:
        total, count = 0.0, 0
        for x, y in loader:
            if config.augment:
                x = augment(x, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
        progress.set_postfix(loss=f"{total / count:.4f}")
    return model.eval()


@torch.no_grad()
def class_accuracy(model: nn.Module, x: torch.Tensor, y: np.ndarray,
                   labels: list[str]) -> dict[str, float]:
    """label -> share of that class's images classified correctly (classes with images only)."""
    model.eval()
    predictions = model(x).argmax(dim=1).numpy()
    return {label: round(float((predictions[y == i] == i).mean()), 4)
            for i, label in enumerate(labels) if (y == i).any()}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    model.eval()
    predictions = model(x).argmax(dim=1).numpy()
    return float((predictions == y).mean())
