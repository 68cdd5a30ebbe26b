"""Partitioners: how one labelled pool is split among sites to simulate a federation.

- IID: a uniform random split.
- Dirichlet over labels: for each class, site shares ~ Dir(alpha) (Hsu, Qi & Brown 2019,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", arXiv:1909.06335); lower alpha, more skew.
- Pathological shards: each site holds ``k`` labels (McMahan et al. 2017, AISTATS,
  arXiv:1602.05629, Sec. 3).
- Quantity skew: IID labels, site sizes log-normal (Li et al. 2022, ICDE, arXiv:2102.02079).

Every partitioner returns disjoint index arrays that together cover the pool, and gives
each site at least one example.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fl_components.data.types import Split
from fl_components.errors import ConfigError

IndexArray = npt.NDArray[np.int64]


def partition_labels(
    labels: npt.NDArray[np.int64],
    *,
    n_sites: int,
    method: str,
    alpha: float = 0.5,
    shards_per_site: int = 2,
    quantity_sigma: float = 1.0,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Split example indices among ``n_sites`` sites by ``method``."""
    if n_sites < 1:
        raise ConfigError(f"need at least one site (got {n_sites})")
    if len(labels) < n_sites:
        raise ConfigError(
            f"{len(labels)} examples cannot give each of {n_sites} sites one; use fewer sites"
        )
    if method == "iid":
        parts = iid(len(labels), n_sites=n_sites, rng=rng)
    elif method == "dirichlet":
        parts = dirichlet(labels, n_sites=n_sites, alpha=alpha, rng=rng)
    elif method == "shards":
        parts = shards(labels, n_sites=n_sites, shards_per_site=shards_per_site, rng=rng)
    elif method == "quantity_skew":
        parts = quantity_skew(len(labels), n_sites=n_sites, sigma=quantity_sigma, rng=rng)
    else:
        raise ConfigError(
            "data.partitioner must be one of iid, dirichlet, shards, quantity_skew "
            f"(got {method!r})"
        )
    return _ensure_nonempty(parts, rng=rng)


def iid(n: int, *, n_sites: int, rng: np.random.Generator) -> list[IndexArray]:
    """Uniform random split into near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), n_sites)]


def dirichlet(
    labels: npt.NDArray[np.int64], *, n_sites: int, alpha: float, rng: np.random.Generator
) -> list[IndexArray]:
    """Per class, give sites shares drawn from Dir(alpha)."""
    buckets: list[list[int]] = [[] for _ in range(n_sites)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, chunk in enumerate(np.split(members, cuts)):
            buckets[site].extend(chunk.tolist())
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]


def shards(
    labels: npt.NDArray[np.int64], *, n_sites: int, shards_per_site: int, rng: np.random.Generator
) -> list[IndexArray]:
    """Sort by label, cut into ``n_sites * shards_per_site`` shards, deal them out."""
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_sites * shards_per_site)
    dealt = rng.permutation(len(pieces))
    return [
        np.sort(np.concatenate([pieces[j] for j in dealt[s::n_sites]])).astype(np.int64)
        for s in range(n_sites)
    ]


def quantity_skew(
    n: int, *, n_sites: int, sigma: float, rng: np.random.Generator
) -> list[IndexArray]:
    """IID labels; site sizes proportional to log-normal draws."""
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=n_sites)
    cuts = (np.cumsum(weights / weights.sum())[:-1] * n).astype(int)
    return [np.sort(part).astype(np.int64) for part in np.split(rng.permutation(n), cuts)]


def _ensure_nonempty(parts: list[IndexArray], *, rng: np.random.Generator) -> list[IndexArray]:
    """Move single examples from the largest site to empty ones (keeps disjoint + complete)."""
    parts = [p.copy() for p in parts]
    for site, part in enumerate(parts):
        while len(part) < 2:
            donor = int(np.argmax([len(p) for p in parts]))
            if len(parts[donor]) <= 2:
                break
            pick = int(rng.integers(len(parts[donor])))
            part = np.sort(np.append(part, parts[donor][pick]))
            parts[donor] = np.delete(parts[donor], pick)
        parts[site] = part
    return parts


def label_skew(labels: npt.NDArray[np.int64], parts: list[IndexArray]) -> float:
    """Mean total-variation distance between each site's label mix and the pool's (0 = IID)."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for part in parts:
        site_labels = labels[part]
        mix = np.array([(site_labels == c).mean() for c in classes])
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def split_holdout(
    split: Split, *, fraction: float, rng: np.random.Generator
) -> tuple[Split, Split]:
    """Split off a random ``fraction`` of ``split`` (at least one example each side)."""
    n = len(split)
    n_test = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    order = rng.permutation(n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    return (
        Split(split.features[train_idx], split.labels[train_idx]),
        Split(split.features[test_idx], split.labels[test_idx]),
    )
