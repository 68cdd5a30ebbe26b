"""FedAvgM: FedAvg with server momentum.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335, Sec. 3 (FedAvgM): v ← β v + Δw, w ← w − v with
Δw = w_t − w̄ the pseudo-gradient. Here the update Δ̄ = w̄ − w_t is its negative, so, with
a server learning rate η (Flower's ``server_learning_rate``; the paper's η = 1):

    v_{t+1} = β v_t + Δ̄_t,    θ_{t+1} = θ_t + η v_{t+1}.

β = 0 is FedAvg. The momentum lives in ``state.strategy_state["momentum"]``.
"""

from __future__ import annotations

import numpy as np

from fl_components.parameters import NDArrays, add
from fl_components.round.types import AggregatedUpdate, ServerState
from fl_components.strategies.aggregation import UpdateAggregation
from fl_components.strategies.fedavg import FedAvg, next_state, state_arrays


def momentum_step(momentum: NDArrays, delta: NDArrays, *, beta: float) -> NDArrays:
    """v_{t+1} = β v_t + Δ̄_t (Hsu et al. 2019, Sec. 3), as new arrays."""
    return [
        (beta * np.asarray(v, dtype=np.float64) + d).astype(np.float32)
        for v, d in zip(momentum, delta, strict=True)
    ]


class FedAvgM(FedAvg):
    """FedAvg whose server steps along a momentum of the combined updates."""

    name = "fedavgm"

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        aggregation: UpdateAggregation | None = None,
    ) -> None:
        super().__init__(server_lr=server_lr, aggregation=aggregation)
        self.server_momentum = server_momentum

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """V ← βv + Δ̄, θ ← θ + ηv."""
        momentum = momentum_step(
            state_arrays(state, "momentum"), update.delta, beta=self.server_momentum
        )
        return next_state(
            state,
            parameters=add(state.parameters, momentum, scale=self.server_lr),
            arrays={"momentum": momentum},
        )

    def params(self) -> dict[str, str]:
        """FedAvg's params and the momentum β."""
        return {**super().params(), "strategy.server_momentum": repr(self.server_momentum)}
