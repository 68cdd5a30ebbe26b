"""FedAvg: the example-weighted mean of the updates, stepped with a server learning rate.

McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629, Algorithm 1:
θ_{t+1} = θ_t + η · Σ_k (n_k / n) Δ_k, with server learning rate η (η = 1 is the paper's;
η ≠ 1 is FedAvg with server SGD, Reddi et al. 2021, arXiv:2003.00295).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, add
from fl_components.strategies.base import AggregatedUpdate, ServerState, Strategy
from fl_components.training import LocalUpdate


def weighted_average(updates: Sequence[tuple[NDArrays, int]]) -> NDArrays:
    """Average arrays weighted by example counts: Σ_k n_k Δ_k / Σ_k n_k."""
    if not updates:
        raise RoundError("cannot average zero updates: no participant returned one")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise RoundError(f"example counts must sum to > 0 (got {total})")
    # float64 accumulation, so that many small updates do not lose precision
    summed = [np.zeros(a.shape, dtype=np.float64) for a in updates[0][0]]
    for arrays, n in updates:
        if len(arrays) != len(summed):
            raise RoundError(f"update has {len(arrays)} arrays, expected {len(summed)}")
        for acc, a in zip(summed, arrays, strict=True):
            acc += np.asarray(a, dtype=np.float64) * n
    return [(acc / total).astype(np.float32) for acc in summed]


class FedAvg(Strategy):
    """θ_{t+1} = θ_t + η Δ̄, Δ̄ the example-weighted mean (McMahan et al. 2017; η = server_lr)."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def aggregate(self, updates: Sequence[LocalUpdate], state: ServerState) -> AggregatedUpdate:
        """The example-weighted mean of the updates."""
        mean = weighted_average([(u.delta, u.num_examples) for u in updates])
        return AggregatedUpdate(delta=mean, participants=len(updates))

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """Step the global parameters along the combined update."""
        return state.evolve(
            round=state.round + 1,
            parameters=add(state.parameters, update.delta, scale=self.server_lr),
        )

    def params(self) -> dict[str, str]:
        """Name and server learning rate."""
        return {"strategy.rule": self.name, "strategy.server_lr": repr(self.server_lr)}
