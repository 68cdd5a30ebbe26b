"""Distance-based robust aggregation: Krum, Multi-Krum and Bulyan.

- Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, Sec. 4: the score of
  update i is Σ ‖V_i − V_j‖² over its n − f − 2 nearest neighbours; Krum picks the lowest
  score (needs n ≥ 2f + 3), Multi-Krum averages the m lowest.
- Bulyan: El Mhamdi, Guerraoui & Rouault, "The Hidden Vulnerability of Distributed Learning
  in Byzantium", ICML 2018, arXiv:1802.07927, Sec. 4: select θ = n − 2f updates by repeated
  Krum, then per coordinate average the β = θ − 2f values closest to the median
  (needs n ≥ 4f + 3).

Same ``(vectors, weights) -> vector`` signature as :mod:`.robust`; weights are ignored, since
a Byzantine site could report any example count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fl_components.errors import RoundError
from fl_components.strategies.robust import FloatVector, stack_updates


def krum_scores(matrix: npt.NDArray[np.float64], *, f: int) -> npt.NDArray[np.float64]:
    """Krum's score per row: the summed squared distance to its n − f − 2 nearest rows.

    Bulyan's later selections run on fewer than 2f + 3 rows; there at least one neighbour
    counts (as Flower's ``aggregate_bulyan`` does).
    """
    n = matrix.shape[0]
    squared = np.sum((matrix[:, None, :] - matrix[None, :, :]) ** 2, axis=-1)
    neighbours = max(n - f - 2, 1) if n > 1 else 0
    # column 0 of each sorted row is the distance to itself (0)
    scores: npt.NDArray[np.float64] = np.sort(squared, axis=1)[:, 1 : 1 + neighbours].sum(axis=1)
    return scores


def _require_krum_size(rule: str, n: int, f: int) -> None:
    if f < 0:
        raise RoundError(f"{rule}: byzantine_f must be >= 0 (got {f})")
    if n < 2 * f + 3:
        raise RoundError(
            f"{rule} with byzantine_f = {f} needs n >= 2f + 3 = {2 * f + 3} updates "
            f"(got {n}); lower strategy.byzantine_f or raise participation.min_participants"
        )


def krum(vectors: Sequence[FloatVector], weights: Sequence[float], *, f: int) -> FloatVector:
    """The update with the lowest Krum score (Blanchard et al. 2017, Sec. 4)."""
    del weights
    matrix = stack_updates(vectors, rule="krum")
    _require_krum_size("krum", matrix.shape[0], f)
    return np.asarray(matrix[int(np.argmin(krum_scores(matrix, f=f)))], dtype=np.float32)


def multi_krum(
    vectors: Sequence[FloatVector], weights: Sequence[float], *, f: int, m: int | None
) -> FloatVector:
    """The mean of the ``m`` updates with the lowest Krum scores (``m`` None: n − f)."""
    del weights
    matrix = stack_updates(vectors, rule="multi_krum")
    n = matrix.shape[0]
    _require_krum_size("multi_krum", n, f)
    keep = n - f if m is None else m
    if not 1 <= keep <= n:
        raise RoundError(
            f"multi_krum: strategy.multi_krum_m = {keep} must lie in [1, {n}] for {n} updates; "
            "lower it or leave it null (n - f)"
        )
    chosen = np.argsort(krum_scores(matrix, f=f), kind="stable")[:keep]
    return np.asarray(matrix[chosen].mean(axis=0), dtype=np.float32)


def bulyan(vectors: Sequence[FloatVector], weights: Sequence[float], *, f: int) -> FloatVector:
    """Bulyan over Krum (El Mhamdi et al. 2018, Sec. 4; needs n ≥ 4f + 3)."""
    del weights
    matrix = stack_updates(vectors, rule="bulyan")
    n = matrix.shape[0]
    if f < 0 or n < 4 * f + 3:
        raise RoundError(
            f"bulyan with byzantine_f = {f} needs n >= 4f + 3 = {4 * f + 3} updates (got {n}); "
            "lower strategy.byzantine_f, raise participation.min_participants, "
            "or use trimmed_mean / median"
        )
    theta, beta = n - 2 * f, n - 4 * f
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(theta):  # step 1: θ rounds of Krum, each removing its pick
        scores = krum_scores(matrix[remaining], f=f)
        selected.append(remaining.pop(int(np.argmin(scores))))
    chosen = matrix[selected]
    median = np.median(chosen, axis=0)
    # step 2: per coordinate, the β values nearest the median
    nearest = np.argsort(np.abs(chosen - median), axis=0, kind="stable")[:beta]
    return np.asarray(np.take_along_axis(chosen, nearest, axis=0).mean(axis=0), dtype=np.float32)
