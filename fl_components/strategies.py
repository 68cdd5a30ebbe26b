"""Aggregation strategies: pure functions over updates, and a small strategy interface.

FedAvg: McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629,
Algorithm 1: θ_{t+1} = θ_t + η · Σ_k (n_k / n) Δ_k, with server learning rate η
(η = 1 is the paper's; η ≠ 1 is FedAvg with server SGD, Reddi et al. 2021, arXiv:2003.00295).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from fl_components.config import StrategyConfig
from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, add


def weighted_average(updates: list[tuple[NDArrays, int]]) -> NDArrays:
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


@dataclass
class ServerState:
    """What goes into a round and comes out of it: the global model and optimizer state."""

    round: int
    parameters: NDArrays
    optimizer_state: dict[str, NDArrays] = field(default_factory=dict)


class Strategy(ABC):
    """A server-side rule turning the round's mean update into the next global model."""

    @abstractmethod
    def apply(self, state: ServerState, mean_update: NDArrays) -> ServerState:
        """Return the next server state given the (weighted) mean update Δ̄ of the round."""


class FedAvg(Strategy):
    """θ_{t+1} = θ_t + η Δ̄ (McMahan et al. 2017; η = server_lr)."""

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def apply(self, state: ServerState, mean_update: NDArrays) -> ServerState:
        """Step the global parameters along the mean update."""
        return ServerState(
            round=state.round + 1,
            parameters=add(state.parameters, mean_update, scale=self.server_lr),
            optimizer_state=state.optimizer_state,
        )


def build_strategy(config: StrategyConfig) -> Strategy:
    """The strategy named in the config."""
    if config.name == "fedavg":
        return FedAvg(server_lr=config.server_lr)
    raise RoundError(f"strategy.name must be 'fedavg' (got {config.name!r})")
