"""Site data: bundled scikit-learn sets, a site's own files, and site folders on disk.

A site folder holds ``train.<ext>`` and ``test.<ext>`` (``.npz``, ``.csv`` or ``.parquet``);
the held-out ``test`` split is what federated evaluation scores. Nothing here moves data
between sites: each site reads only its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fl_components.errors import DataError
from fl_components.partition import partition_labels

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]

SUPPORTED_SUFFIXES = (".npz", ".csv", ".parquet")


@dataclass(frozen=True)
class Split:
    """Features (n, d) float32 and integer labels (n,)."""

    features: FloatArray
    labels: LabelArray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SiteData:
    """A site's training split and held-out split."""

    name: str
    train: Split
    test: Split


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know of the data: input width and number of classes."""

    n_features: int
    n_classes: int


def load_bundled(name: str) -> Split:
    """Load a data set shipped with scikit-learn, features scaled to [0, 1] per column.

    Scaling uses only per-feature min/max of the bundled set, a public fact about the
    instrument's range (digits: 0-16), not a statistic a real site would have to share.
    """
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }
    if name not in loaders:
        raise DataError(f"unknown bundled dataset {name!r}; choose one of {sorted(loaders)}")
    bunch = loaders[name]()
    features = np.asarray(bunch.data, dtype=np.float32)
    low, high = features.min(axis=0), features.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    features = (features - low) / span
    return Split(features.astype(np.float32), np.asarray(bunch.target, dtype=np.int64))


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


def partition_bundled(
    *,
    dataset: str,
    site_names: tuple[str, ...],
    partitioner: str,
    alpha: float,
    shards_per_site: int,
    quantity_sigma: float,
    test_fraction: float,
    site_test_fraction: float,
    seed: int,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
) -> tuple[list[SiteData], Split]:
    """Split a bundled set into a central test split and one :class:`SiteData` per site.

    ``dataset='synthetic'`` generates Synthetic(α, β) instead, one device per site
    (:func:`synthetic_sites`); the partitioner is not used then.
    """
    rng = np.random.default_rng(seed)
    if dataset == "synthetic":
        return synthetic_sites(
            site_names=site_names,
            alpha=synthetic_alpha,
            beta=synthetic_beta,
            test_fraction=test_fraction,
            site_test_fraction=site_test_fraction,
            rng=rng,
        )
    full = load_bundled(dataset)
    pool, central_test = split_holdout(full, fraction=test_fraction, rng=rng)
    parts = partition_labels(
        pool.labels,
        n_sites=len(site_names),
        method=partitioner,
        alpha=alpha,
        shards_per_site=shards_per_site,
        quantity_sigma=quantity_sigma,
        rng=rng,
    )
    sites = []
    for name, indices in zip(site_names, parts, strict=True):
        own = Split(pool.features[indices], pool.labels[indices])
        train, test = split_holdout(own, fraction=site_test_fraction, rng=rng)
        sites.append(SiteData(name=name, train=train, test=test))
    return sites, central_test


def synthetic_sites(
    *,
    site_names: tuple[str, ...],
    alpha: float,
    beta: float,
    test_fraction: float,
    site_test_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[SiteData], Split]:
    """One Synthetic(α, β) device per site; each gives ``test_fraction`` to the central test."""
    from fl_components.synthetic import synthetic_devices  # synthetic imports Split from here

    devices = synthetic_devices(n_devices=len(site_names), alpha=alpha, beta=beta, rng=rng)
    sites, central = [], []
    for name, device in zip(site_names, devices, strict=True):
        own, held = split_holdout(device.data, fraction=test_fraction, rng=rng)
        train, test = split_holdout(own, fraction=site_test_fraction, rng=rng)
        sites.append(SiteData(name=name, train=train, test=test))
        central.append(held)
    central_test = Split(
        np.concatenate([c.features for c in central]), np.concatenate([c.labels for c in central])
    )
    return sites, central_test


def write_split(path: Path, split: Split) -> None:
    """Write a split as ``.npz`` (arrays ``x`` and ``y``; no pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=split.features, y=split.labels)


def write_site(root: Path, site: SiteData) -> Path:
    """Materialize ``root/<name>/train.npz`` and ``test.npz``; return the site folder."""
    folder = root / site.name
    write_split(folder / "train.npz", site.train)
    write_split(folder / "test.npz", site.test)
    return folder


def read_split(path: Path, *, label_column: str = "label") -> Split:
    """Read one split from ``.npz`` (x, y), ``.csv`` or ``.parquet`` (a label column)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; a site folder needs train and test files")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            archive_file = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise DataError(
                f"{path} is not a readable .npz of numeric arrays ({error.__class__.__name__}); "
                "write it with numpy.savez(path, x=features, y=labels)"
            ) from None
        with archive_file as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {sorted(missing)} (has {sorted(archive.files)}); "
                    "save features as 'x' and labels as 'y'"
                )
            features, labels = archive["x"], archive["y"]
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        if label_column not in frame.columns:
            shown = ", ".join(map(str, frame.columns[:8]))
            raise DataError(
                f"{path} has no column {label_column!r} (columns: {shown}"
                f"{', ...' if len(frame.columns) > 8 else ''}); set data.label_column"
            )
        labels = frame[label_column].to_numpy()
        features_frame = frame.drop(columns=[label_column])
        non_numeric = [
            c for c in features_frame.columns if features_frame[c].dtype.kind not in "biuf"
        ]
        if non_numeric:
            raise DataError(
                f"{path}: non-numeric feature column(s) {non_numeric}; encode them as numbers"
            )
        features = features_frame.to_numpy()
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}"
        )
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise DataError(f"{path}: features must be 2-D (examples, features), got {features.shape}")
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],):
        raise DataError(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {features.shape[0]} rows"
        )
    if not np.all(np.isfinite(features)):
        raise DataError(f"{path}: features contain NaN or infinity; clean or impute them first")
    return Split(features, labels.astype(np.int64))


def find_split_file(folder: Path, stem: str) -> Path:
    """Return ``folder/<stem>.<ext>`` for the first supported extension that exists."""
    for suffix in SUPPORTED_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(
        f"site folder {folder} has no {stem} file "
        f"({', '.join(stem + s for s in SUPPORTED_SUFFIXES)}); "
        "run `fedpipe partition` or copy the site's own files there"
    )


def load_site(folder: Path, *, label_column: str = "label") -> SiteData:
    """Load a site's train and test splits from its own folder."""
    if not folder.is_dir():
        raise DataError(
            f"site folder {folder} does not exist; run `fedpipe partition CONFIG` "
            "or point the site at its data"
        )
    train = read_split(find_split_file(folder, "train"), label_column=label_column)
    test = read_split(find_split_file(folder, "test"), label_column=label_column)
    if train.features.shape[1] != test.features.shape[1]:
        raise DataError(
            f"site {folder.name}: train has {train.features.shape[1]} features, "
            f"test has {test.features.shape[1]}; they must match"
        )
    return SiteData(name=folder.name, train=train, test=test)
