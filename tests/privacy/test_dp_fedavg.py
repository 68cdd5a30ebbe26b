from __future__ import annotations

import numpy as np
import pytest

from fl_components.privacy.accounting import ParticipantAccountant
from fl_components.privacy.dp_fedavg import (
    SecureRandom,
    adaptive_clip_norm,
    clip_update,
    dp_fedavg_aggregate,
    global_norm,
    participant_noise,
)


def test_clip_bounds_the_norm_and_keeps_small_updates() -> None:
    big = [np.full((10, 10), 3.0, dtype=np.float32), np.ones(5, dtype=np.float32)]
    clipped, norm = clip_update(big, 2.0)
    assert norm == pytest.approx(np.sqrt(900 + 5))
    assert global_norm(clipped) == pytest.approx(2.0, rel=1e-5)
    small = [np.full(4, 0.1, dtype=np.float32)]
    assert np.array_equal(clip_update(small, 2.0)[0][0], small[0])


def test_noise_of_the_expected_scale_is_in_a_participant_level_update() -> None:
    # three participants whose updates are zero: what the mean carries is the noise alone
    updates = [[np.zeros((200, 500), dtype=np.float32)] for _ in range(3)]
    result = dp_fedavg_aggregate(
        updates, clip_norm=0.5, noise_multiplier=1.2, rng=SecureRandom(bytes(32))
    )
    noise_on_sum = result.mean_update[0] * 3
    assert noise_on_sum.mean() == pytest.approx(0.0, abs=0.01)
    # 100k draws: the sample std is within 1% of z * C = 0.6
    assert noise_on_sum.std() == pytest.approx(0.6, rel=0.01)


def test_clipped_updates_plus_noise_average_to_the_clipped_mean() -> None:
    direction = np.ones(50_000, dtype=np.float64) / np.sqrt(50_000)
    updates = [[10.0 * direction], [0.5 * direction]]
    result = dp_fedavg_aggregate(
        updates, clip_norm=1.0, noise_multiplier=0.0001, rng=SecureRandom(bytes(32))
    )
    assert result.clipped == 1
    assert global_norm(result.mean_update) == pytest.approx((1.0 + 0.5) / 2, rel=1e-3)


def test_participant_noise_shares_sum_to_the_full_variance() -> None:
    rng = SecureRandom(bytes(32))
    shares = [participant_noise((100_000,), variance_share=400.0, rng=rng) for _ in range(5)]
    total = np.sum(shares, axis=0)
    assert total.dtype == np.int64
    assert total.var() == pytest.approx(5 * 400.0, rel=0.02)


def test_adaptive_clipping_moves_toward_the_target_quantile() -> None:
    rng = SecureRandom(bytes(32))
    grown = adaptive_clip_norm(
        1.0,
        norms=(5.0,) * 100,
        target_quantile=0.5,
        learning_rate=0.2,
        count_noise_std=0.0,
        expected_count=100,
        rng=rng,
    )
    shrunk = adaptive_clip_norm(
        1.0,
        norms=(0.1,) * 100,
        target_quantile=0.5,
        learning_rate=0.2,
        count_noise_std=0.0,
        expected_count=100,
        rng=rng,
    )
    assert grown == pytest.approx(np.exp(0.1))
    assert shrunk == pytest.approx(np.exp(-0.1))


def test_fixed_selection_accounts_q_one_over_joined_rounds() -> None:
    random_sel = ParticipantAccountant(sampling="random", accountant="rdp", fraction=0.1)
    fixed_sel = ParticipantAccountant(sampling="fixed", accountant="rdp", fraction=0.1)
    for round_num in range(20):
        chosen = tuple(f"d{(round_num * 10 + i) % 100}" for i in range(10))
        random_sel.step(noise_multiplier=1.0, selected=chosen)
        fixed_sel.step(noise_multiplier=1.0, selected=chosen)
    assert random_sel.epsilon(1e-3) < fixed_sel.epsilon(1e-3)
    assert "q = 1" in fixed_sel.amplification
    from fl_components.privacy.ledger import epsilon_of

    # each device joined 2 of the 20 rounds: q = 1 over those 2 rounds
    assert fixed_sel.epsilon(1e-3) == pytest.approx(
        epsilon_of([(1.0, 1.0, 2)], delta=1e-3, accountant="rdp")
    )
