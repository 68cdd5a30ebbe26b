"""An image task: PNG files in each site's folder, a small ResNet with GroupNorm.

A site's folder holds ``train/<class>/*.png`` and ``test/<class>/*.png`` (grayscale, any
size: resized to ``SIZE``). Training batches are augmented (random flips and shifts);
evaluation is on the site's own ``test`` images. GroupNorm, never BatchNorm, so the same
model trains under record-level DP (Opacus computes per-sample gradients through it).

Copy this module, change :class:`ImageTask`'s constants and :func:`build_model`, and name
it in the config as ``task: your_package.images:task``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from fl_components.task import SiteContext, TaskData

SIZE = 16
CLASSES = ("circle", "square", "cross")


class ImageFolder(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``root/<class>/*.png`` as (1, SIZE, SIZE) float tensors in [0, 1] and class indices."""

    def __init__(self, root: Path, *, augment: bool) -> None:
        self.files = [
            (path, index)
            for index, name in enumerate(CLASSES)
            for path in sorted((root / name).glob("*.png"))
        ]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.files[i]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L").resize((SIZE, SIZE)), dtype=np.float32)
        x = torch.from_numpy(pixels / 255.0).unsqueeze(0)
        if self.augment:
            x = _augment(x)
        return x, torch.tensor(label, dtype=torch.int64)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """A random horizontal flip and a shift of up to 2 pixels (the loader's worker draws)."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


class Block(nn.Module):
    """A residual block: two 3x3 convolutions with GroupNorm, and the skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(4, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """X + F(x), then ReLU."""
        out: torch.Tensor = torch.relu(x + self.body(x))
        return out


def build_model(width: int = 16, blocks: int = 2) -> nn.Module:
    """A small ResNet: a stem, ``blocks`` residual blocks, a downsampling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.GroupNorm(4, width),
        nn.ReLU(),
        *[Block(width) for _ in range(blocks)],
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(4, 2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, len(CLASSES)),
    )


class ImageTask:
    """The task: the model, each site's image folders, the defaults for loss and metrics."""

    def build_model(self, seed: int) -> nn.Module:
        """The small ResNet (fedpipe seeds torch's generator with ``seed``)."""
        return build_model()

    def load_data(self, site: SiteContext) -> TaskData:
        """``train/`` augmented, ``test/`` as it is, from the site's own folder."""
        return TaskData(
            train=ImageFolder(site.folder / "train", augment=True),
            test=ImageFolder(site.folder / "test", augment=False),
        )

    def input_example(self) -> npt.NDArray[np.float32]:
        """Two blank images: the logged model's signature."""
        return np.zeros((2, 1, SIZE, SIZE), dtype=np.float32)


task = ImageTask()


def make_site(folder: Path, *, seed: int, train: int = 60, test: int = 15) -> None:
    """Write a simulated site: noisy shapes as PNG files, a class mix that differs by seed."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(len(CLASSES), 2.0))
    for split, count in (("train", train), ("test", test)):
        for n in range(count):
            label = int(rng.choice(len(CLASSES), p=weights))
            target = folder / split / CLASSES[label]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_draw(label, rng)).save(target / f"{n:05d}.png")


def _draw(label: int, rng: np.random.Generator, size: int = 24) -> npt.NDArray[np.uint8]:
    y, x = np.mgrid[:size, :size]
    cy, cx = rng.integers(8, size - 8, size=2)
    r = rng.integers(4, 7)
    if label == 0:
        shape = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif label == 1:
        shape = (abs(y - cy) <= r) & (abs(x - cx) <= r)
    else:
        shape = ((abs(y - cy) <= 1) & (abs(x - cx) <= r)) | (
            (abs(x - cx) <= 1) & (abs(y - cy) <= r)
        )
    pixels = shape * 200.0 + rng.normal(30, 20, size=(size, size))
    return np.clip(pixels, 0, 255).astype(np.uint8)
