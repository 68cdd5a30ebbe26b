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

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fl_components.errors import ConfigError, RoundError
from fl_components.parameters import NDArrays
from fl_components.round.types import AggregatedUpdate, LocalUpdate, ServerState, SiteInstructions
from fl_components.strategies.aggregation import MeanFold


class Strategy(ABC):
    """A federated optimization rule: instructions out, results in, the next server state.

    Subclasses set :attr:`name` and implement :meth:`aggregate` and :meth:`apply`;
    :meth:`configure`, :meth:`initial_state` and :meth:`params` have sensible defaults.
    """

    name: ClassVar[str]
    needs_individual_updates: bool = False
    """True when :meth:`aggregate` must see each update in the clear (no secure aggregation,
    no DP-FedAvg); an instance may set its own (FedAvg's follows its aggregation step)."""

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
        self,
        total: Sequence[npt.NDArray[np.floating]],
        *,
        weight: float,
        participants: int,
        state: ServerState,
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

    def fold(self, state: ServerState) -> MeanFold | None:
        """A fold that combines the round's updates one at a time as they arrive, or None.

        Streaming aggregation: when the rule is a mean, the engine folds each valid update
        into the running sum and drops it, so the coordinator never holds every update; it
        then calls :meth:`aggregate_folded`. The default (None) hands :meth:`aggregate` the
        whole list, for rules that need every update.
        """
        return None

    def aggregate_folded(self, fold: MeanFold, state: ServerState) -> AggregatedUpdate:
        """The combined update from a :meth:`fold` every valid update went into."""
        return AggregatedUpdate(delta=fold.result(), participants=fold.participants)

    def check_memory(self, updates: int, state: ServerState) -> None:
        """Refuse, before dispatch, a round whose aggregation would hold too much (default: ok).

        Raises
        ------
        ConfigError
            Naming the setting that bounds it and the fix.
        """
        del updates, state  # nothing to bound: the default rule streams

    @abstractmethod
    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """Return the next server state (round + 1) from ``state`` and the combined update."""

    def params(self) -> dict[str, str]:
        """The strategy's name and hyperparameters as MLflow params (``strategy.*``)."""
        return {"strategy.rule": self.name}
