"""Split one pooled file into simulated sites, to try a federation before real sites exist.

``fedpipe partition CONFIG --from pooled.csv`` writes each site's ``train.csv`` and
``test.csv`` (all of the pooled file's columns, in its CSV dialect) into the site's folder:
split IID or Dirichlet over the label (``data.partitioner``, ``data.alpha``; see
:mod:`fl_components.data.partition`), or ``--by COLUMN``, one site per value of a column such as
a hospital id. The sites then read their files exactly as real sites would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_components.config import FederationConfig
from fl_components.data.check import data_contract, site_folder
from fl_components.data.contract import DataContract
from fl_components.data.partition import IndexArray, partition_labels
from fl_components.data.site_files import (
    CSV_ROWS,
    PARQUET_ROWS,
    cell_text,
    map_labels,
    read_frame,
    validate_labels,
)
from fl_components.errors import ConfigError, DataError


@dataclass(frozen=True)
class SimulatedSite:
    """One simulated site's rows of the pooled file, and where they go."""

    name: str
    folder: Path
    train: Any  # pandas DataFrame
    test: Any
    value: str | None = None  # the --by column's value this site holds


def split_pooled_file(
    path: Path, config: FederationConfig, *, by: str | None = None
) -> list[SimulatedSite]:
    """Split ``path`` among the config's sites (label partitioner, or one site per value)."""
    contract = data_contract(config)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise DataError(f"{path}: a pooled file is .csv or .parquet (got {path.suffix!r})")
    if not path.is_file():
        raise DataError(f"{path} does not exist; give the pooled file to split")
    frame = read_frame(path, contract=contract)
    names = config.site_names
    rng = np.random.default_rng(config.seed)
    labels_of: list[str | None]
    if by is not None:
        parts, labels_of = _parts_by_value(path, frame, by=by, names=names)
    else:
        parts = _parts_by_label(path, frame, config, contract=contract, rng=rng)
        labels_of = [None] * len(names)
    sites = []
    for name, indices, value in zip(names, parts, labels_of, strict=True):
        order = rng.permutation(indices)
        n_test = min(max(1, round(len(order) * config.data.site_test_fraction)), len(order) - 1)
        if len(order) < 2:
            raise DataError(
                f"site {name!r} would get {len(order)} row(s) of {path}; it needs one to train "
                "and one to test: use fewer sites or another partitioner"
            )
        test_rows, train_rows = np.sort(order[:n_test]), np.sort(order[n_test:])
        sites.append(
            SimulatedSite(
                name=name,
                folder=site_folder(config, name),
                train=frame.iloc[train_rows],
                test=frame.iloc[test_rows],
                value=value,
            )
        )
    return sites


def _parts_by_value(
    path: Path, frame: Any, *, by: str, names: tuple[str, ...]
) -> tuple[list[IndexArray], list[str | None]]:
    """One site per distinct value of column ``by`` (sorted): each site's rows, its value."""
    if by not in frame.columns:
        raise DataError(
            f"{path} has no column {by!r} to split by (columns: {', '.join(frame.columns)})"
        )
    values = frame[by].map(cell_text)
    distinct = sorted(v for v in values.unique() if v is not None)
    if len(distinct) != len(names):
        raise ConfigError(
            f"{path}, column {by!r} has {len(distinct)} distinct value(s) "
            f"({', '.join(distinct[:8])}) but the config has {len(names)} site(s); list "
            "one site per value (they are matched in sorted order)"
        )
    parts = [np.flatnonzero((values == v).to_numpy()) for v in distinct]
    return parts, list(distinct)


def _parts_by_label(
    path: Path,
    frame: Any,
    config: FederationConfig,
    *,
    contract: DataContract,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Each site's rows as the config's label partitioner deals them (labels checked first)."""
    rows = CSV_ROWS if path.suffix.lower() == ".csv" else PARQUET_ROWS
    source = f"{path}, column {contract.label_column!r},"
    if contract.label_column not in frame.columns:
        raise DataError(f"{path} has no column {contract.label_column!r}; set data.label_column")
    raw = frame[contract.label_column].to_numpy()
    labels = (
        map_labels(raw, label_map=dict(contract.label_map), source=source, rows=rows)
        if contract.label_map is not None
        else validate_labels(raw, source=source, rows=rows)
    )
    d = config.data
    return partition_labels(
        labels,
        n_sites=len(config.site_names),
        method=d.partitioner,
        alpha=d.alpha,
        shards_per_site=d.shards_per_site,
        quantity_sigma=d.quantity_sigma,
        rng=rng,
    )


def write_simulated_sites(
    sites: list[SimulatedSite], config: FederationConfig, *, overwrite: bool = False
) -> list[Path]:
    """Write each site's ``train.csv`` and ``test.csv``; existing files only with ``overwrite``."""
    contract = data_contract(config)
    if not overwrite:
        existing = [
            str(s.folder / f)
            for s in sites
            for f in ("train.csv", "test.csv")
            if (s.folder / f).exists()
        ]
        if existing:
            raise DataError(
                f"{', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} exist already; "
                "pass --overwrite to replace them, or point sites[].data_path elsewhere"
            )
    for site in sites:
        site.folder.mkdir(parents=True, exist_ok=True)
        for split, frame in (("train", site.train), ("test", site.test)):
            frame.to_csv(
                site.folder / f"{split}.csv",
                index=False,
                sep=contract.delimiter,
                decimal=contract.decimal,
            )
    return [s.folder for s in sites]
