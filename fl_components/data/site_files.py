"""Site data: bundled scikit-learn sets, a site's own files, and site folders on disk.

A site folder holds ``train.<ext>`` and ``test.<ext>`` (``.npz``, ``.csv`` or ``.parquet``);
the held-out ``test`` split is what federated evaluation scores. Nothing here moves data
between sites: each site reads only its own folder.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_components.data.partition import partition_labels, split_holdout
from fl_components.data.synthetic import synthetic_sites
from fl_components.data.types import LabelArray, SiteData, Split
from fl_components.errors import DataError

SUPPORTED_SUFFIXES = (".npz", ".csv", ".parquet")


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


# A site's features are "far from scaled" when a column's mean or spread is off by an order
# of magnitude from the unit scale the bundled sets have (min-max to [0, 1]): SGD at the
# default learning rate then diverges (std > 10), crawls (|mean| > 5 swamps the bias), or
# never moves a weight (0 < std < 0.001; a constant column, std 0, is left alone: scaling
# cannot give it information).
SCALE_MAX_ABS_MEAN = 5.0
SCALE_MAX_STD = 10.0
SCALE_MIN_STD = 1e-3
# Labels are class indices; without data.n_classes they must still fit an index.
_MAX_LABEL = 2**31
_SHOWN = 5  # offending rows / values named in a message


@dataclass(frozen=True)
class _Rows:
    """How a file's rows are named in messages: ``offset`` + 0-based data row index."""

    offset: int
    noun: str
    note: str

    def name(self, indices: npt.NDArray[np.intp]) -> str:
        shown = ", ".join(str(int(i) + self.offset) for i in indices[:_SHOWN])
        more = f" and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else ""
        plural = "s" if len(indices) > 1 else ""
        return f"{self.noun}{plural} {shown}{more} {self.note}"


_CSV_ROWS = _Rows(2, "line", "(counting the header as line 1)")
_PARQUET_ROWS = _Rows(1, "row", "(1-based, not counting the header)")
_NPZ_ROWS = _Rows(0, "index", "of y (0-based)")


def _shown_values(values: Any, indices: npt.NDArray[np.intp]) -> str:
    return ", ".join(repr(v) for v in values[indices[:_SHOWN]].tolist())


def validate_labels(
    raw: npt.ArrayLike,
    *,
    source: str,
    rows: _Rows = _PARQUET_ROWS,
    n_classes: int | None = None,
) -> LabelArray:
    """Integer class indices from raw labels, or a :class:`DataError` naming every bad row.

    Refused: missing labels, text, non-integer numbers (0.5 is not truncated to 0), and labels
    outside ``[0, n_classes)`` (below 0 or at least 2**31 when ``n_classes`` is None).
    ``source`` names the file and column in the message; ``rows`` how its rows are counted.
    """
    array = np.asarray(raw).reshape(-1)
    values: npt.NDArray[Any] = array
    if array.dtype.kind in "biuf":  # numbers already (npz, most CSV columns): numpy only
        numbers = array.astype(np.float64)
        missing = np.isnan(numbers)
    else:  # text, mixed or missing cells in an object column
        import pandas as pd

        series = pd.Series(array)
        values = series.to_numpy(dtype=object)
        missing = series.isna().to_numpy()
        numbers = np.full(len(series), np.nan)
        if array.dtype.kind not in "cmMV":  # complex, times, raw bytes: never class indices
            # complex values inside an object column: refused, not silently made real
            with warnings.catch_warnings(), contextlib.suppress(TypeError, ValueError, Warning):
                warnings.simplefilter("error", np.exceptions.ComplexWarning)
                numbers = np.asarray(pd.to_numeric(series, errors="coerce"), dtype=np.float64)
        numbers = np.where(missing, np.nan, numbers)
    text = ~missing & np.isnan(numbers)
    present = ~np.isnan(numbers)
    with np.errstate(invalid="ignore"):
        non_integer = present & (~np.isfinite(numbers) | (numbers != np.floor(numbers)))
        upper = n_classes if n_classes is not None else _MAX_LABEL
        outside = present & ~non_integer & ((numbers < 0) | (numbers >= upper))
    span = f"0..{n_classes - 1}" if n_classes is not None else "0, 1, 2, ..."
    problems = []
    if missing.any():
        where = np.flatnonzero(missing)
        problems.append(
            f"{len(where)} missing label(s) at {rows.name(where)}; fill them in or drop those rows"
        )
    if text.any():
        where = np.flatnonzero(text)
        problems.append(
            f"{len(where)} non-numeric label(s), values {_shown_values(values, where)}, "
            f"at {rows.name(where)}; map each class to an integer {span}"
        )
    if non_integer.any():
        where = np.flatnonzero(non_integer)
        problems.append(
            f"{len(where)} non-integer label(s), values {_shown_values(values, where)}, "
            f"at {rows.name(where)}; labels are class indices {span}, "
            "not scores: map them to integers"
        )
    if outside.any():
        where = np.flatnonzero(outside)
        fix = (
            f"remap them to 0..{n_classes - 1} or raise data.n_classes (now {n_classes})"
            if n_classes is not None
            else "labels are class indices 0, 1, 2, ..."
        )
        problems.append(
            f"{len(where)} label(s) outside [0, {upper}), values {_shown_values(values, where)}, "
            f"at {rows.name(where)}; {fix}"
        )
    if problems:
        raise DataError(f"{source} has bad labels: " + "; ".join(problems))
    return numbers.astype(np.int64)


