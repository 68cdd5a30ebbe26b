"""Federated statistics: the federation's per-column count, mean and std from per-site sums.

Each site computes its own sufficient statistics over its training rows: the row count, per
column the sum and the sum of squares, and the count of each label class
(:func:`site_sums`). Only their sum over the sites is needed for the pooled mean and
standard deviation (Chan, Golub & LeVeque 1983, "Algorithms for computing the sample
variance", The American Statistician 37(3), eq. 1.5: var = S2/n - (S1/n)^2), so that sum is
all the coordinator has to learn: by secure aggregation when it is on (Bonawitz et al.
2017, CCS, arXiv:1611.04482), never one site's statistics in the clear.

Secure aggregation sums vectors clipped to [-c, c] in fixed point; the sums are brought into
that range by a public ``bound`` (the largest absolute statistic any site may send) and
scaled back after the sum (:func:`encode_for_secure_sum`, :func:`decode_secure_sum`). A site
whose statistic exceeds the bound refuses to send it rather than have it clipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fl_components.data.types import Split
from fl_components.errors import DataError

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SiteSums:
    """Sufficient statistics of some rows: count, per-column sum and sum of squares, classes."""

    count: float
    sums: FloatArray  # (d,) sum of each column
    squares: FloatArray  # (d,) sum of each column's squares
    label_counts: FloatArray  # (n_classes,) rows per class

    def vector(self) -> FloatArray:
        """``[count, sums..., squares..., label_counts...]``: what a secure sum adds up."""
        return np.concatenate([[self.count], self.sums, self.squares, self.label_counts])

    @classmethod
    def from_vector(cls, vector: FloatArray, *, n_features: int, n_classes: int) -> SiteSums:
        """The inverse of :meth:`vector`."""
        expected = 1 + 2 * n_features + n_classes
        if vector.shape != (expected,):
            raise ValueError(
                f"a sums vector of {n_features} features, {n_classes} classes has "
                f"{expected} values, got shape {vector.shape}"
            )
        d = n_features
        return cls(
            count=float(vector[0]),
            sums=vector[1 : 1 + d].copy(),
            squares=vector[1 + d : 1 + 2 * d].copy(),
            label_counts=vector[1 + 2 * d :].copy(),
        )


def site_sums(split: Split, *, n_classes: int) -> SiteSums:
    """A site's sufficient statistics over one split (float64, summed row by row)."""
    features = split.features.astype(np.float64)
    return SiteSums(
        count=float(len(split)),
        sums=features.sum(axis=0),
        squares=np.square(features).sum(axis=0),
        label_counts=np.bincount(split.labels, minlength=n_classes).astype(np.float64),
    )


def add_sums(parts: Iterable[SiteSums]) -> SiteSums:
    """The sum of several sites' statistics, in the clear (where secure aggregation is off)."""
    listed = list(parts)
    if not listed:
        raise ValueError("add_sums needs at least one site's statistics")
    return SiteSums.from_vector(
        np.sum([p.vector() for p in listed], axis=0),
        n_features=len(listed[0].sums),
        n_classes=len(listed[0].label_counts),
    )


@dataclass(frozen=True)
class FederationStats:
    """The federation's pooled statistics: per column count, mean, std; rows per class."""

    count: int
    mean: FloatArray
    std: FloatArray
    label_counts: npt.NDArray[np.int64]

    @classmethod
    def from_sums(cls, total: SiteSums) -> FederationStats:
        """Pooled mean and (population) std from summed statistics (Chan et al. eq. 1.5).

        Negative variances from rounding (a constant column) are taken as 0.
        """
        if total.count < 1:
            raise DataError("federated statistics over no rows; check the sites' files")
        mean = total.sums / total.count
        variance = np.maximum(total.squares / total.count - np.square(mean), 0.0)
        return cls(
            count=round(total.count),
            mean=mean,
            std=np.sqrt(variance),
            label_counts=np.rint(total.label_counts).astype(np.int64),
        )

    def standardize(self, split: Split) -> Split:
        """``split`` standardized with the federation's mean and std (a constant column centred)."""
        std = np.where(self.std > 0, self.std, 1.0)
        features = ((split.features.astype(np.float64) - self.mean) / std).astype(np.float32)
        return Split(features, split.labels, split.columns, split.id_like)


def encode_for_secure_sum(sums: SiteSums, *, bound: float, site: str = "") -> FloatArray:
    """A site's statistics scaled into [-1, 1] by the public ``bound``, for a secure sum.

    Raises
    ------
    DataError
        If a statistic exceeds ``bound`` (it would be clipped, and the result wrong): the
        message names the statistic, never its value, and the fix.
    """
    vector = sums.vector()
    over = np.flatnonzero(np.abs(vector) > bound)
    if over.size:
        d = len(sums.sums)
        kinds = ["row count"] + [f"sum of column {i}" for i in range(d)]
        kinds += [f"sum of squares of column {i}" for i in range(d)]
        kinds += [f"count of class {i}" for i in range(len(sums.label_counts))]
        named = ", ".join(kinds[i] for i in over[:3])
        who = f"site {site!r}: " if site else ""
        raise DataError(
            f"{who}{len(over)} statistic(s) exceed the public bound {bound:g} of the secure "
            f"sum ({named}); raise the bound (it costs precision: the error of each sum is "
            "at most n * bound / 2^(bits-1)), or scale the site's files"
        )
    return vector / bound


def decode_secure_sum(
    total: FloatArray, *, bound: float, n_features: int, n_classes: int
) -> SiteSums:
    """The summed statistics from a secure sum of :func:`encode_for_secure_sum` vectors.

    Counts come back as whole numbers: a quantization error below one half is rounded away.
    """
    sums = SiteSums.from_vector(
        np.asarray(total, np.float64) * bound, n_features=n_features, n_classes=n_classes
    )
    return SiteSums(
        count=float(np.rint(sums.count)),
        sums=sums.sums,
        squares=sums.squares,
        label_counts=np.rint(sums.label_counts),
    )
