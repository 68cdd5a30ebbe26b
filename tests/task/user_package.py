"""A user's task package, written outside the repository by the tests that train it.

``clinic_fl`` is what a federation's user would install at every site: its task reads
sensor windows of shape (2, 8) from ``signals.npz`` in the site's own folder and trains a
small 1-D CNN on them. Nothing in it is fedpipe's except the two names it imports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TASK_SOURCE = '''
"""clinic_fl: a federation user's task (model, data, loss, metrics)."""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_components.task import SiteContext, TaskData

NORM = "group"  # "batch" makes a model Opacus refuses (the validate test sets it)


class Signals:
    """Three classes of two-channel windows of 8 samples each."""

    def build_model(self, seed: int) -> nn.Module:
        norm = nn.GroupNorm(2, 4) if NORM == "group" else nn.BatchNorm1d(4)
        return nn.Sequential(
            nn.Conv1d(2, 4, kernel_size=3, padding=1),
            norm,
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )

    def load_data(self, site: SiteContext) -> TaskData:
        with np.load(Path(site.folder) / "signals.npz") as arrays:
            x, y = arrays["x"], arrays["y"]
        cut = int(0.8 * len(y))
        train = TensorDataset(torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut]))
        test = TensorDataset(torch.from_numpy(x[cut:]), torch.from_numpy(y[cut:]))
        return TaskData(train=train, test=test)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.05)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        hits = (outputs.argmax(dim=1) == targets).float()
        return {"accuracy": float(hits.mean())}

    def input_example(self) -> np.ndarray:
        return np.zeros((2, 2, 8), dtype=np.float32)


task = Signals()
'''


def write_package(root: Path, *, norm: str = "group") -> Path:
    """Write ``clinic_fl`` under ``root`` (put ``root`` on sys.path / PYTHONPATH)."""
    package = root / "clinic_fl"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""A federation user\'s package."""\n')
    (package / "fl.py").write_text(TASK_SOURCE.replace('NORM = "group"', f'NORM = "{norm}"'))
    return root


def write_site(folder: Path, *, seed: int, rows: int = 80) -> None:
    """A site's windows: each class a different frequency, with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=rows)
    t = np.arange(8, dtype=np.float32)
    x = np.stack([np.stack([np.sin((c + 1) * t / 2), np.cos((c + 1) * t / 3)]) for c in y]).astype(
        np.float32
    )
    x += rng.normal(0, 0.3, size=x.shape).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "signals.npz", x=x, y=y.astype(np.int64))
