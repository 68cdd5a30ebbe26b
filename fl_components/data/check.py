"""Where a federation's site folders are, how a site reads them, and the check before a run.

A site reads its own files by name against the data contract of the config's ``data``
section (:class:`~fl_components.data.contract.DataContract`). :func:`load_configured_site`
is the one way, used by the site at every job and by :func:`check_sites`, which loads every
site folder on this machine before any server starts (``fedpipe validate --data``, ``fedpipe data
check``, and ``fedpipe run`` before round 1). No torch and no Prefect are imported here:
checking four sites of 10,000 rows takes well under a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_components.config import FederationConfig, config_from_dict
from fl_components.data.contract import DataContract
from fl_components.data.site_files import (
    find_split_file,
    load_bundled,
    load_site,
    unscaled_columns,
)
from fl_components.data.types import DatasetInfo, SiteData
from fl_components.errors import ConfigError, DataError


def federation_dir(config: FederationConfig) -> Path:
    """Folder under which generated sites of this federation live."""
    return Path(config.data.sites_dir) / config.name


def site_folder(config: FederationConfig, name: str) -> Path:
    """The data folder of site ``name``."""
    for site in config.sites:
        if site.name == name:
            if site.data_path is not None:
                return Path(site.data_path)
            return federation_dir(config) / name
    raise ConfigError(f"no site named {name!r} in the federation (sites: {config.site_names})")


def dataset_info(config: FederationConfig) -> DatasetInfo:
    """Input width and class count, from the bundled set or from the config.

    With a user's ``task`` the task names its own shapes: (0, 0), never read.
    """
    if config.task is not None:
        return DatasetInfo(0, 0)
    if config.data.source == "bundled" and config.data.dataset == "synthetic":
        return DatasetInfo(60, 10)  # Synthetic(alpha, beta): 60 features, 10 classes
    if config.data.source == "bundled":
        split = load_bundled(config.data.dataset)
        return DatasetInfo(int(split.features.shape[1]), int(split.labels.max()) + 1)
    if config.data.n_features is None or config.data.n_classes is None:
        raise ConfigError("data.n_features and data.n_classes must be set for site_files")
    return DatasetInfo(config.data.n_features, config.data.n_classes)


def data_contract(config: FederationConfig) -> DataContract:
    """The contract every site's files are read against (bundled sets: by position)."""
    if config.data.source == "site_files":
        return DataContract.of(config.data)
    return DataContract(label_column=config.data.label_column)


def model_input_names(config: FederationConfig) -> tuple[str, ...] | None:
    """The model's input names (the contract's columns, one per categorical level), or None.

    Known for site files whose ``data.columns`` is declared or pinned by the run's check;
    bundled sets have no column names.
    """
    if config.data.source != "site_files" or config.data.columns is None:
        return None
    return DataContract.of(config.data).model_inputs(config.data.columns)


def load_configured_site(
    config: FederationConfig, name: str, folder: Path, *, info: DatasetInfo
) -> SiteData:
    """Site ``name``'s files read as the config says; every refusal starts ``site 'name': ``."""
    try:
        data = load_site(
            folder,
            contract=data_contract(config),
            n_classes=info.n_classes,
            source=config.data.source,
        )
    except DataError as error:
        raise DataError(f"site {name!r}: {error}") from None
    if data.train.features.shape[1] != info.n_features:
        raise DataError(
            f"site {name!r}: data has {data.train.features.shape[1]} features, the model "
            f"expects {info.n_features}; fix the site's files or data.n_features"
        )
    return data


@dataclass(frozen=True)
class SiteCheck:
    """One site's row of the check: what loaded, or why it could not."""

    site: str
    folder: Path
    error: str | None = None
    skipped: str | None = None
    train_rows: int = 0
    test_rows: int = 0
    label_counts: tuple[int, ...] = ()
    columns: tuple[str, ...] = ()
    unscaled: tuple[str, ...] = ()
    id_like: tuple[str, ...] = ()

    @property
    def loaded(self) -> bool:
        """True when the site's files loaded against the contract."""
        return self.error is None and self.skipped is None


