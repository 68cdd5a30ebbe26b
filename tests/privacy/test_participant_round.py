"""DP-FedAvg as a function of the round's ServerState and the config (no shared state)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fl_components.config import FederationConfig, config_from_dict
from fl_components.privacy.dp_fedavg import SecureRandom, dp_fedavg_aggregate
from fl_components.privacy.participant_round import (
    clip_norm_in_force,
    fixed_denominator,
    next_clip_norm,
    private_mean,
)
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.round.types import LocalUpdate
from fl_components.strategies import FedAvg
from fl_components.strategies.private import DPFedAvg

KEY = bytes(range(32))


def _config(**privacy: object) -> FederationConfig:
    return config_from_dict(
        {
            "name": "dp-state",
            "sites": [{"name": f"site-{i}"} for i in range(5)],
            "participation": {"fraction": 0.6, "min_participants": 2},
            "privacy": {
                "mode": "participant",
                "clip_norm": 1.0,
                "client_noise_multiplier": 1.0,
                **privacy,
            },
        }
    )


def _updates(n: int) -> list[LocalUpdate]:
    return [
        LocalUpdate(
            site=f"site-{i}",
            round=1,
            delta=[np.full(4, 3.0, dtype=np.float32)],
            num_examples=10,
            train_loss=0.0,
            seconds=0.0,
        )
        for i in range(n)
    ]


def test_the_wrapper_clips_to_the_norm_the_state_carries() -> None:
    config = _config(adaptive_clipping=True)
    strategy = DPFedAvg(FedAvg(), config, rng=SecureRandom(KEY))
    state = strategy.initial_state([np.zeros(4, dtype=np.float32)]).evolve(clip_norm=0.25)

    result = strategy.aggregate(_updates(3), state)

    assert result.private is not None and result.private.clip_norm == 0.25
    # the same round by hand: C from the state, the same key, the config's z and q·N
    by_hand = dp_fedavg_aggregate(
        [u.delta for u in _updates(3)],
        clip_norm=0.25,
        noise_multiplier=PrivacyRounds(config).update_noise_multiplier(3),
        rng=SecureRandom(KEY),
        denominator=fixed_denominator(config),
    )
    np.testing.assert_array_equal(result.delta[0], by_hand.mean_update[0])


def test_the_wrapper_releases_the_private_mean_at_the_state_s_clip_norm() -> None:
    """The wrapper's round is the private mean at the clip norm the state carries."""
    config = _config(adaptive_clipping=True, sampling="random")
    strategy = DPFedAvg(FedAvg(), config, rng=SecureRandom(KEY))
    state = strategy.initial_state([np.zeros(4, dtype=np.float32)]).evolve(clip_norm=0.7)

    np.testing.assert_array_equal(
        strategy.aggregate(_updates(3), state).delta[0],
        private_mean(config, _updates(3), clip_norm=0.7, rng=SecureRandom(KEY)).mean_update[0],
    )


def test_the_clip_norm_moves_only_with_adaptive_clipping_and_known_norms() -> None:
    """next_clip_norm: C' = C exp(-eta (b - gamma)) with the noised count; else C stays."""
    adaptive = _config(adaptive_clipping=True, sampling="random")
    result = private_mean(adaptive, _updates(3), clip_norm=0.7, rng=SecureRandom(KEY))
    moved = next_clip_norm(adaptive, 0.7, result, rng=SecureRandom(KEY))
    assert moved != 0.7 and moved > 0
    assert next_clip_norm(adaptive, 0.7, result, rng=SecureRandom(KEY)) == moved  # same key
    fixed = _config()
    assert next_clip_norm(fixed, 0.7, result, rng=SecureRandom(KEY)) == 0.7
    masked = replace(result, norms=())  # under secure aggregation the sites clip
    assert next_clip_norm(adaptive, 0.7, masked, rng=SecureRandom(KEY)) == 0.7


def test_before_any_adaptation_the_config_s_clip_norm_is_in_force() -> None:
    config = _config()
    state = DPFedAvg(FedAvg(), config).initial_state([np.zeros(4, dtype=np.float32)])

    assert state.clip_norm is None
    assert clip_norm_in_force(config, state) == 1.0
    assert clip_norm_in_force(config, state.evolve(clip_norm=0.3)) == pytest.approx(0.3)


def test_poisson_selection_divides_by_the_fixed_expected_count() -> None:
    assert fixed_denominator(_config(sampling="random")) == pytest.approx(0.6 * 5)
    assert fixed_denominator(_config(sampling="fixed")) is None
