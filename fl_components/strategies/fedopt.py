"""FedAdagrad, FedAdam and FedYogi: adaptive server optimizers on the averaged update.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive Federated
Optimization", ICLR 2021, arXiv:2003.00295, Algorithm 2 (FedOpt). With Δ_t the combined
update (the pseudo-gradient's negative), m_{-1} = 0 and v_{-1} = τ²:

    m_t = β₁ m_{t−1} + (1 − β₁) Δ_t
    v_t = v_{t−1} + Δ_t²                                    (FedAdagrad)
    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²                        (FedAdam)
    v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)      (FedYogi)
    θ_{t+1} = θ_t + η m_t / (√v_t + τ)

No bias correction is applied, as in Algorithm 2 (τ already bounds the first steps).
Flower's ``FedAdam`` differs: it starts v at 0 and multiplies η by the Adam bias correction
√(1 − β₂^{r+1}) / (1 − β₁^{r+1}) with r the server round (Kingma & Ba 2014); its FedAdagrad
and FedYogi apply none. So with the same (η, β₁, β₂, τ) our first FedAdam step is
η (1 − β₁) Δ / (√(τ² β₂ + (1 − β₂)Δ²) + τ), Flower's is larger. Moments live in
``state.strategy_state["m"]`` and ``["v"]``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fl_components.parameters import NDArrays
from fl_components.round.types import AggregatedUpdate, ServerState
from fl_components.strategies.aggregation import UpdateAggregation
from fl_components.strategies.fedavg import FedAvg, next_state, state_arrays

Float64 = npt.NDArray[np.float64]


def adagrad_second_moment(v: Float64, delta: Float64, *, beta2: float) -> Float64:
    """v_t = v_{t−1} + Δ_t² (Algorithm 2, FedAdagrad; β₂ unused)."""
    del beta2
    return v + delta**2


def adam_second_moment(v: Float64, delta: Float64, *, beta2: float) -> Float64:
    """v_t = β₂ v_{t−1} + (1 − β₂) Δ_t² (Algorithm 2, FedAdam)."""
    return beta2 * v + (1 - beta2) * delta**2


def yogi_second_moment(v: Float64, delta: Float64, *, beta2: float) -> Float64:
    """v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²) (Algorithm 2, FedYogi)."""
    return v - (1 - beta2) * delta**2 * np.sign(v - delta**2)


class FedAdam(FedAvg):
    """FedOpt with Adam's second moment (Reddi et al. 2021, Algorithm 2)."""

    name = "fedadam"
    second_moment = staticmethod(adam_second_moment)

    def __init__(
        self,
        *,
        server_lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        aggregation: UpdateAggregation | None = None,
    ) -> None:
        super().__init__(server_lr=server_lr, aggregation=aggregation)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def initial_state(self, parameters: NDArrays) -> ServerState:
        """m_{−1} = 0, v_{−1} = τ² (Algorithm 2's initialization)."""
        state = super().initial_state(parameters)
        return state.evolve(
            strategy_state={
                "m": state_arrays(state, "m"),
                "v": state_arrays(state, "v", fill=self.tau**2),
            }
        )

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """Update m and v, then θ ← θ + η m / (√v + τ)."""
        m_old = state_arrays(state, "m")
        v_old = state_arrays(state, "v", fill=self.tau**2)
        parameters, m_new, v_new = [], [], []
        for theta, m, v, d in zip(state.parameters, m_old, v_old, update.delta, strict=True):
            d64 = np.asarray(d, dtype=np.float64)
            m_t = self.beta1 * m.astype(np.float64) + (1 - self.beta1) * d64
            v_t = self.second_moment(v.astype(np.float64), d64, beta2=self.beta2)
            step = self.server_lr * m_t / (np.sqrt(v_t) + self.tau)
            parameters.append((theta + step).astype(np.float32))
            m_new.append(m_t.astype(np.float32))
            v_new.append(v_t.astype(np.float32))
        return next_state(state, parameters=parameters, arrays={"m": m_new, "v": v_new})

    def params(self) -> dict[str, str]:
        """FedAvg's params and β₁, β₂, τ."""
        return {
            **super().params(),
            "strategy.beta1": repr(self.beta1),
            "strategy.beta2": repr(self.beta2),
            "strategy.tau": repr(self.tau),
        }


class FedAdagrad(FedAdam):
    """FedOpt with Adagrad's accumulated second moment (β₂ unused)."""

    name = "fedadagrad"
    second_moment = staticmethod(adagrad_second_moment)


class FedYogi(FedAdam):
    """FedOpt with Yogi's sign-controlled second moment."""

    name = "fedyogi"
    second_moment = staticmethod(yogi_second_moment)