@dataclass(frozen=True)
class DataCheck:
    """Every site's row, the problems found (one line each), and the columns all agree on."""

    sites: tuple[SiteCheck, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    columns: tuple[str, ...] | None
    seconds: float

    @property
    def ok(self) -> bool:
        """True when every checked site loaded and they agree."""
        return not self.problems


def _check_one(config: FederationConfig, name: str, info: DatasetInfo) -> SiteCheck:
    folder = site_folder(config, name)
    if config.backend == "work-pool" and not folder.exists():
        return SiteCheck(name, folder, skipped=f"{folder} is not on this host (not checked)")
    try:
        data = load_configured_site(config, name, folder, info=info)
    except DataError as error:
        return SiteCheck(name, folder, error=str(error))
    counts = np.bincount(data.train.labels, minlength=info.n_classes)
    return SiteCheck(
        name,
        folder,
        train_rows=len(data.train),
        test_rows=len(data.test),
        label_counts=tuple(int(c) for c in counts),
        columns=data.train.columns,
        unscaled=tuple(c.name for c in unscaled_columns(data.train))
        if config.data.scale == "none"
        else (),
        id_like=data.train.id_like,
    )


def _disagreement(config: FederationConfig, site: SiteCheck, reference: SiteCheck) -> str:
    lacks = [c for c in reference.columns if c not in site.columns]
    extra = [c for c in site.columns if c not in reference.columns]
    try:
        train = find_split_file(site.folder, "train", source=config.data.source)
    except DataError:
        train = site.folder
    return (
        f"site {site.site!r}: {train} lacks {lacks} and has {extra} compared with site "
        f"{reference.site!r} (columns are matched by name); give every site the same feature "
        "columns, or declare data.columns (and data.drop for columns that are not features)"
    )


def check_sites(config: FederationConfig, names: tuple[str, ...] | None = None) -> DataCheck:
    """Load every site folder on this machine against the contract; collect what is wrong.

    With ``data.columns`` unset, the sites must agree on one set of feature columns (the
    first site that loads is the reference); that set is returned as ``columns`` so a run
    can pin it (:func:`pin_columns`). Sites of a work-pool federation whose folder is not on
    this host are skipped, and said so.
    """
    started = time.perf_counter()
    try:
        info = dataset_info(config)
    except ConfigError as error:
        return DataCheck((), (str(error),), (), None, time.perf_counter() - started)
    rows = tuple(_check_one(config, name, info) for name in names or config.site_names)
    problems = [row.error for row in rows if row.error is not None]
    warnings = []
    loaded = [row for row in rows if row.loaded]
    columns: tuple[str, ...] | None = None
    if loaded and loaded[0].columns:
        reference = loaded[0]
        differ = [row for row in loaded[1:] if set(row.columns) != set(reference.columns)]
        problems.extend(_disagreement(config, row, reference) for row in differ)
        columns = None if differ else reference.columns
    for row in loaded:
        if row.id_like:
            warnings.append(
                f"site {row.site!r}: column(s) {list(row.id_like)} differ on every row (an ID?); "
                "a model can only memorize them: move them from data.columns to data.drop "
                "unless they are real features"
            )
    skipped = [row.site for row in rows if row.skipped is not None]
    if skipped and config.data.source == "site_files" and config.data.columns is None:
        warnings.append(
            f"site(s) {', '.join(skipped)} are not on this host: declare data.columns so that "
            "every site checks the same feature columns by name"
        )
    return DataCheck(rows, tuple(problems), tuple(warnings), columns, time.perf_counter() - started)


def pin_columns(config: FederationConfig, check: DataCheck) -> FederationConfig:
    """``config`` with ``data.columns`` set to what every site was found to hold.

    Only for site files with ``data.columns`` unset and every site checked here: each site
    then refuses, at every job, a file whose columns differ from the rest.
    """
    if (
        config.data.source != "site_files"
        or config.data.columns is not None
        or check.columns is None
        or any(not row.loaded for row in check.sites)
    ):
        return config
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["data"] = {**raw.get("data", {}), "columns": list(check.columns)}
    return config_from_dict(raw, source="the config with data.columns found at every site")
