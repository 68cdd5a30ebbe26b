"""q-FedAvg: fair resource allocation, weighting sites by their loss to the power q.

Li, Sanjabi, Beirami & Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020,
arXiv:1905.10497, Algorithm 2 (q-FedAvg). Each selected site k trains from w^t to w̄_k and
reports F_k(w^t), the loss of the received model (``LocalUpdate.initial_loss``); with
L = 1/η_l (the local learning rate's inverse, as the paper sets it):

    Δw_k = L (w^t − w̄_k)                      (= −L Δ_k with our Δ_k = w̄_k − w^t)
    Δ_k' = F_k^q(w^t) Δw_k
    h_k  = q F_k^{q−1}(w^t) ‖Δw_k‖² + L F_k^q(w^t)
    w^{t+1} = w^t − Σ_k Δ_k' / Σ_k h_k

q = 0 is the uniform mean of the updates; larger q moves the model toward the worst sites.
F_k gets 1e-10 added before the powers, as Flower's ``QFedAvg`` does, so a zero loss does
not divide by zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, add, flatten, unflatten
from fl_components.round.types import AggregatedUpdate, LocalUpdate, ServerState, SiteInstructions
from fl_components.strategies.base import Strategy
from fl_components.strategies.fedavg import next_state

LOSS_FLOOR = 1e-10


def qfedavg_step(
    deltas: Sequence[NDArrays], losses: Sequence[float], *, q: float, lipschitz: float
) -> NDArrays:
    """−Σ_k Δ_k' / Σ_k h_k: the step to add to w^t (Algorithm 2, lines 6-9)."""
    if not deltas:
        raise RoundError("q-FedAvg: cannot aggregate zero updates")
    if len(losses) != len(deltas) or q < 0 or lipschitz <= 0:
        raise RoundError(
            f"q-FedAvg: needs one loss per update, q >= 0, L > 0 (got {len(losses)} losses "
            f"for {len(deltas)} updates, q={q}, L={lipschitz})"
        )
    numerator = np.zeros(sum(a.size for a in deltas[0]), dtype=np.float64)
    denominator = 0.0
    for delta, loss in zip(deltas, losses, strict=True):
        f_k = float(loss) + LOSS_FLOOR
        dw = -lipschitz * flatten(delta).astype(np.float64)
        numerator += f_k**q * dw
        first = q * f_k ** (q - 1) * float(dw @ dw) if q > 0 else 0.0
        denominator += first + lipschitz * f_k**q
    return unflatten(-numerator / denominator, deltas[0])


class QFedAvg(Strategy):
    """q-FedAvg's server (Li et al. 2020, Algorithm 2): sites report F_k(w^t)."""

    name = "qfedavg"
    needs_individual_updates = True

    def __init__(self, *, q: float = 1.0, lipschitz: float) -> None:
        if q < 0 or lipschitz <= 0:
            raise RoundError(f"q-FedAvg: needs q >= 0 and L > 0 (got q={q}, L={lipschitz})")
        self.q, self.lipschitz = q, lipschitz

    def configure(
        self, round_num: int, state: ServerState, sites: Sequence[str]
    ) -> dict[str, SiteInstructions]:
        """Every site is asked for the loss of the received model."""
        return {site: SiteInstructions(report_initial_loss=True) for site in sites}

    def aggregate(self, updates: Sequence[LocalUpdate], state: ServerState) -> AggregatedUpdate:
        """The q-weighted step; needs each update's ``initial_loss``."""
        missing = [u.site for u in updates if u.initial_loss is None]
        if missing:
            raise RoundError(
                f"q-FedAvg: site(s) {', '.join(missing)} reported no initial_loss; "
                "their jobs must carry report_initial_loss=True"
            )
        losses = [float(u.initial_loss or 0.0) for u in updates]
        step = qfedavg_step([u.delta for u in updates], losses, q=self.q, lipschitz=self.lipschitz)
        return AggregatedUpdate(
            delta=step,
            participants=len(updates),
            metrics={"strategy/max_initial_loss": max(losses)},
        )

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """w^{t+1} = w^t + step."""
        return next_state(state, parameters=add(state.parameters, update.delta))

    def params(self) -> dict[str, str]:
        """Name, q and L."""
        return {
            "strategy.rule": self.name,
            "strategy.q": repr(self.q),
            "strategy.lipschitz": repr(self.lipschitz),
        }
