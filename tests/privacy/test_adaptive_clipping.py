"""Adaptive clipping's noised count is the mechanism its accounting assumes.

Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping", NeurIPS, arXiv:1905.03871, Section 3.1 / Theorem 1: with centred bits b - ½
(sensitivity ½) normalised by the expected cohort m, the update noise z_Δ and the count
noise σ_b compose to exactly z.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_components.privacy.dp_fedavg import (
    SecureRandom,
    adaptive_clip_norm,
    combined_noise_multiplier,
    update_noise_multiplier,
)

ETA, GAMMA = 0.2, 0.5


def _fraction(
    norms: tuple[float, ...], *, expected: float, std: float = 0.0, key: int = 0
) -> float:
    """b̃ as released: read back from C' = C exp(-η (b̃ - γ)) with C = 1."""
    after = adaptive_clip_norm(
        1.0,
        norms=norms,
        target_quantile=GAMMA,
        learning_rate=ETA,
        count_noise_std=std,
        expected_count=expected,
        rng=SecureRandom(key.to_bytes(32, "big")),
    )
    return GAMMA - math.log(after) / ETA


@pytest.mark.parametrize("z", [0.6, 1.0, 1.5])
@pytest.mark.parametrize("sigma_b", [1.0, 1.5, 5.0])
def test_update_and_count_noise_compose_to_z(z: float, sigma_b: float) -> None:
    z_update = update_noise_multiplier(z, count_noise_std=sigma_b)

    assert z_update > z
    assert combined_noise_multiplier(z_update, count_noise_std=sigma_b) == pytest.approx(z)
    # the figures: sigma_b 1.5, z 1 -> z_update 1.0607
    if (z, sigma_b) == (1.0, 1.5):
        assert z_update == pytest.approx(1.0607, abs=1e-4)


@pytest.mark.parametrize("cohort", [5, 20, 35])
def test_one_participant_moves_the_released_fraction_by_half_over_expected(cohort: int) -> None:
    # whatever the actual cohort, one more participant moves the centred count by ½ and the
    # released fraction by ½ / m: the sensitivity the identity is for
    expected = 20.0
    clipped = (5.0,) * cohort

    joined_unclipped = _fraction((*clipped, 0.5), expected=expected) - _fraction(
        clipped, expected=expected
    )
    joined_clipped = _fraction((*clipped, 5.0), expected=expected) - _fraction(
        clipped, expected=expected
    )

    assert joined_unclipped == pytest.approx(0.5 / expected)
    assert joined_clipped == pytest.approx(-0.5 / expected)


def test_the_count_noise_on_the_fraction_is_sigma_b_over_expected() -> None:
    expected, sigma_b = 20.0, 1.5
    draws = np.array(
        [_fraction((0.5, 5.0), expected=expected, std=sigma_b, key=k) for k in range(4000)]
    )

    # noiseless: (1 - 1) centred, so b̃ = ½
    assert draws.mean() == pytest.approx(0.5, abs=4 * sigma_b / expected / math.sqrt(4000))
    assert draws.std() == pytest.approx(sigma_b / expected, rel=0.05)
