"""The built-in models: logistic regression, an MLP, a small CNN for 8x8 digits.

They are the models of the built-in tasks (:mod:`fl_components.task.builtin`).

Every model has GroupNorm-free, BatchNorm-free layers, so Opacus's per-sample gradients
apply unchanged when record-level DP is on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fl_components.config import ModelConfig
from fl_components.data.types import DatasetInfo
from fl_components.errors import ConfigError
from fl_components.task.protocol import seeded


class SmallCNN(nn.Module):
    """Two 3x3 convolutions over a square image given as a flat vector (digits: 8x8)."""

    def __init__(self, *, n_features: int, n_classes: int) -> None:
        super().__init__()
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise ConfigError(
                f"model.kind 'cnn' needs square images; {n_features} features is not a square "
                "(use 'mlp' or 'logreg' for tabular data)"
            )
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(32 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of flat images (batch, side * side)."""
        images = x.reshape(-1, 1, self.side, self.side)
        logits: torch.Tensor = self.head(self.features(images).flatten(1))
        return logits


def build_model(config: ModelConfig, info: DatasetInfo, *, seed: int) -> nn.Module:
    """Build the configured model with weights initialised from ``seed``.

    Seeded as every task's model is (:func:`fl_components.task.protocol.seeded`).
    """
    model: nn.Module = seeded(lambda: make_model(config, info), seed)
    return model


def make_model(config: ModelConfig, info: DatasetInfo) -> nn.Module:
    """The configured built-in model, its weights drawn from torch's generator as it stands."""
    if config.kind == "logreg":
        return nn.Linear(info.n_features, info.n_classes)
    if config.kind == "mlp":
        layers: list[nn.Module] = []
        width = info.n_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, info.n_classes))
        return nn.Sequential(*layers)
    if config.kind == "cnn":
        return SmallCNN(n_features=info.n_features, n_classes=info.n_classes)
    raise ConfigError(f"model.kind must be logreg, mlp or cnn (got {config.kind!r})")
