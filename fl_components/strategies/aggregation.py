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

from fl_components.errors import ConfigError, RoundError
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

# values folded per step: bounds the float64 temporary of one fold to 8 MiB
_CHUNK = 1 << 20
# bytes per value a robust rule holds: each update stacked as float64 in an (n, d) matrix
_ROBUST_BYTES_PER_VALUE = 8


def bound_norm(delta: NDArrays, bound: float) -> NDArrays:
    """Δ · min(1, bound / ‖Δ‖₂), the norm taken over all arrays together (Sun et al. 2019).

    Returns new arrays; ``delta`` is left as it is.
    """
    if not bound > 0:
        raise RoundError(f"strategy.norm_bound must be > 0 (got {bound})")
    norm = float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta)))
    scale = 1.0 if norm <= bound else bound / norm
    return [(np.asarray(a, dtype=np.float64) * scale).astype(np.float32) for a in delta]


class MeanFold:
    """The example-weighted mean Σ_k n_k Δ_k / Σ_k n_k, folded one update at a time.

    The coordinator keeps a float64 running sum (two float32 models' worth) and the update
    being folded; each update can be dropped once :meth:`add` returns, so a round of n sites
    never holds n updates (streaming aggregation). The sum is taken in float64 in arrival
    order; the batch mean of the same updates agrees to float32 rounding.

    Attributes
    ----------
    participants : int
        Updates folded so far.
    norm_bounded : int
        Of those, how many the norm bound scaled down.
    """

    def __init__(self, like: NDArrays, *, norm_bound: float | None = None) -> None:
        self._like = [np.asarray(a) for a in like]
        self._sum = [np.zeros(a.size, dtype=np.float64) for a in like]
        self._weight = 0.0
        self._norm_bound = norm_bound
        self._spent = False
        self.participants = 0
        self.norm_bounded = 0

    def add(self, update: LocalUpdate) -> None:
        """Fold ``update`` (weight: its ``num_examples``); ``update`` is not kept.

        Raises
        ------
        RoundError
            If its weight is negative or its arrays are not shaped like the model's.
        """
        if self._spent:
            raise RoundError("mean: this fold's result was already taken")
        weight = float(update.num_examples)
        if weight < 0 or not np.isfinite(weight):
            raise RoundError(f"mean: site {update.site!r} reports weight {weight}; must be >= 0")
        if len(update.delta) != len(self._sum):
            raise RoundError(
                f"mean: site {update.site!r} sent {len(update.delta)} arrays, "
                f"the model has {len(self._sum)}"
            )
        scale = 1.0
        if self._norm_bound is not None:
            bound = self._norm_bound
            if not bound > 0:
                raise RoundError(f"strategy.norm_bound must be > 0 (got {bound})")
            norm = float(
                np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update.delta))
            )
            if norm > bound:
                scale = bound / norm
                self.norm_bounded += 1
        for total, array, ref in zip(self._sum, update.delta, self._like, strict=True):
            flat = np.asarray(array).ravel()
            if flat.size != total.size:
                raise RoundError(
                    f"mean: site {update.site!r} sent an array of {flat.size} values, "
                    f"the model's has {ref.size}"
                )
            for start in range(0, flat.size, _CHUNK):
                part = flat[start : start + _CHUNK]
                if scale != 1.0:  # as bound_norm does: scale in float64, round to float32
                    part = (part.astype(np.float64) * scale).astype(np.float32)
                total[start : start + _CHUNK] += weight * part.astype(np.float64)
        self._weight += weight
        self.participants += 1

    def result(self) -> NDArrays:
        """The mean, as float32 arrays shaped like the model; the fold is then spent.

        The running sum is released array by array as the mean is written, so the peak is
        the sum and one float32 model, never the sum held beside the server's next step.

        Raises
        ------
        RoundError
            If nothing, or only zero weight, was folded, or the fold was already spent.
        """
        if self._spent:
            raise RoundError("mean: this fold's result was already taken")
        if self.participants == 0:
            raise RoundError("mean: cannot aggregate zero updates")
        if self._weight <= 0:
            raise RoundError(f"mean: weights must sum to > 0 (got {self._weight})")
        out = []
        sums, self._sum, self._spent = self._sum, [], True
        for index, ref in enumerate(self._like):
            total, sums[index] = sums[index], np.zeros(0)
            mean = np.empty(total.size, dtype=np.float32)
            for start in range(0, total.size, _CHUNK):
                mean[start : start + _CHUNK] = total[start : start + _CHUNK] / self._weight
            del total
            out.append(mean.reshape(ref.shape))
        return out


def robust_memory_bytes(updates: int, values: int) -> int:
    """Bytes a robust rule holds for ``updates`` updates of ``values`` values: O(n·d).

    Median, trimmed mean, Krum, Multi-Krum and Bulyan stack every update as float64.
    """
    return _ROBUST_BYTES_PER_VALUE * updates * values


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
    robust_memory_mb : float or None
        The most memory (MiB) a robust rule may take to hold every update (None: no bound).
    """

    rule: str = "mean"
    trim_beta: float = 0.1
    byzantine_f: int = 1
    multi_krum_m: int | None = None
    norm_bound: float | None = None
    robust_memory_mb: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATORS:
            raise RoundError(
                f"strategy.aggregator must be one of {', '.join(AGGREGATORS)} (got {self.rule!r})"
            )

    @property
    def needs_individual_updates(self) -> bool:
        """True for the robust rules (the mean and the norm bound work on a secure sum)."""
        return self.rule != "mean"

    def fold(self, like: NDArrays) -> MeanFold | None:
        """A streaming fold of the mean for models shaped like ``like``; None for robust rules."""
        if self.rule != "mean":
            return None
        return MeanFold(like, norm_bound=self.norm_bound)

    def check_memory(self, updates: int, like: NDArrays) -> None:
        """Refuse a robust rule whose O(n·d) update matrix exceeds ``robust_memory_mb``.

        The mean streams (two models' worth whatever n is) and is never refused.

        Raises
        ------
        ConfigError
            Naming ``strategy.robust_memory_mb``, what the round would need, and the fixes.
        """
        if self.rule == "mean" or self.robust_memory_mb is None:
            return
        values = sum(int(np.asarray(a).size) for a in like)
        need = robust_memory_bytes(updates, values)
        limit = self.robust_memory_mb * 1024 * 1024
        if need > limit:
            raise ConfigError(
                f"strategy.aggregator {self.rule!r} holds every update at once: {updates} "
                f"updates x {values} values x 8 bytes = {need / 2**20:.0f} MiB, above "
                f"strategy.robust_memory_mb = {self.robust_memory_mb:g}. Raise "
                "strategy.robust_memory_mb if the coordinator has the memory, select fewer "
                "sites a round (participation.fraction), or use aggregator: mean (streamed, "
                "with strategy.norm_bound against large updates)"
            )

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
        fold = self.fold(like)
        metrics: dict[str, float] = {}
        if fold is not None:  # the mean: folded, as the engine streams it
            for update in updates:
                fold.add(update)
            if self.norm_bound is not None:
                metrics["strategy/norm_bounded"] = float(fold.norm_bounded)
            return fold.result(), metrics
        self.check_memory(len(updates), like)
        deltas = [u.delta for u in updates]
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
        if self.rule != "mean" and self.robust_memory_mb is not None:
            params["strategy.robust_memory_mb"] = repr(self.robust_memory_mb)
        return params


def _same(a: NDArrays, b: NDArrays) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
