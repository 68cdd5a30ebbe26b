"""Coordinate-wise robust aggregation: the median and the β-trimmed mean.

Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, arXiv:1803.01498, Definitions 1 (coordinate-wise median) and
2 (coordinate-wise β-trimmed mean).

Every rule here maps ``(vectors, weights) -> vector`` over flat float32 update vectors, so
that any server rule can use it as its aggregation step. The example counts ``weights`` are
self-reported by the sites: a Byzantine site would claim a huge one, so the robust rules
weigh every participant equally, as the papers do, and only :func:`weighted_mean` uses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fl_components.errors import RoundError

FloatVector = npt.NDArray[np.float32]


def stack_updates(vectors: Sequence[FloatVector], *, rule: str) -> npt.NDArray[np.float64]:
    """Stack flat updates into an (n, d) float64 matrix; refuse none or mixed lengths."""
    if not vectors:
        raise RoundError(f"{rule}: cannot aggregate zero updates (no participant returned one)")
    sizes = {int(v.size) for v in vectors}
    if len(sizes) != 1:
        raise RoundError(f"{rule}: updates have different lengths {sorted(sizes)}")
    return np.stack([np.asarray(v, dtype=np.float64).ravel() for v in vectors])


def weighted_mean(vectors: Sequence[FloatVector], weights: Sequence[float]) -> FloatVector:
    """Σ_k w_k v_k / Σ_k w_k (FedAvg's mean; McMahan et al. 2017, arXiv:1602.05629)."""
    matrix = stack_updates(vectors, rule="mean")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (matrix.shape[0],):
        raise RoundError(f"mean: {w.size} weights for {matrix.shape[0]} updates")
    if np.any(w < 0) or w.sum() <= 0:
        raise RoundError(f"mean: weights must be >= 0 and sum to > 0 (got {w.tolist()})")
    return np.asarray((w @ matrix) / w.sum(), dtype=np.float32)


def coordinate_median(vectors: Sequence[FloatVector], weights: Sequence[float]) -> FloatVector:
    """The coordinate-wise median of the updates (Yin et al. 2018, Definition 1).

    ``weights`` is accepted for the common signature and ignored (see the module note).
    """
    del weights
    return np.asarray(np.median(stack_updates(vectors, rule="median"), axis=0), dtype=np.float32)


def trimmed_mean(
    vectors: Sequence[FloatVector], weights: Sequence[float], *, beta: float
) -> FloatVector:
    """The coordinate-wise β-trimmed mean (Yin et al. 2018, Definition 2).

    Per coordinate, drop the ⌊βn⌋ largest and the ⌊βn⌋ smallest values, average the rest.
    ``weights`` is ignored (see the module note).
    """
    del weights
    matrix = stack_updates(vectors, rule="trimmed_mean")
    if not 0 <= beta < 0.5:
        raise RoundError(f"trimmed_mean: beta must be in [0, 0.5) (got {beta})")
    n = matrix.shape[0]
    cut = int(np.floor(beta * n))
    ordered = np.sort(matrix, axis=0)
    return np.asarray(ordered[cut : n - cut].mean(axis=0), dtype=np.float32)
