"""fedpipe's own models as tasks: ``model.kind`` (logreg, mlp, cnn) on the data section's files.

The built-in task is a task like any user's (:mod:`fl_components.task.protocol`): it builds
the configured model and reads a site's tabular files against the config's data contract;
loss and metrics are the defaults (cross-entropy, accuracy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_components.config import FederationConfig
from fl_components.data.check import load_configured_site
from fl_components.data.site_files import (
    SCALE_MAX_ABS_MEAN,
    SCALE_MAX_STD,
    SCALE_MIN_STD,
    find_split_file,
    standardize_site,
    unscaled_columns,
)
from fl_components.data.statistics import federation_standardized
from fl_components.data.types import DatasetInfo, SiteData, Split
from fl_components.site.models import make_model
from fl_components.task.protocol import SiteContext, TaskData

log = logging.getLogger(__name__)
# (site, train file, mtime, size) already warned about in this process: a site loads its
# files for every job, the warning is said once per file version
_WARNED_UNSCALED: set[tuple[str, str, int, int]] = set()


def tensors(split: Split) -> TensorDataset:
    """A split as (features, label) pairs of tensors (the numpy arrays shared, not copied)."""
    return TensorDataset(torch.from_numpy(split.features), torch.from_numpy(split.labels))


class BuiltinTask:
    """The task of ``model.kind`` over the data section's files."""

    def __init__(self, config: FederationConfig, info: DatasetInfo) -> None:
        self.config = config
        self.info = info

    def build_model(self, seed: int) -> nn.Module:
        """The configured built-in model (the caller seeds torch's generator)."""
        return make_model(self.config.model, self.info)

    def load_data(self, site: SiteContext) -> TaskData:
        """The site's train and held-out splits as tensor datasets."""
        data = load_site_data(self.config, site.name, site.folder, self.info)
        return TaskData(train=tensors(data.train), test=tensors(data.test))

    def input_example(self) -> npt.NDArray[np.float32]:
        """Two rows of zeros: the coordinator holds no site's data."""
        return np.zeros((2, self.info.n_features), dtype=np.float32)


def load_site_data(
    config: FederationConfig, name: str, folder: Path, info: DatasetInfo
) -> SiteData:
    """A site's own train and held-out splits, read by name against the contract."""
    data = load_configured_site(config, name, folder, info=info)
    if config.data.source == "site_files":
        _warn_if_unscaled(config, name, folder, data)
    if config.data.scale == "site":
        return standardize_site(data)
    if config.data.scale == "federation":
        return federation_standardized(data, config.data.scaling, site=name)
    return data


def _warn_if_unscaled(config: FederationConfig, name: str, folder: Path, data: SiteData) -> None:
    """Log once per file version when training features look unscaled or like an ID."""
    far = unscaled_columns(data.train) if config.data.scale == "none" else []
    if not far and not data.train.id_like:
        return
    train_file = find_split_file(folder, "train", source=config.data.source)
    stat = train_file.stat()
    key = (name, str(train_file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _WARNED_UNSCALED:
        return
    _WARNED_UNSCALED.add(key)
    if data.train.id_like:
        log.warning(
            "site %s: %s has column(s) %s that differ on every row (an ID?): a model can "
            "only memorize them; move them from data.columns to data.drop unless they "
            "are real features",
            name,
            train_file,
            list(data.train.id_like),
        )
    if not far:
        return
    shown = ", ".join(f"{c.name} (mean {c.mean:.4g}, std {c.std:.4g})" for c in far[:5])
    more = f" and {len(far) - 5} more" if len(far) > 5 else ""
    log.warning(
        "site %s: %s has feature column(s) far from scaled: %s%s (limits: |mean| <= %g, "
        "%g <= std <= %g); the model may learn little from them: standardize the files "
        "or set data.scale: site (each site its own scale) or federation (one for all)",
        name,
        train_file,
        shown,
        more,
        SCALE_MAX_ABS_MEAN,
        SCALE_MIN_STD,
        SCALE_MAX_STD,
    )