def _read_frame(path: Path, *, label_column: str) -> Any:
    """A CSV or Parquet file as a pandas frame; unreadable, empty or header-only is refused."""
    import pandas as pd

    layout = f"a header naming the feature columns and {label_column!r}, then one row per example"
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (no header, no rows); write {layout}") from None
    except (ValueError, OSError, UnicodeError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        csv = path.suffix.lower() == ".csv"
        kind = "a readable UTF-8 CSV" if csv else "a readable Parquet file"
        raise DataError(
            f"{path} is not {kind} ({error.__class__.__name__}: {reason}); write {layout}"
        ) from None
    frame.columns = [str(c) for c in frame.columns]
    if frame.shape[0] == 0:
        shown = ", ".join(frame.columns[:8]) + (", ..." if len(frame.columns) > 8 else "")
        raise DataError(f"{path} has a header ({shown}) but no data rows; add one row per example")
    return frame


def _frame_arrays(
    path: Path, frame: Any, *, label_column: str, rows: _Rows
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], tuple[str, ...]]:
    """Features, raw labels and feature column names of a frame; checks the columns."""
    import pandas as pd

    if label_column not in frame.columns:
        shown = ", ".join(map(str, frame.columns[:8]))
        raise DataError(
            f"{path} has no column {label_column!r} (columns: {shown}"
            f"{', ...' if len(frame.columns) > 8 else ''}); set data.label_column"
        )
    labels = frame[label_column].to_numpy()
    features_frame = frame.drop(columns=[label_column])
    if features_frame.shape[1] == 0:
        raise DataError(
            f"{path} has only the label column {label_column!r}; add the feature columns"
        )
    non_numeric = [c for c in features_frame.columns if features_frame[c].dtype.kind not in "biuf"]
    if non_numeric:
        bad = features_frame[non_numeric]
        coerced = bad.apply(pd.to_numeric, errors="coerce")
        offending = (coerced.isna() & bad.notna()).any(axis=1).to_numpy()
        first = int(np.flatnonzero(offending)[0]) if offending.any() else 0
        sample = ", ".join(f"{c}={bad[c].iloc[first]!r}" for c in non_numeric[:4])
        raise DataError(
            f"{path}: non-numeric feature column(s) {non_numeric}, e.g. {sample} at "
            f"{rows.name(np.array([first]))}; encode them as numbers "
            "(one-hot or ordinal codes) or drop them"
        )
    return features_frame.to_numpy(), labels, tuple(features_frame.columns)


def _read_npz(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Arrays ``x`` and ``y`` of an ``.npz`` (never unpickled)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {sorted(missing)} (has {sorted(archive.files)}); "
                    "save features as 'x' and labels as 'y'"
                )
            return archive["x"], archive["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{path} is not a readable .npz of numeric arrays ({error.__class__.__name__}); "
            "write it with numpy.savez(path, x=features, y=labels)"
        ) from None


