"""A sequence task: factory sensor windows, a 1-D CNN over (channels, time).

A site's folder holds ``windows.npz`` with ``x`` (windows, 3 channels, 64 samples: vibration,
temperature, current) and ``y`` (0 normal, 1 bearing wear, 2 overheating), and
``split.json`` naming how many of the last windows are held out (the most recent ones:
a line's data is a time series, so the test split is the future, never a shuffle).
Channels are standardised per window at load time. GroupNorm, so DP-SGD applies.

Copy this module and name it as ``task: your_package.sensors:task``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_components.task import SiteContext, TaskData

CHANNELS, LENGTH, CLASSES = 3, 64, 3


class SensorTask:
    """The task: a 1-D CNN, each site's windows, a class-weighted loss, accuracy and recall."""

    def build_model(self, seed: int) -> nn.Module:
        """Two strided 1-D convolutions with GroupNorm, global pooling, a linear head."""
        return nn.Sequential(
            nn.Conv1d(CHANNELS, 16, kernel_size=5, stride=2, padding=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv1d(16, 32, kernel_size=5, stride=2, padding=2),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(32, CLASSES),
        )

    def load_data(self, site: SiteContext) -> TaskData:
        """The site's windows, the last ``held_out`` (the most recent) as its test split."""
        with np.load(site.folder / "windows.npz") as arrays:
            x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
        held_out = int(json.loads((site.folder / "split.json").read_text())["held_out"])
        mean = x.mean(axis=2, keepdims=True)
        std = x.std(axis=2, keepdims=True) + 1e-6
        x = (x - mean) / std
        cut = len(y) - held_out
        return TaskData(
            train=TensorDataset(torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut])),
            test=TensorDataset(torch.from_numpy(x[cut:]), torch.from_numpy(y[cut:])),
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy weighting the rare faults up (mean over the batch)."""
        weight = torch.tensor([1.0, 2.0, 2.0], device=outputs.device)
        return nn.functional.cross_entropy(outputs, targets, weight=weight)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Accuracy, and the share of faulty windows flagged as some fault (fault recall)."""
        predicted = outputs.argmax(dim=1)
        faulty = targets > 0
        recall = float(((predicted > 0) & faulty).sum() / faulty.sum().clamp(min=1))
        return {"accuracy": float((predicted == targets).float().mean()), "fault_recall": recall}

    def input_example(self) -> npt.NDArray[np.float32]:
        """Two flat windows: the logged model's signature."""
        return np.zeros((2, CHANNELS, LENGTH), dtype=np.float32)


task = SensorTask()


def make_site(folder: Path, *, seed: int, windows: int = 120, held_out: int = 30) -> None:
    """Write a simulated line: faults at a rate that differs by seed, noise, drift."""
    rng = np.random.default_rng(seed)
    fault_rate = rng.uniform(0.2, 0.5)
    y = np.where(rng.random(windows) < fault_rate, rng.integers(1, CLASSES, windows), 0)
    t = np.linspace(0, 1, LENGTH, dtype=np.float32)
    x = rng.normal(0, 0.3, size=(windows, CHANNELS, LENGTH)).astype(np.float32)
    x[:, 0] += np.sin(2 * np.pi * 8 * t)  # vibration at the shaft's frequency
    x[:, 1] += 20 + rng.normal(0, 0.5, size=(windows, 1))  # temperature
    x[:, 2] += 5 + 0.2 * np.sin(2 * np.pi * t)  # current
    wear, hot = y == 1, y == 2
    x[wear, 0] += 0.8 * np.sin(2 * np.pi * 23 * t)  # a bearing's harmonic
    x[hot, 1] += 4 * t  # temperature climbing through the window
    x[hot, 2] += 0.5 * t
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "windows.npz", x=x, y=y.astype(np.int64))
    (folder / "split.json").write_text(json.dumps({"held_out": held_out}))
