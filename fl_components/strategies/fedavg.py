"""FedAvg: the example-weighted mean of the updates, stepped with a server learning rate.

McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629, Algorithm 1:
θ_{t+1} = θ_t + η · Σ_k (n_k / n) Δ_k, with server learning rate η (η = 1 is the paper's;
η ≠ 1 is FedAvg with server SGD, Reddi et al. 2021, arXiv:2003.00295).

The mean can be swapped for a robust rule, and each update's norm bounded, through
:class:`~fl_components.strategies.aggregation.UpdateAggregation`; every rule derived from
FedAvg (FedAvgM, FedProx, SCAFFOLD, FedOpt) shares that step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from fl_components.parameters import NDArrays, add
from fl_components.round.types import AggregatedUpdate, LocalUpdate, ServerState
from fl_components.strategies.aggregation import MeanFold, UpdateAggregation
from fl_components.strategies.base import Strategy


def zeros_like(parameters: NDArrays) -> NDArrays:
    """Float32 zeros shaped like ``parameters``."""
    return [np.zeros(p.shape, dtype=np.float32) for p in parameters]


def state_arrays(state: ServerState, key: str, *, fill: float = 0.0) -> NDArrays:
    """A copy of ``state.strategy_state[key]``, or arrays of ``fill`` if the key is absent."""
    if key in state.strategy_state:
        return [np.array(a, dtype=np.float32, copy=True) for a in state.strategy_state[key]]
    return [np.full(p.shape, fill, dtype=np.float32) for p in state.parameters]


def next_state(
    state: ServerState, *, parameters: NDArrays, arrays: dict[str, NDArrays] | None = None
) -> ServerState:
    """The state of the next round: new parameters, ``arrays`` set, nothing shared with ``state``.

    Strategy arrays not named in ``arrays`` are copied over, so no array of the new state is
    an array of the old one.
    """
    strategy_state = {
        name: [np.array(a, copy=True) for a in values]
        for name, values in state.strategy_state.items()
    }
    strategy_state.update(arrays or {})
    return state.evolve(
        round=state.round + 1,
        parameters=parameters,
        strategy_state=strategy_state,
        rng_state=copy.deepcopy(dict(state.rng_state)) if state.rng_state else None,
    )


class FedAvg(Strategy):
    """θ_{t+1} = θ_t + η Δ̄, Δ̄ the example-weighted mean (McMahan et al. 2017; η = server_lr)."""

    name = "fedavg"

    def __init__(
        self, *, server_lr: float = 1.0, aggregation: UpdateAggregation | None = None
    ) -> None:
        self.server_lr = server_lr
        self.aggregation = aggregation if aggregation is not None else UpdateAggregation()
        # per instance: a robust aggregation step needs the updates in the clear
        self.needs_individual_updates = (
            type(self).needs_individual_updates or self.aggregation.needs_individual_updates
        )

    def aggregate(self, updates: Sequence[LocalUpdate], state: ServerState) -> AggregatedUpdate:
        """The updates combined by the aggregation step (the example-weighted mean by default)."""
        delta, metrics = self.aggregation.combine(updates)
        return AggregatedUpdate(delta=delta, participants=len(updates), metrics=metrics)

    def fold(self, state: ServerState) -> MeanFold | None:
        """The streamed mean, when the aggregation step is the mean (robust rules: None)."""
        return self.aggregation.fold(state.parameters)

    def aggregate_folded(self, fold: MeanFold, state: ServerState) -> AggregatedUpdate:
        """The folded mean, with the norm bound's count as :meth:`aggregate` reports it."""
        metrics = {}
        if self.aggregation.norm_bound is not None:
            metrics["strategy/norm_bounded"] = float(fold.norm_bounded)
        return AggregatedUpdate(
            delta=fold.result(), participants=fold.participants, metrics=metrics
        )

    def check_memory(self, updates: int, state: ServerState) -> None:
        """A robust aggregation step's O(n·d) bound (``strategy.robust_memory_mb``)."""
        self.aggregation.check_memory(updates, state.parameters)

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """Step the global parameters along the combined update."""
        return next_state(
            state, parameters=add(state.parameters, update.delta, scale=self.server_lr)
        )

    def params(self) -> dict[str, str]:
        """Name, server learning rate and the aggregation step's settings."""
        return {
            "strategy.rule": self.name,
            "strategy.server_lr": repr(self.server_lr),
            **self.aggregation.params(),
        }