def read_split(path: Path, *, label_column: str = "label", n_classes: int | None = None) -> Split:
    """Read one split from ``.npz`` (x, y), ``.csv`` or ``.parquet`` (a label column).

    Labels are checked (:func:`validate_labels`, against ``n_classes`` when given); every
    refusal is a :class:`DataError` naming the file, the column, the rows and the fix.
    """
    if not path.is_file():
        raise DataError(f"{path} does not exist; a site folder needs train and test files")
    suffix = path.suffix.lower()
    columns: tuple[str, ...] = ()
    if suffix == ".npz":
        features, labels = _read_npz(path)
        rows, label_source = _NPZ_ROWS, f"{path}, array 'y',"
    elif suffix in (".csv", ".parquet"):
        rows = _CSV_ROWS if suffix == ".csv" else _PARQUET_ROWS
        frame = _read_frame(path, label_column=label_column)
        features, labels, columns = _frame_arrays(path, frame, label_column=label_column, rows=rows)
        label_source = f"{path}, column {label_column!r},"
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}"
        )
    try:
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
            features = np.asarray(features, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: features are not numbers (dtype {np.asarray(features).dtype}); "
            "encode them as numbers"
        ) from None
    if features.ndim != 2:
        raise DataError(f"{path}: features must be 2-D (examples, features), got {features.shape}")
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],):
        raise DataError(
            f"{path}: labels of shape {labels.shape} for {features.shape[0]} rows; "
            "give one label per row"
        )
    checked = validate_labels(labels, source=label_source, rows=rows, n_classes=n_classes)
    finite = np.isfinite(features)
    if not finite.all():
        names = columns or tuple(f"x[:, {i}]" for i in range(features.shape[1]))
        bad_columns = [names[i] for i in np.flatnonzero(~finite.all(axis=0))]
        where = rows.name(np.flatnonzero(~finite.all(axis=1)))
        raise DataError(
            f"{path}: features contain NaN or infinity (or values beyond float32's ±3.4e38) "
            f"in column(s) {bad_columns[:8]} at "
            f"{where.replace(' of y', ' of x')}; clean or impute them first"
        )
    return Split(features, checked, columns)


def feature_names(split: Split) -> tuple[str, ...]:
    """The split's column names, or ``x[:, i]`` for arrays without names."""
    if split.columns:
        return split.columns
    return tuple(f"x[:, {i}]" for i in range(split.features.shape[1]))


@dataclass(frozen=True)
class ColumnScale:
    """One feature column's mean and standard deviation over a split."""

    name: str
    mean: float
    std: float


def unscaled_columns(split: Split) -> list[ColumnScale]:
    """Columns far from unit scale (see ``SCALE_MAX_ABS_MEAN`` and friends above)."""
    if len(split) == 0:
        return []
    features = split.features.astype(np.float64)
    means, stds = features.mean(axis=0), features.std(axis=0)
    far = (np.abs(means) > SCALE_MAX_ABS_MEAN) | (stds > SCALE_MAX_STD)
    far |= (stds > 0) & (stds < SCALE_MIN_STD)
    names = feature_names(split)
    return [ColumnScale(names[i], float(means[i]), float(stds[i])) for i in np.flatnonzero(far)]


def standardize_site(site: SiteData) -> SiteData:
    """Standardize a site's features with its own training statistics (``data.scale: site``).

    Mean and standard deviation are over the site's training rows only and applied to its
    held-out rows too, so the held-out split stays unseen; a constant column is only
    centred. Nothing leaves the site.
    """
    train = site.train.features.astype(np.float64)
    mean = train.mean(axis=0) if len(site.train) else np.zeros(train.shape[1])
    std = train.std(axis=0) if len(site.train) else np.ones(train.shape[1])
    std = np.where(std > 0, std, 1.0)

    def scaled(split: Split) -> Split:
        features = ((split.features.astype(np.float64) - mean) / std).astype(np.float32)
        return Split(features, split.labels, split.columns)

    return SiteData(name=site.name, train=scaled(site.train), test=scaled(site.test))


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


def load_site(
    folder: Path, *, label_column: str = "label", n_classes: int | None = None
) -> SiteData:
    """Load a site's train and test splits from its own folder (labels checked)."""
    if not folder.is_dir():
        raise DataError(
            f"site folder {folder} does not exist; run `fedpipe partition CONFIG` "
            "or point the site at its data"
        )
    train = read_split(
        find_split_file(folder, "train"), label_column=label_column, n_classes=n_classes
    )
    test = read_split(
        find_split_file(folder, "test"), label_column=label_column, n_classes=n_classes
    )
    if train.features.shape[1] != test.features.shape[1]:
        raise DataError(
            f"site {folder.name}: train has {train.features.shape[1]} features, "
            f"test has {test.features.shape[1]}; they must match"
        )
    return SiteData(name=folder.name, train=train, test=test)
