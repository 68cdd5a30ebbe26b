"""The aggregation step every server rule shares: bound each update's norm, then combine.

Norm bounding: Sun, Kairouz, Suresh & McMahan, "Can You Really Backdoor Federated
Learning?", arXiv:1911.07963, Sec. 4: each update is scaled to
Δ_k · min(1, M / ‖Δ_k‖₂). It needs no other site's update, so under secure aggregation the
*site* applies :func:`bound_norm` before masking and the coordinator never sees Δ_k.

The combining rule is the weighted mean (FedAvg) or one of the robust rules of
:mod:`.robust` and :mod:`.krum`; those need every update in the clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, flatten, unflatten
from fl_components.round.types import LocalUpdate
from fl_components.strategies.krum import bulyan, krum, multi_krum
from fl_components.strategies.robust import (
    FloatVector,
    coordinate_median,
    trimmed_mean,
    weighted_mean,
)

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")


def bound_norm(delta: NDArrays, bound: float) -> NDArrays:
    """Δ · min(1, bound / ‖Δ‖₂), the norm taken over all arrays together (Sun et al. 2019).

    Returns new arrays; ``delta`` is left as it is.
    """
    if not bound > 0:
        raise RoundError(f"strategy.norm_bound must be > 0 (got {bound})")
    norm = float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta)))
    scale = 1.0 if norm <= bound else bound / norm
    return [(np.asarray(a, dtype=np.float64) * scale).astype(np.float32) for a in delta]


@dataclass(frozen=True)
class UpdateAggregation:
    """How a round's updates become one: optional norm bound, then a combining rule.

    Attributes
    ----------
    rule : str
        One of :data:`AGGREGATORS`.
    trim_beta : float
        β of the trimmed mean (share cut at each end, per coordinate).
    byzantine_f : int
        f, the attackers Krum, Multi-Krum and Bulyan tolerate.
    multi_krum_m : int or None
        m, the updates Multi-Krum averages (None: n − f).
    norm_bound : float or None
        M, the L2 bound on each update (None: no bound).
    """

    rule: str = "mean"
    trim_beta: float = 0.1
    byzantine_f: int = 1
    multi_krum_m: int | None = None
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATORS:
            raise RoundError(
                f"strategy.aggregator must be one of {', '.join(AGGREGATORS)} (got {self.rule!r})"
            )

    @property
    def needs_individual_updates(self) -> bool:
        """True for the robust rules (the mean and the norm bound work on a secure sum)."""
        return self.rule != "mean"

    def combine_vectors(
        self, vectors: Sequence[FloatVector], weights: Sequence[float]
    ) -> FloatVector:
        """Apply the combining rule to flat vectors (no norm bound here)."""
        if self.rule == "mean":
            return weighted_mean(vectors, weights)
        if self.rule == "median":
            return coordinate_median(vectors, weights)
        if self.rule == "trimmed_mean":
            return trimmed_mean(vectors, weights, beta=self.trim_beta)
        if self.rule == "krum":
            return krum(vectors, weights, f=self.byzantine_f)
        if self.rule == "multi_krum":
            return multi_krum(vectors, weights, f=self.byzantine_f, m=self.multi_krum_m)
        return bulyan(vectors, weights, f=self.byzantine_f)

    def combine(self, updates: Sequence[LocalUpdate]) -> tuple[NDArrays, dict[str, float]]:
        """Bound, then combine the updates' deltas; also the step's own metrics."""
        if not updates:
            raise RoundError(f"{self.rule}: cannot aggregate zero updates")
        like = updates[0].delta
        deltas = [u.delta for u in updates]
        metrics: dict[str, float] = {}
        if self.norm_bound is not None:
            bounded = [bound_norm(d, self.norm_bound) for d in deltas]
            metrics["strategy/norm_bounded"] = float(
                sum(not _same(a, b) for a, b in zip(deltas, bounded, strict=True))
            )
            deltas = bounded
        vector = self.combine_vectors(
            [flatten(d) for d in deltas], [float(u.num_examples) for u in updates]
        )
        return unflatten(vector, like), metrics

    def params(self) -> Mapping[str, str]:
        """The step's settings as MLflow params (only those that apply to the rule)."""
        params = {"strategy.aggregator": self.rule}
        if self.rule == "trimmed_mean":
            params["strategy.trim_beta"] = repr(self.trim_beta)
        if self.rule in ("krum", "multi_krum", "bulyan"):
            params["strategy.byzantine_f"] = str(self.byzantine_f)
        if self.rule == "multi_krum":
            params["strategy.multi_krum_m"] = str(self.multi_krum_m)
        params["strategy.norm_bound"] = str(self.norm_bound)
        return params


def _same(a: NDArrays, b: NDArrays) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
