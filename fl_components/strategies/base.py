"""The strategy interface: what each site is sent, how results combine, how the server moves.

A strategy sees every site's result (not a pre-computed mean) and carries its state
explicitly in :class:`ServerState`, as fedjax's ``apply(server_state, clients)`` does
(google/fedjax, ``algorithms/fed_avg.py``). Flower's ``Strategy`` ABC is the model for its
size: ``configure`` (the per-site instructions), ``aggregate`` (results -> one update) and
``apply`` (update -> next state), plus the initial state and the MLflow params.

Privacy and secure aggregation compose around a strategy instead of subclassing it: under
secure aggregation the coordinator only ever learns the (weighted) sum, so the engine hands
``apply`` an :class:`AggregatedUpdate` built from that sum; a strategy whose ``aggregate``
needs every update in the clear (median, Krum, q-FedAvg, ...) says so with
``needs_individual_updates`` and is refused at config time under secure aggregation or
DP-FedAvg.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from fl_components.errors import ConfigError, RoundError
from fl_components.parameters import NDArrays
from fl_components.privacy.dp_fedavg import DPAggregate
from fl_components.site.training import LocalUpdate


@dataclass(frozen=True)
class AccountantStep:
    """One participant-level accounting step: ``steps`` rounds at (z, q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1


@dataclass(frozen=True)
class ServerState:
    """Everything a run needs to continue from the end of round ``round``.

    Attributes
    ----------
    round : int
        Rounds completed (0 before the first).
    parameters : NDArrays
        The global model θ_t (float32 arrays, state_dict order).
    strategy_state : Mapping[str, NDArrays]
        The strategy's own arrays: server-optimizer moments (``m``, ``v``), server momentum,
        SCAFFOLD's server control variate ``c``. Keyed by name.
    clip_norm : float or None
        The participant-level clip norm in force (adaptive clipping moves it).
    accountant_history : tuple of AccountantStep
        The participant-level accountant's history (Opacus RDP/PRV ``history`` shape).
    rng_state : Mapping[str, Any] or None
        numpy ``bit_generator.state`` of the coordinator's reproducible generator.
    """

    round: int
    parameters: NDArrays
    strategy_state: Mapping[str, NDArrays] = field(default_factory=dict)
    clip_norm: float | None = None
    accountant_history: tuple[AccountantStep, ...] = ()
    rng_state: Mapping[str, Any] | None = None

    def evolve(self, **changes: Any) -> ServerState:
        """A new state with ``changes`` applied (states are never mutated)."""
        return replace(self, **changes)

    def state_dict(self) -> dict[str, Any]:
        """A deep copy as plain types and numpy arrays (what a checkpoint stores)."""
        return {
            "round": self.round,
            "parameters": [np.array(p, dtype=np.float32, copy=True) for p in self.parameters],
            "strategy_state": {
                name: [np.array(a, copy=True) for a in arrays]
                for name, arrays in self.strategy_state.items()
            },
            "clip_norm": self.clip_norm,
            "accountant_history": [
                [s.noise_multiplier, s.sample_rate, s.steps] for s in self.accountant_history
            ],
            "rng_state": copy.deepcopy(dict(self.rng_state)) if self.rng_state else None,
        }

    @classmethod
    def load_state_dict(cls, state: Mapping[str, Any]) -> ServerState:
        """Inverse of :meth:`state_dict` (copies, so the two never share an array)."""
        return cls(
            round=int(state["round"]),
            parameters=[np.array(p, dtype=np.float32, copy=True) for p in state["parameters"]],
            strategy_state={
                str(name): [np.array(a, copy=True) for a in arrays]
                for name, arrays in state.get("strategy_state", {}).items()
            },
            clip_norm=None if state.get("clip_norm") is None else float(state["clip_norm"]),
            accountant_history=tuple(
                AccountantStep(float(z), float(q), int(n))
                for z, q, n in state.get("accountant_history", ())
            ),
            rng_state=copy.deepcopy(dict(state["rng_state"])) if state.get("rng_state") else None,
        )


@dataclass(frozen=True)
class SiteInstructions:
    """What one site is sent with its training job, beyond the global model.

    Attributes
    ----------
    proximal_mu : float
        FedProx's μ: local training adds (μ/2)‖θ − θ_t‖² (0: plain local SGD).
    server_control : NDArrays or None
        SCAFFOLD's server control variate c; the site keeps its own c_i in its folder and
        returns Δc_i in :attr:`LocalUpdate.control_delta`.
    report_initial_loss : bool
        Report F_k(θ_t), the loss of the received model on the training split, in
        :attr:`LocalUpdate.initial_loss` (q-FedAvg weighs by it).
    """

    proximal_mu: float = 0.0
    server_control: NDArrays | None = None
    report_initial_loss: bool = False


@dataclass(frozen=True)
class AggregatedUpdate:
    """The round's combined update, as ``apply`` consumes it.

    Attributes
    ----------
    delta : NDArrays
        Δ̄: the direction the server rule steps along (a weighted mean for FedAvg, a robust
        estimate for the robust rules, the noised mean under DP-FedAvg).
    participants : int
        How many results went into it.
    control_delta : NDArrays or None
        SCAFFOLD: (1/|S|) Σ_i Δc_i.
    metrics : Mapping[str, float]
        The rule's own per-round figures (``strategy/...``), logged with the round.
    private : DPAggregate or None
        DP-FedAvg's record of the round (clip norm, noise std, update norms), to account.
    """

    delta: NDArrays
    participants: int
    control_delta: NDArrays | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    private: DPAggregate | None = None


class Strategy(ABC):
    """A federated optimization rule: instructions out, results in, the next server state.

    Subclasses set :attr:`name` and implement :meth:`aggregate` and :meth:`apply`;
    :meth:`configure`, :meth:`initial_state` and :meth:`params` have sensible defaults.
    """

    name: ClassVar[str]
    needs_individual_updates: ClassVar[bool] = False
    """True when :meth:`aggregate` must see each update in the clear (no secure aggregation,
    no DP-FedAvg)."""

    def initial_state(self, parameters: NDArrays) -> ServerState:
        """The state before round 1 (no optimizer moments, no control variates)."""
        return ServerState(round=0, parameters=[np.array(p, copy=True) for p in parameters])

    def configure(
        self, round_num: int, state: ServerState, sites: Sequence[str]
    ) -> dict[str, SiteInstructions]:
        """Per-site instructions for round ``round_num`` (default: the same, empty, for all)."""
        return {site: SiteInstructions() for site in sites}

    @abstractmethod
    def aggregate(self, updates: Sequence[LocalUpdate], state: ServerState) -> AggregatedUpdate:
        """Combine the round's (valid) updates into one.

        Raises
        ------
        RoundError
            If ``updates`` is empty or cannot be combined.
        """

    def aggregate_sum(
        self, total: NDArrays, *, weight: float, participants: int, state: ServerState
    ) -> AggregatedUpdate:
        """Combine from a securely aggregated sum Σ_k w_k Δ_k and its weight Σ_k w_k.

        Secure aggregation hands the coordinator this sum alone; the default is the mean.

        Raises
        ------
        ConfigError
            If the rule needs each update in the clear (``needs_individual_updates``).
        RoundError
            If no weight was summed.
        """
        if self.needs_individual_updates:
            raise ConfigError(
                f"strategy {self.name!r} needs every update in the clear; it cannot run with "
                "secure_aggregation.enabled: true"
            )
        if weight <= 0:
            raise RoundError("secure aggregation summed no weight; nothing to average")
        mean = [(np.asarray(t, dtype=np.float64) / weight).astype(np.float32) for t in total]
        return AggregatedUpdate(delta=mean, participants=participants)

    @abstractmethod
    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """Return the next server state (round + 1) from ``state`` and the combined update."""

    def params(self) -> dict[str, str]:
        """The strategy's name and hyperparameters as MLflow params (``strategy.*``)."""
        return {"strategy.rule": self.name}
