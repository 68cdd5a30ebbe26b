"""Federated statistics equal pooled numpy statistics, in the clear and under secure aggregation."""

from __future__ import annotations

import numpy as np

from fl_components.data.statistics import (
    LIMBS,
    FederationStats,
    SiteSums,
    add_sums,
    from_limb_sums,
    site_sums,
    to_limbs,
)
from fl_components.data.types import Split
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
    encoded = {
        site: to_limbs(site_sums(split, n_classes=3))
        for site, split in zip(federation.sites, splits, strict=True)
    }
    # quantizer scale 1: each 16-bit digit d travels as d - c and comes back exactly
    ctx = federation.context(dimension=(1 + 2 * 3 + 3) * LIMBS, clip_range=(2**30 - 1) / 2, bits=30)

    result = federation.run_round(ctx, {s: d - ctx.clip_range for s, d in encoded.items()})
    total = from_limb_sums(result.total + result.count * ctx.clip_range, n_features=3, n_classes=3)
    stats = FederationStats.from_sums(total)

    mean, std, counts = _pooled(splits)
    assert stats.count == 3320 and stats.label_counts.tolist() == counts.tolist()
    # each site's sums are rounded to 2^-24 (the fixed point): the mean is off by less
    # than sites * 2^-25 / rows
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=4 * 2**-25 / 3320)
    np.testing.assert_allclose(stats.std, std, rtol=1e-6)


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
