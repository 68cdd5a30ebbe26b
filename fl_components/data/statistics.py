"""Federated statistics: the federation's per-column count, mean and std from per-site sums.

Each site computes its own sufficient statistics over its training rows: the row count, per
column the sum and the sum of squares, and the count of each label class
(:func:`site_sums`). Only their sum over the sites is needed for the pooled mean and
standard deviation (Chan, Golub & LeVeque 1983, "Algorithms for computing the sample
variance", The American Statistician 37(3), eq. 1.5: var = S2/n - (S1/n)^2), so that sum is
all the coordinator has to learn: by secure aggregation when it is on (Bonawitz et al.
2017, CCS, arXiv:1611.04482), never one site's statistics in the clear.

Secure aggregation sums vectors of bounded values; statistics have no public bound (a sum of
squares of incomes runs to 1e14). Each statistic is written in fixed point as eight 16-bit
digits (:func:`to_limbs`): the secure sum adds the digits exactly, and the carries are
resolved after it (:func:`from_limb_sums`), so the summed statistics are exact up to the
fixed point's 2^-24, whatever their size, with nothing clipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_components.data.types import SiteData, Split
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


def clipped_sums(split: Split, *, n_classes: int, low: FloatArray, high: FloatArray) -> SiteSums:
    """:func:`site_sums` of the split's values clipped to the public ``[low, high]`` per column."""
    features = np.clip(split.features.astype(np.float64), low, high)
    return SiteSums(
        count=float(len(split)),
        sums=features.sum(axis=0),
        squares=np.square(features).sum(axis=0),
        label_counts=np.bincount(split.labels, minlength=n_classes).astype(np.float64),
    )


def sensitivity(low: FloatArray, high: FloatArray) -> float:
    """L2 sensitivity of :meth:`SiteSums.vector` to adding or removing one row.

    One row with values clipped to ``[low, high]`` adds 1 to the count, x_j to each sum,
    x_j^2 to each sum of squares and 1 to one class count, so with M_j = max(|low_j|,
    |high_j|) its contribution has L2 norm at most sqrt(1 + sum M_j^2 + sum M_j^4 + 1).
    """
    largest = np.maximum(np.abs(low), np.abs(high))
    return float(np.sqrt(2.0 + np.sum(largest**2) + np.sum(largest**4)))


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


def federation_standardized(data: SiteData, scaling: Any, *, site: str) -> SiteData:
    """A site's splits standardized with the federation's ``data.scaling`` (mean, std).

    Raises
    ------
    DataError
        If the job carries no scaling, or one of another width than the site's inputs.
    """
    if scaling is None:
        raise DataError(
            f"site {site!r}: data.scale is 'federation' but the job carries no federation "
            "statistics (data.scaling); start the run with `fedpipe run`, which forms them "
            "before round 1, or give data.scaling (`fedpipe stats CONFIG` prints it)"
        )
    width = data.train.features.shape[1]
    if len(scaling.mean) != width:
        raise DataError(
            f"site {site!r}: data.scaling has {len(scaling.mean)} means but the site's files "
            f"give {width} model inputs; remove data.scaling so the run forms it again"
        )
    stats = FederationStats(
        count=int(scaling.rows),
        mean=np.asarray(scaling.mean, np.float64),
        std=np.asarray(scaling.std, np.float64),
        label_counts=np.zeros(0, np.int64),
    )
    return SiteData(data.name, stats.standardize(data.train), stats.standardize(data.test))


# Fixed point for an exact secure sum: each statistic x becomes the integer round(x * 2^F),
# held modulo 2^(LIMB_BITS * LIMBS) as LIMBS digits of LIMB_BITS bits. The secure sum adds
# each digit over the sites exactly (n digits of 16 bits fit in Z_2^32 for n < 2^16); the
# carries are resolved after the sum, so the total is exact whatever the statistics' size.
FRACTION_BITS = 24
LIMB_BITS = 16
LIMBS = 8
_MODULUS = 1 << (LIMB_BITS * LIMBS)
_LARGEST = 1 << (LIMB_BITS * LIMBS - 18)  # |round(x * 2^F)| below this: room for 2^16 sites


def _statistic_names(n_features: int, n_classes: int) -> list[str]:
    names = ["row count"] + [f"sum of input {i}" for i in range(n_features)]
    names += [f"sum of squares of input {i}" for i in range(n_features)]
    return names + [f"count of class {i}" for i in range(n_classes)]


def to_limbs(sums: SiteSums, *, site: str = "") -> npt.NDArray[np.int64]:
    """A site's statistics as fixed-point digits, shape (len(vector) * LIMBS,), each < 2^16.

    Raises
    ------
    DataError
        If a statistic is too large for the fixed point (|x| >= 2^86, about 8e25) or not
        finite: the message names the statistic, never its value.
    """
    vector = sums.vector()
    too_large = np.flatnonzero(~(np.abs(vector) * 2.0**FRACTION_BITS < _LARGEST))
    if too_large.size:
        names = _statistic_names(len(sums.sums), len(sums.label_counts))
        who = f"site {site!r}: " if site else ""
        raise DataError(
            f"{who}{len(too_large)} statistic(s) are too large or not finite for the secure "
            f"sum ({', '.join(names[i] for i in too_large[:3])}); scale the site's files "
            "(values near 1e12 and above) before federated statistics"
        )
    digits = np.empty((vector.size, LIMBS), np.int64)
    mask = (1 << LIMB_BITS) - 1
    for i, value in enumerate(vector.tolist()):
        fixed = round(value * 2**FRACTION_BITS) % _MODULUS  # two's complement
        for limb in range(LIMBS):
            digits[i, limb] = (fixed >> (LIMB_BITS * limb)) & mask
    return digits.reshape(-1)


def from_limb_sums(digit_sums: npt.ArrayLike, *, n_features: int, n_classes: int) -> SiteSums:
    """The summed statistics from the (exact) sum of several sites' :func:`to_limbs`."""
    sums = np.rint(np.asarray(digit_sums, np.float64)).astype(np.int64)
    expected = (1 + 2 * n_features + n_classes) * LIMBS
    if sums.shape != (expected,):
        raise ValueError(f"digit sums of shape {sums.shape}, expected ({expected},)")
    values = []
    for row in sums.reshape(-1, LIMBS).tolist():
        fixed = sum(int(d) << (LIMB_BITS * limb) for limb, d in enumerate(row)) % _MODULUS
        if fixed >= _MODULUS // 2:
            fixed -= _MODULUS
        values.append(fixed / 2**FRACTION_BITS)
    total = SiteSums.from_vector(
        np.array(values, np.float64), n_features=n_features, n_classes=n_classes
    )
    return SiteSums(
        count=float(np.rint(total.count)),
        sums=total.sums,
        squares=total.squares,
        label_counts=np.rint(total.label_counts),
    )
