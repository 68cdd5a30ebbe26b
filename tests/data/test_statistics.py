"""Federated statistics equal pooled numpy statistics, in the clear and under secure aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from fl_components.data.statistics import (
    FederationStats,
    SiteSums,
    add_sums,
    decode_secure_sum,
    encode_for_secure_sum,
    site_sums,
)
from fl_components.data.types import Split
from fl_components.errors import DataError
from tests.secure_aggregation.federation import Federation


def _sites(seed: int = 0) -> list[Split]:
    rng = np.random.default_rng(seed)
    sizes, splits = (300, 900, 120, 2000), []
    for i, rows in enumerate(sizes):  # unscaled, and each site centred elsewhere
        x = rng.normal(loc=[50 + 10 * i, -3, 0.01], scale=[15, 2, 0.001], size=(rows, 3))
        splits.append(Split(x.astype(np.float32), rng.integers(0, 3, rows)))
    return splits


def _pooled(splits: list[Split]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.concatenate([s.features for s in splits]).astype(np.float64)
    y = np.concatenate([s.labels for s in splits])
    return x.mean(axis=0), x.std(axis=0), np.bincount(y, minlength=3)


def test_summed_site_statistics_give_the_pooled_mean_and_std() -> None:
    splits = _sites()

    stats = FederationStats.from_sums(add_sums(site_sums(s, n_classes=3) for s in splits))

    mean, std, counts = _pooled(splits)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=1e-6)
    assert stats.count == 3320 and stats.label_counts.tolist() == counts.tolist()


def test_under_secure_aggregation_only_the_sum_is_learnt_and_it_is_the_pooled_one() -> None:
    splits = _sites(seed=1)
    federation = Federation.make(len(splits))
    bound = 2e7  # above every site's largest statistic (a sum of squares, ~1.3e7)
    encoded = {
        site: encode_for_secure_sum(site_sums(split, n_classes=3), bound=bound, site=site)
        for site, split in zip(federation.sites, splits, strict=True)
    }
    ctx = federation.context(dimension=len(next(iter(encoded.values()))), clip_range=1.0)

    result = federation.run_round(ctx, encoded)
    total = decode_secure_sum(result.total, bound=bound, n_features=3, n_classes=3)
    stats = FederationStats.from_sums(total)

    mean, std, counts = _pooled(splits)
    assert stats.count == 3320 and stats.label_counts.tolist() == counts.tolist()
    # error of each summed statistic <= error_bound * bound (secure aggregation's quantization)
    slack = result.error_bound * bound
    assert slack < 0.5  # so counts round back exactly
    n = 3320
    np.testing.assert_allclose(stats.mean, mean, atol=slack / n + 1e-9)
    # var = S2/n - mean^2: each of S1, S2 off by <= slack, float32 inputs add ~1e-6 relative
    var_error = slack / n + 2 * np.abs(mean) * slack / n + (slack / n) ** 2
    np.testing.assert_array_less(np.abs(stats.std**2 - std**2), var_error + 1e-6 * std**2)


def test_a_statistic_over_the_bound_is_refused_not_clipped() -> None:
    sums = site_sums(_sites()[0], n_classes=3)

    with pytest.raises(DataError) as error:
        encode_for_secure_sum(sums, bound=1e4, site="east")

    message = str(error.value)
    assert message.startswith("site 'east': ") and "exceed the public bound 10000" in message
    assert "sum of column 0" in message and "raise the bound" in message
    assert f"{sums.sums[0]:g}" not in message  # the value itself stays at the site


def test_federation_standardized_sites_share_one_scale() -> None:
    splits = _sites()
    stats = FederationStats.from_sums(add_sums(site_sums(s, n_classes=3) for s in splits))

    scaled = [stats.standardize(s) for s in splits]

    pooled = np.concatenate([s.features for s in scaled]).astype(np.float64)
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(pooled.std(axis=0), 1.0, atol=1e-4)


def test_sums_vector_round_trips() -> None:
    sums = SiteSums(4.0, np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([1.0, 3.0]))

    again = SiteSums.from_vector(sums.vector(), n_features=2, n_classes=2)

    np.testing.assert_array_equal(again.vector(), sums.vector())
