"""What a site's data is made of: splits, a site's train and test, what the run knows of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """Features (n, d) float32 and integer labels (n,); ``columns``: feature names, if any."""

    features: FloatArray
    labels: LabelArray
    columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SiteData:
    """A site's training split and held-out split."""

    name: str
    train: Split
    test: Split


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know of the data: input width and number of classes."""

    n_features: int
    n_classes: int
