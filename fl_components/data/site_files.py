"""Site data: bundled scikit-learn sets, a site's own files, and site folders on disk.

A site folder holds ``train.<ext>`` and ``test.<ext>`` (``.npz``, ``.csv`` or ``.parquet``);
the held-out ``test`` split is what federated evaluation scores. A site's own files are
read by name against the data contract (:mod:`fl_components.data.contract`), so column
order never matters. Nothing here moves data between sites: each site reads only its own
folder.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_components.data.contract import DataContract
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


CSV_ROWS = _Rows(2, "line", "(counting the header as line 1)")
PARQUET_ROWS = _Rows(1, "row", "(1-based, not counting the header)")
NPZ_ROWS = _Rows(0, "index", "of y (0-based)")


def _shown_values(values: Any, indices: npt.NDArray[np.intp]) -> str:
    return ", ".join(repr(v) for v in values[indices[:_SHOWN]].tolist())


def _label_numbers(
    array: npt.NDArray[Any],
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Raw labels read as numbers: (the values as shown, their numbers or NaN, missing cells)."""
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
    return values, numbers, missing


def _label_problems(
    values: npt.NDArray[Any],
    numbers: npt.NDArray[np.float64],
    missing: npt.NDArray[np.bool_],
    *,
    rows: _Rows,
    n_classes: int | None,
) -> list[str]:
    """One sentence per kind of bad label (missing, text, non-integer, outside the classes)."""
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
        distinct = sorted({str(v).strip() for v in values[where].tolist()})
        example = ", ".join(f"'{v}': {i}" for i, v in enumerate(distinct[:4]))
        problems.append(
            f"{len(where)} non-numeric label(s), values {_shown_values(values, where)}, "
            f"at {rows.name(where)}; map each class to an integer {span}, or declare "
            f"data.label_map: {{{example}}} (every site then reads the same map)"
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
    return problems


def validate_labels(
    raw: npt.ArrayLike,
    *,
    source: str,
    rows: _Rows = PARQUET_ROWS,
    n_classes: int | None = None,
) -> LabelArray:
    """Integer class indices from raw labels, or a :class:`DataError` naming every bad row.

    Refused: missing labels, text, non-integer numbers (0.5 is not truncated to 0), and labels
    outside ``[0, n_classes)`` (below 0 or at least 2**31 when ``n_classes`` is None).
    ``source`` names the file and column in the message; ``rows`` how its rows are counted.
    """
    values, numbers, missing = _label_numbers(np.asarray(raw).reshape(-1))
    problems = _label_problems(values, numbers, missing, rows=rows, n_classes=n_classes)
    if problems:
        raise DataError(f"{source} has bad labels: " + "; ".join(problems))
    return numbers.astype(np.int64)


# A feature column is "ID-like" when each of at least this many rows holds a different integer
# or text (an account or record number): a model can only memorize it, and on the scale of
# the other features it swamps them.
ID_MIN_ROWS = 20
_SEPARATORS = (",", ";", "\t", "|")
# 1,5  -3,25  1.234,5  (a decimal comma, maybe with '.' or ' ' between thousands)
_DECIMAL_COMMA = re.compile(r"^\s*[+-]?\d{1,3}(?:[. ]?\d{3})*,\d+\s*$")


def _sniffed_dialect(path: Path, contract: DataContract) -> str:
    """A hint naming the delimiter (and decimal mark) the file's first lines seem to use."""
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as handle:
            header, first = handle.readline(), handle.readline()
    except OSError:
        return ""
    if contract.delimiter in header:
        return ""
    found = [sep for sep in _SEPARATORS if sep != contract.delimiter and sep in header]
    if not found:
        return ""
    sep = max(found, key=header.count)
    fields = first.rstrip("\r\n").split(sep)
    comma = sep != "," and any(_DECIMAL_COMMA.match(f) for f in fields)
    decimal = " and data.decimal: ','" if comma and contract.decimal != "," else ""
    return (
        f"; its header {header.strip()[:80]!r} is separated by {sep!r}, not data.delimiter "
        f"{contract.delimiter!r}: set data.delimiter: {sep!r}{decimal}"
    )


def read_frame(path: Path, *, contract: DataContract) -> Any:
    """A CSV or Parquet file as a pandas frame; unreadable, empty or header-only is refused.

    CSV: read with the contract's delimiter and decimal mark; a UTF-8 byte-order mark is
    skipped; column names lose surrounding spaces. A file that reads as a single column but
    whose header holds another separator is refused with the delimiter to set.
    """
    import pandas as pd

    label_column = contract.label_column
    layout = f"a header naming the feature columns and {label_column!r}, then one row per example"
    csv = path.suffix.lower() == ".csv"
    try:
        if csv:
            frame = pd.read_csv(
                path, sep=contract.delimiter, decimal=contract.decimal, encoding="utf-8-sig"
            )
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (no header, no rows); write {layout}") from None
    except (ValueError, OSError, UnicodeError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        kind = "a readable UTF-8 CSV" if csv else "a readable Parquet file"
        dialect = _sniffed_dialect(path, contract) if csv else ""
        raise DataError(
            f"{path} is not {kind} ({error.__class__.__name__}: {reason}){dialect}"
            f"{'' if dialect else f'; write {layout}'}"
        ) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if csv and frame.shape[1] == 1:
        dialect = _sniffed_dialect(path, contract)
        if dialect:
            raise DataError(f"{path} reads as one column{dialect}")
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise DataError(f"{path} has column(s) {repeated} more than once; give each a unique name")
    if frame.shape[0] == 0:
        shown = ", ".join(frame.columns[:8]) + (", ..." if len(frame.columns) > 8 else "")
        raise DataError(f"{path} has a header ({shown}) but no data rows; add one row per example")
    return frame


def _feature_columns(path: Path, frame: Any, contract: DataContract) -> tuple[str, ...]:
    """The frame's feature columns in model order, matched by name against the contract."""
    present = [c for c in frame.columns if c != contract.label_column]
    dropped = set(contract.drop)
    if contract.columns is None:
        return tuple(sorted(c for c in present if c not in dropped))
    missing = [c for c in contract.columns if c not in frame.columns]
    extra = [c for c in present if c not in contract.columns and c not in dropped]
    if not missing and not extra:
        return contract.columns
    problems = []
    if missing:
        problems.append(f"lacks column(s) {missing}")
    if extra:
        problems.append(f"has column(s) {extra} that data.columns does not list")
    renamed = (
        f"if {extra[0]!r} is {missing[0]!r} under another name, rename it in the file; "
        if len(missing) == 1 and len(extra) == 1
        else ""
    )
    raise DataError(
        f"{path} {' and '.join(problems)} (data.columns: {', '.join(contract.columns)}); "
        f"{renamed}add missing columns to the file, and list extra ones in data.columns "
        "(a feature) or data.drop (not a feature)"
    )


def _non_numeric_error(path: Path, frame: Any, columns: list[str], rows: _Rows) -> DataError:
    """Non-numeric feature columns, with a sample row and the fix that fits the values."""
    import pandas as pd

    bad = frame[columns]
    coerced = bad.apply(pd.to_numeric, errors="coerce")
    offending = (coerced.isna() & bad.notna()).any(axis=1).to_numpy()
    first = int(np.flatnonzero(offending)[0]) if offending.any() else 0
    sample = ", ".join(f"{c}={bad[c].iloc[first]!r}" for c in columns[:4])
    texts = bad.stack().map(str)  # astype(str) keeps a missing value as NaN (pandas 3)
    if len(texts) and texts.map(lambda t: bool(_DECIMAL_COMMA.match(t))).mean() > 0.5:
        fix = "numbers are written with a decimal comma: set data.decimal: ',' (and data.delimiter)"
    else:
        unique = [
            c for c in columns if len(frame) >= ID_MIN_ROWS and bad[c].nunique() == len(frame)
        ]
        id_hint = (
            f"; {unique} differ on every row (an ID?): add them to data.drop" if unique else ""
        )
        fix = (
            "declare categorical columns in data.categorical with their levels (one-hot "
            f"encoded), encode them as numbers, or add them to data.drop{id_hint}"
        )
    return DataError(
        f"{path}: non-numeric feature column(s) {columns}, e.g. {sample} at "
        f"{rows.name(np.array([first]))}; {fix}"
    )


def _one_hot(path: Path, frame: Any, column: str, levels: tuple[str, ...], rows: _Rows) -> Any:
    """A categorical column as one 0/1 column per declared level, in the declared order."""
    values = frame[column]
    text = values.map(cell_text)
    outside = ~text.isin(levels).to_numpy()
    if outside.any():
        where = np.flatnonzero(outside)
        raise DataError(
            f"{path}, column {column!r}: {len(where)} value(s) outside data.categorical."
            f"{column} ({', '.join(levels)}), values {_shown_values(text.to_numpy(), where)}, "
            f"at {rows.name(where)}; add the level to data.categorical.{column} (every site "
            "must use the same levels) or fix those rows"
        )
    return np.stack([(text == level).to_numpy() for level in levels], axis=1)


def cell_text(value: Any) -> str | None:
    """A cell as the text a label map or level list names (1.0 -> '1'; missing -> None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _id_like(frame: Any, columns: tuple[str, ...]) -> tuple[str, ...]:
    """Integer feature columns whose every row differs (at least ``ID_MIN_ROWS`` rows)."""
    if len(frame) < ID_MIN_ROWS:
        return ()
    return tuple(
        c
        for c in columns
        if frame[c].dtype.kind in "iu" and frame[c].nunique(dropna=False) == len(frame)
    )


@dataclass(frozen=True)
class _Features:
    values: npt.NDArray[Any]
    labels: npt.NDArray[Any]
    names: tuple[str, ...]
    id_like: tuple[str, ...]


def _frame_arrays(path: Path, frame: Any, *, contract: DataContract, rows: _Rows) -> _Features:
    """Features (model order), raw labels, input names and ID-like columns of a frame."""
    label_column = contract.label_column
    if label_column not in frame.columns:
        shown = ", ".join(map(str, frame.columns[:8]))
        raise DataError(
            f"{path} has no column {label_column!r} (columns: {shown}"
            f"{', ...' if len(frame.columns) > 8 else ''}); set data.label_column"
        )
    labels = frame[label_column].to_numpy()
    chosen = _feature_columns(path, frame, contract)
    if not chosen:
        raise DataError(
            f"{path} has only the label column {label_column!r}"
            f"{' and data.drop columns' if contract.drop else ''}; add the feature columns"
        )
    levels = contract.levels
    numeric = [c for c in chosen if c not in levels]
    non_numeric = [c for c in numeric if frame[c].dtype.kind not in "biuf"]
    if non_numeric:
        raise _non_numeric_error(path, frame, non_numeric, rows)
    id_like = _id_like(frame, tuple(numeric))
    if id_like and contract.columns is None:
        column = id_like[0]
        sample = ", ".join(str(v) for v in frame[column].iloc[:3].tolist())
        raise DataError(
            f"{path}: column {column!r} holds a different integer on every one of its "
            f"{len(frame)} rows (e.g. {sample}): it looks like an ID (an account or record "
            "number), which a model can only memorize; add it to data.drop, or list the "
            "features in data.columns if it is a real feature"
        )
    blocks = [
        _one_hot(path, frame, c, levels[c], rows)
        if c in levels
        else frame[c].to_numpy(dtype=np.float64, na_value=np.nan)[:, None]
        for c in chosen
    ]
    values = np.concatenate([b.astype(np.float64) for b in blocks], axis=1)
    return _Features(values, labels, contract.model_inputs(chosen), id_like)


def _read_npz(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any], tuple[str, ...]]:
    """Arrays ``x``, ``y`` and, when saved, ``columns`` (names of x's columns) of an ``.npz``.

    Never unpickled: ``columns`` must be a plain string array.
    """
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {sorted(missing)} (has {sorted(archive.files)}); "
                    "save features as 'x' and labels as 'y'"
                )
            names = archive["columns"] if "columns" in archive.files else np.array([], str)
            return archive["x"], archive["y"], tuple(str(n) for n in names.tolist())
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{path} is not a readable .npz of numeric arrays ({error.__class__.__name__}); "
            "write it with numpy.savez(path, x=features, y=labels)"
        ) from None


def _npz_features(path: Path, contract: DataContract) -> _Features:
    """An ``.npz`` split: by name when it saved ``columns``, else by position."""
    import pandas as pd

    x, y, names = _read_npz(path)
    if names and np.ndim(x) == 2 and len(names) == np.shape(x)[1]:
        if np.ndim(y) != 1 or len(y) != len(x):
            raise DataError(
                f"{path}: labels of shape {np.shape(y)} for {len(x)} rows; give one label per row"
            )
        frame = pd.DataFrame(x, columns=list(names))
        frame[contract.label_column] = y
        return _frame_arrays(path, frame, contract=contract, rows=NPZ_ROWS)
    if names:
        raise DataError(
            f"{path}: array 'columns' names {len(names)} columns but x has shape "
            f"{np.shape(x)}; save one name per column of x"
        )
    expected = contract.model_inputs(contract.columns) if contract.columns is not None else ()
    if expected and np.ndim(x) == 2 and np.shape(x)[1] != len(expected):
        raise DataError(
            f"{path}: x has {np.shape(x)[1]} columns, data.columns gives {len(expected)} model "
            "inputs; an .npz without a 'columns' array is read by position: save "
            "numpy.savez(path, x=..., y=..., columns=numpy.array(names))"
        )
    return _Features(x, y, expected, ())


def read_split(
    path: Path,
    *,
    label_column: str = "label",
    n_classes: int | None = None,
    contract: DataContract | None = None,
) -> Split:
    """Read one split from ``.npz`` (x, y), ``.csv`` or ``.parquet`` (a label column).

    Columns are matched by name against ``contract`` (by default: every column but the
    label, sorted by name), so column order never matters. Labels are checked
    (:func:`validate_labels` against ``n_classes``, or mapped by the contract's label map);
    every refusal is a :class:`DataError` naming the file, the column, the rows and the fix.
    """
    if contract is None:
        contract = DataContract(label_column=label_column, n_classes=n_classes)
    n_classes = contract.n_classes if n_classes is None else n_classes
    if not path.is_file():
        raise DataError(f"{path} does not exist; a site folder needs train and test files")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        found = _npz_features(path, contract)
        rows, label_source = NPZ_ROWS, f"{path}, array 'y',"
    elif suffix in (".csv", ".parquet"):
        rows = CSV_ROWS if suffix == ".csv" else PARQUET_ROWS
        frame = read_frame(path, contract=contract)
        found = _frame_arrays(path, frame, contract=contract, rows=rows)
        label_source = f"{path}, column {contract.label_column!r},"
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}"
        )
    features = _float_features(path, found.values)
    labels = np.asarray(found.labels)
    if labels.shape != (features.shape[0],):
        raise DataError(
            f"{path}: labels of shape {labels.shape} for {features.shape[0]} rows; "
            "give one label per row"
        )
    if contract.label_map is not None:
        checked = map_labels(
            labels, label_map=dict(contract.label_map), source=label_source, rows=rows
        )
    else:
        checked = validate_labels(labels, source=label_source, rows=rows, n_classes=n_classes)
    _refuse_non_finite(path, features, columns=found.names, rows=rows)
    return Split(features, checked, found.names, found.id_like)


def _float_features(path: Path, values: Any) -> npt.NDArray[np.float32]:
    """The features as a 2-D float32 array, or a :class:`DataError` saying why not."""
    try:
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused after
            features = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: features are not numbers (dtype {np.asarray(values).dtype}); "
            "encode them as numbers"
        ) from None
    if features.ndim != 2:
        raise DataError(f"{path}: features must be 2-D (examples, features), got {features.shape}")
    return features


def _refuse_non_finite(
    path: Path, features: npt.NDArray[np.float32], *, columns: tuple[str, ...], rows: _Rows
) -> None:
    """Refuse NaN or infinity in the features, naming the columns and the rows."""
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


def map_labels(
    raw: npt.ArrayLike, *, label_map: dict[str, int], source: str, rows: _Rows = PARQUET_ROWS
) -> LabelArray:
    """Class indices from label values through ``data.label_map`` (values compared as text)."""
    texts = np.array([cell_text(v) for v in np.asarray(raw, dtype=object).reshape(-1)], object)
    missing = np.array([t is None for t in texts], bool)
    unknown = ~missing & np.array([t not in label_map for t in texts], bool)
    problems = []
    if missing.any():
        where = np.flatnonzero(missing)
        problems.append(
            f"{len(where)} missing label(s) at {rows.name(where)}; fill them in or drop those rows"
        )
    if unknown.any():
        where = np.flatnonzero(unknown)
        known = ", ".join(repr(k) for k in label_map)
        problems.append(
            f"{len(where)} label(s) not in data.label_map ({known}), values "
            f"{_shown_values(texts, where)}, at {rows.name(where)}; add each value to "
            "data.label_map with its class index, or fix those rows"
        )
    if problems:
        raise DataError(f"{source} has bad labels: " + "; ".join(problems))
    return np.array([label_map[t] for t in texts], dtype=np.int64)


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


def _modified(path: Path) -> str:
    return f"{datetime.fromtimestamp(path.stat().st_mtime, UTC):%Y-%m-%d %H:%M:%S} UTC"


def _fix_for(source: str) -> str:
    if source == "site_files":
        return "copy the site's own train and test files there, or fix sites[].data_path"
    return "run `fedpipe partition CONFIG` or copy the site's own files there"


def find_split_file(folder: Path, stem: str, *, source: str = "bundled") -> Path:
    """Return ``folder/<stem>.<ext>``, the one supported file for this split.

    Two candidates (an old ``train.npz`` beside a new ``train.csv``) are refused, naming
    both with their modification times: which one is current is the site's call, never a
    guess.
    """
    found = [folder / f"{stem}{s}" for s in SUPPORTED_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        newest = max(found, key=lambda f: f.stat().st_mtime_ns)
        listed = ", ".join(f"{f.name} (modified {_modified(f)})" for f in found)
        raise DataError(
            f"site folder {folder} has {len(found)} {stem} files: {listed}; fedpipe does not "
            f"guess which is current: keep one (the newest is {newest.name}) and delete or "
            "move the other(s) out of the folder"
        )
    raise DataError(
        f"site folder {folder} has no {stem} file "
        f"({', '.join(stem + s for s in SUPPORTED_SUFFIXES)}); {_fix_for(source)}"
    )


def load_site(
    folder: Path,
    *,
    label_column: str = "label",
    n_classes: int | None = None,
    contract: DataContract | None = None,
    source: str = "bundled",
) -> SiteData:
    """Load a site's train and test splits from its own folder, read by name (labels checked).

    ``source`` ('bundled' or 'site_files') picks the fix a missing folder or file names.
    Train and test must hold the same feature columns (in any order).
    """
    if contract is None:
        contract = DataContract(label_column=label_column, n_classes=n_classes)
    if not folder.is_dir():
        raise DataError(f"site folder {folder} does not exist; {_fix_for(source)}")
    train_file = find_split_file(folder, "train", source=source)
    test_file = find_split_file(folder, "test", source=source)
    train = read_split(train_file, contract=contract, n_classes=n_classes)
    test = read_split(test_file, contract=contract, n_classes=n_classes)
    if train.columns and test.columns and train.columns != test.columns:
        only_train = [c for c in train.columns if c not in test.columns]
        only_test = [c for c in test.columns if c not in train.columns]
        raise DataError(
            f"{test_file} and {train_file} hold different feature columns: test lacks "
            f"{only_train}, has {only_test} that train does not; give both files the same "
            "columns (their order does not matter), or declare data.columns and data.drop"
        )
    if train.features.shape[1] != test.features.shape[1]:
        raise DataError(
            f"site {folder.name}: train has {train.features.shape[1]} features, "
            f"test has {test.features.shape[1]}; they must match"
        )
    return SiteData(name=folder.name, train=train, test=test)
