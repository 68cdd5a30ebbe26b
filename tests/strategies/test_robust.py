"""Robust aggregation rules against hand-worked values, with f attackers among the updates."""

import numpy as np
import pytest

from fl_components.errors import RoundError
from fl_components.round.types import LocalUpdate
from fl_components.strategies.aggregation import UpdateAggregation, bound_norm
from fl_components.strategies.krum import bulyan, krum, krum_scores, multi_krum
from fl_components.strategies.robust import coordinate_median, trimmed_mean, weighted_mean


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_weighted_mean_hand_worked() -> None:
    # (1*[1, 2] + 3*[5, -2]) / 4 = [4, -1]
    np.testing.assert_allclose(weighted_mean([vec(1, 2), vec(5, -2)], [1, 3]), [4, -1])


def test_median_ignores_one_attacker_and_its_weight() -> None:
    honest = [vec(1.0, 2.0), vec(1.2, 1.8), vec(0.8, 2.2)]
    attacker = vec(100.0, -100.0)
    # coord 0 sorted: 0.8 1.0 1.2 100 -> (1.0 + 1.2)/2; coord 1: -100 1.8 2.0 2.2 -> 1.9
    result = coordinate_median([*honest, attacker], [1, 1, 1, 10_000])
    np.testing.assert_allclose(result, [1.1, 1.9], rtol=1e-6)


def test_trimmed_mean_cuts_beta_n_at_each_end() -> None:
    # n = 5, beta = 0.2 -> cut 1 each side: [1 2 3 4 1000] -> mean(2, 3, 4) = 3
    updates = [vec(1), vec(2), vec(3), vec(4), vec(1000)]
    np.testing.assert_allclose(trimmed_mean(updates, [1] * 5, beta=0.2), [3.0])
    # the plain mean would have been 202
    np.testing.assert_allclose(weighted_mean(updates, [1] * 5), [202.0])


def test_krum_scores_and_pick_hand_worked() -> None:
    # n = 5, f = 1: each score sums the n - f - 2 = 2 nearest squared distances
    # 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 4: 4 + 9 = 13; 100: 96² + 98²
    updates = [vec(0), vec(1), vec(2), vec(4), vec(100)]
    matrix = np.stack(updates).astype(np.float64)
    np.testing.assert_allclose(krum_scores(matrix, f=1), [5, 2, 5, 13, 96**2 + 98**2])
    np.testing.assert_allclose(krum(updates, [1] * 5, f=1), [1.0])


def test_multi_krum_averages_the_m_lowest_scores() -> None:
    updates = [vec(0), vec(1), vec(2), vec(4), vec(100)]
    # m = 3: scores 2, 5, 5 -> mean(1, 0, 2) = 1; m = n - f = 4 adds 4 -> 7/4
    np.testing.assert_allclose(multi_krum(updates, [1] * 5, f=1, m=3), [1.0])
    np.testing.assert_allclose(multi_krum(updates, [1] * 5, f=1, m=None), [1.75])
    with pytest.raises(RoundError, match="multi_krum_m = 6"):
        multi_krum(updates, [1] * 5, f=1, m=6)


def test_krum_refuses_too_few_updates() -> None:
    with pytest.raises(RoundError, match=r"n >= 2f \+ 3 = 5"):
        krum([vec(0), vec(1), vec(2), vec(3)], [1] * 4, f=1)


def test_bulyan_hand_worked_drops_the_attacker() -> None:
    # n = 7, f = 1: theta = 5 picks by repeated Krum: 2, 3, 1, 4, 0 (100 never);
    # median of {0..4} = 2, beta = 3 nearest: 2, 1, 3 -> mean 2
    updates = [vec(v) for v in (0, 1, 2, 3, 4, 5, 100)]
    np.testing.assert_allclose(bulyan(updates, [1] * 7, f=1), [2.0])


def test_bulyan_two_dimensional_with_two_attackers() -> None:
    rng = np.random.default_rng(0)
    honest = [vec(1.0, -1.0) + rng.normal(0, 0.01, 2).astype(np.float32) for _ in range(9)]
    attackers = [vec(-50.0, 50.0), vec(40.0, 40.0)]
    result = bulyan([*honest, *attackers], [1] * 11, f=2)  # n = 11 = 4f + 3
    np.testing.assert_allclose(result, [1.0, -1.0], atol=0.02)


def test_bulyan_needs_4f_plus_3() -> None:
    with pytest.raises(RoundError, match=r"n >= 4f \+ 3 = 7 updates \(got 6\)"):
        bulyan([vec(v) for v in range(6)], [1] * 6, f=1)


@pytest.mark.parametrize(
    "rule",
    [
        lambda v, w: weighted_mean(v, w),
        lambda v, w: coordinate_median(v, w),
        lambda v, w: trimmed_mean(v, w, beta=0.1),
        lambda v, w: krum(v, w, f=0),
        lambda v, w: multi_krum(v, w, f=0, m=None),
        lambda v, w: bulyan(v, w, f=0),
    ],
)
def test_every_rule_refuses_zero_updates(rule) -> None:
    with pytest.raises(RoundError, match="zero updates"):
        rule([], [])


def test_bound_norm_scales_only_above_the_bound() -> None:
    # ‖([3], [4])‖ = 5 -> bound 1 scales by 1/5; bound 10 leaves it
    delta = [vec(3.0), vec(4.0)]
    np.testing.assert_allclose(np.concatenate(bound_norm(delta, 1.0)), [0.6, 0.8], rtol=1e-6)
    kept = bound_norm(delta, 10.0)
    np.testing.assert_array_equal(np.concatenate(kept), [3.0, 4.0])
    assert not np.shares_memory(kept[0], delta[0])
    with pytest.raises(RoundError, match="norm_bound must be > 0"):
        bound_norm(delta, 0.0)


def update(site: str, *values: float, n: int = 1) -> LocalUpdate:
    return LocalUpdate(
        site=site, round=1, delta=[vec(*values)], num_examples=n, train_loss=0.0, seconds=0.0
    )


def test_aggregation_bounds_norms_before_the_mean() -> None:
    # the scaled-x10 attacker [30, 40] is cut to norm 5: [3, 4]; mean of [3,4],[3,4] = [3, 4]
    step = UpdateAggregation(rule="mean", norm_bound=5.0)
    delta, metrics = step.combine([update("a", 3, 4), update("b", 30, 40)])
    np.testing.assert_allclose(delta[0], [3.0, 4.0], rtol=1e-6)
    assert metrics == {"strategy/norm_bounded": 1.0}
    assert not step.needs_individual_updates


def test_aggregation_refuses_unknown_rule() -> None:
    with pytest.raises(RoundError, match=r"strategy\.aggregator must be one of"):
        UpdateAggregation(rule="geomed")
