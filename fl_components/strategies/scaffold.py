"""SCAFFOLD: control variates that correct each site's drift (option II).

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, arXiv:1910.06378, Algorithm 1:

- site i, from y_i = x and c, c_i: each local step y_i ← y_i − η_l (g_i(y_i) − c_i + c)
  (line 10; :func:`scaffold_correct_gradients`, after ``backward``);
- option II (line 12): c_i⁺ = c_i − c + (x − y_i) / (K η_l), K local steps
  (:func:`scaffold_client_control`); the site returns Δy_i = y_i − x and Δc_i = c_i⁺ − c_i;
- server (lines 16-17): x ← x + η_g Δx̄, c ← c + (|S| / N) Δc̄, with Δc̄ = (1/|S|) Σ Δc_i.

Δx̄ is the aggregation step's combination (the example-weighted mean by default; the paper
averages uniformly, NVIDIA FLARE weighs by examples as here). c lives in
``state.strategy_state["control"]``; each site keeps its c_i in its own folder
(:func:`save_client_control`, ``.npz`` without pickle). Option II assumes plain local SGD:
with momentum, (x − y_i)/(K η_l) is only an estimate of the mean corrected gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, add, flatten, unflatten
from fl_components.round.types import AggregatedUpdate, LocalUpdate, ServerState, SiteInstructions
from fl_components.strategies.aggregation import UpdateAggregation
from fl_components.strategies.fedavg import FedAvg, next_state, state_arrays
from fl_components.strategies.robust import weighted_mean


class Scaffold(FedAvg):
    """SCAFFOLD's server: steps x along Δx̄ and the server control c along Δc̄."""

    name = "scaffold"
    # aggregate reads each site's Δc_i; the secure sum and DP-FedAvg carry only Δ
    needs_individual_updates = True

    def __init__(
        self,
        *,
        num_sites: int,
        server_lr: float = 1.0,
        aggregation: UpdateAggregation | None = None,
    ) -> None:
        super().__init__(server_lr=server_lr, aggregation=aggregation)
        if num_sites < 1:
            raise RoundError(f"SCAFFOLD: num_sites (N) must be >= 1 (got {num_sites})")
        self.num_sites = num_sites

    def initial_state(self, parameters: NDArrays) -> ServerState:
        """x_0 and c = 0."""
        state = super().initial_state(parameters)
        return state.evolve(strategy_state={"control": state_arrays(state, "control")})

    def configure(
        self, round_num: int, state: ServerState, sites: Sequence[str]
    ) -> dict[str, SiteInstructions]:
        """Every site is sent (a copy of) c."""
        control = state_arrays(state, "control")
        return {site: SiteInstructions(server_control=control) for site in sites}

    def fold(self, state: ServerState) -> None:
        """No streaming: Δc̄ needs each site's control delta too (batch aggregation)."""
        return None

    def aggregate(self, updates: Sequence[LocalUpdate], state: ServerState) -> AggregatedUpdate:
        """Δx̄ by the aggregation step; Δc̄ = (1/|S|) Σ Δc_i (uniform, Algorithm 1 line 16)."""
        missing = [u.site for u in updates if u.control_delta is None]
        if missing:
            raise RoundError(
                f"SCAFFOLD: site(s) {', '.join(missing)} returned no control_delta; their "
                "local training must run SCAFFOLD's correction (strategy.name: scaffold)"
            )
        combined = super().aggregate(updates, state)
        vectors = [flatten(u.control_delta or []) for u in updates]
        uniform = weighted_mean(vectors, [1.0] * len(vectors))
        control_delta = unflatten(uniform, updates[0].control_delta or [])
        return AggregatedUpdate(
            delta=combined.delta,
            participants=combined.participants,
            control_delta=control_delta,
            metrics=combined.metrics,
        )

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """X ← x + η_g Δx̄; c ← c + (|S|/N) Δc̄ (Algorithm 1, line 17)."""
        if update.control_delta is None:
            raise RoundError("SCAFFOLD: the combined update carries no control_delta (Δc̄)")
        control = add(
            state_arrays(state, "control"),
            update.control_delta,
            scale=update.participants / self.num_sites,
        )
        return next_state(
            state,
            parameters=add(state.parameters, update.delta, scale=self.server_lr),
            arrays={"control": control},
        )

    def params(self) -> dict[str, str]:
        """FedAvg's params and N."""
        return {**super().params(), "strategy.num_sites": str(self.num_sites)}
