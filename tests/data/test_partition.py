import numpy as np
import pytest

from fl_components.data.partition import label_skew, partition_labels
from fl_components.data.site_files import load_bundled
from fl_components.errors import ConfigError

LABELS = load_bundled("digits").labels


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "quantity_skew"])
def test_partitions_are_disjoint_and_complete(method: str) -> None:
    parts = partition_labels(LABELS, n_sites=10, method=method, rng=np.random.default_rng(0))

    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert len(joined) == len(LABELS)
    assert len(np.unique(joined)) == len(LABELS)
    assert all(len(p) >= 2 for p in parts)


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        parts = partition_labels(
            LABELS, n_sites=10, method="dirichlet", alpha=alpha, rng=np.random.default_rng(3)
        )
        skews.append(label_skew(LABELS, parts))

    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1


def test_iid_has_little_skew_and_shards_a_lot() -> None:
    iid = partition_labels(LABELS, n_sites=10, method="iid", rng=np.random.default_rng(0))
    shards = partition_labels(
        LABELS, n_sites=10, method="shards", shards_per_site=2, rng=np.random.default_rng(0)
    )

    assert label_skew(LABELS, iid) < 0.1
    assert label_skew(LABELS, shards) > 0.6
    assert all(len(np.unique(LABELS[p])) <= 4 for p in shards)


def test_quantity_skew_spreads_sizes() -> None:
    parts = partition_labels(
        LABELS, n_sites=10, method="quantity_skew", quantity_sigma=1.5, rng=np.random.default_rng(0)
    )
    sizes = sorted(len(p) for p in parts)

    assert sizes[-1] > 4 * sizes[0]


def test_same_seed_same_split() -> None:
    a = partition_labels(LABELS, n_sites=5, method="dirichlet", rng=np.random.default_rng(9))
    b = partition_labels(LABELS, n_sites=5, method="dirichlet", rng=np.random.default_rng(9))

    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_too_many_sites_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="cannot give each of 5 sites"):
        partition_labels(LABELS[:3], n_sites=5, method="iid", rng=np.random.default_rng(0))


def test_unknown_partitioner_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="iid, dirichlet, shards, quantity_skew"):
        partition_labels(LABELS, n_sites=2, method="zipf", rng=np.random.default_rng(0))
