"""DP-FedAvg as a wrapper around any strategy whose aggregate is a mean.

McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent Language
Models", ICLR, arXiv:1710.06963, Algorithm 1: clip each participant's update to L2 norm S,
add N(0, z² S² I) to the sum, divide by the (fixed) expected count. As Flower's
``DifferentialPrivacyServerSideFixedClipping(strategy, ...)`` does, the wrapper replaces only
the aggregation; a function of the round's ``ServerState`` (the adapted clip norm rides in it)
and the config, it keeps nothing between rounds. The inner strategy still says what sites
are sent and how the server steps (so DP-FedAvg composes with FedAvgM or FedAdam: the
server optimizer is post-processing).

Under secure aggregation each site clips and adds its share of the noise before masking
(:func:`fl_components.secure_aggregation.site_stages.prepare_update`); the wrapper then only
records the round.
The participant-level accountant is stepped by the coordinator when the round begins,
before any site is sent anything (:meth:`fl_components.privacy.rounds.PrivacyRounds.charge`),
so a round cut short by a crash is spent all the same; its history is checkpointed and a
resumed run goes on with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.parameters import NDArrays
from fl_components.privacy.dp_fedavg import DPAggregate, SecureRandom
from fl_components.privacy.participant_round import (
    clip_norm_in_force,
    fixed_denominator,
    private_mean,
)
from fl_components.round.types import AggregatedUpdate, LocalUpdate, ServerState, SiteInstructions
from fl_components.strategies.base import Strategy


class DPFedAvg(Strategy):
    """Clip and noise the updates (DP-FedAvg), then let ``inner`` configure and apply."""

    name = "dp-fedavg"

    def __init__(
        self, inner: Strategy, config: FederationConfig, *, rng: SecureRandom | None = None
    ) -> None:
        if inner.needs_individual_updates:
            raise ConfigError(
                f"strategy {inner.name!r} combines updates one by one, which DP-FedAvg's "
                "noised mean replaces; use privacy.mode 'record' or 'off', or a mean-based "
                "strategy"
            )
        self.inner = inner
        self.config = config
        self.rng = rng if rng is not None else SecureRandom()  # the OS's CSPRNG unless given

    def initial_state(self, parameters: NDArrays) -> ServerState:
        """The inner strategy's initial state."""
        return self.inner.initial_state(parameters)

    def configure(
        self, round_num: int, state: ServerState, sites: Sequence[str]
    ) -> dict[str, SiteInstructions]:
        """What the inner strategy sends."""
        return self.inner.configure(round_num, state, sites)

    def aggregate(self, updates: Sequence[LocalUpdate], state: ServerState) -> AggregatedUpdate:
        """Clip each update to S, add N(0, z² S²) to the sum, average (no retry: fresh noise).

        S is the clip norm in force for the round ``state`` starts (adapted so far, carried
        in ``ServerState.clip_norm``; privacy.clip_norm before the first adaptation).
        """
        dp = private_mean(
            self.config,
            list(updates),
            clip_norm=clip_norm_in_force(self.config, state),
            rng=self.rng,
        )
        return AggregatedUpdate(delta=dp.mean_update, participants=len(updates), private=dp)

    def aggregate_sum(
        self,
        total: Sequence[npt.NDArray[np.floating]],
        *,
        weight: float,
        participants: int,
        state: ServerState,
    ) -> AggregatedUpdate:
        """The sites clipped and noised before masking: the mean of the sum, recorded.

        Under Poisson selection the sum is divided by the fixed denominator q·N (McMahan
        et al. 2018, f̃_f), not by the weight that came back.
        """
        denominator = fixed_denominator(self.config)
        mean = self.inner.aggregate_sum(
            total,
            weight=weight if denominator is None else denominator,
            participants=participants,
            state=state,
        )
        privacy = self.config.privacy
        dp = DPAggregate(
            mean_update=mean.delta,
            clip_norm=privacy.clip_norm,
            noise_std=privacy.client_noise_multiplier * privacy.clip_norm,
            clipped=None,  # the sites clip under secure aggregation: unknown here
            norms=(),
        )
        return AggregatedUpdate(delta=mean.delta, participants=participants, private=dp)

    def apply(self, state: ServerState, update: AggregatedUpdate) -> ServerState:
        """The inner strategy's step."""
        return self.inner.apply(state, update)

    def params(self) -> dict[str, str]:
        """The inner strategy's params, and that DP-FedAvg wraps it."""
        return {**self.inner.params(), "strategy.wrapper": self.name}
