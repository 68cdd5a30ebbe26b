"""The federation's plain-Python pieces: site folders, participant selection, the site side.

The coordinator only ever learns a site's folder *name*; a :class:`Site` object, created
where the site's data lives, reads its own folder and returns updates and scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_components.config import FederationConfig
from fl_components.data.check import dataset_info as dataset_info  # re-exported
from fl_components.data.check import federation_dir, load_configured_site
from fl_components.data.check import site_folder as site_folder  # re-exported
from fl_components.data.site_files import (
    SCALE_MAX_ABS_MEAN,
    SCALE_MAX_STD,
    SCALE_MIN_STD,
    find_split_file,
    partition_bundled,
    read_split,
    standardize_site,
    unscaled_columns,
    write_site,
    write_split,
)
from fl_components.data.statistics import federation_standardized
from fl_components.data.types import DatasetInfo, SiteData, Split
from fl_components.errors import ConfigError, RoundError
from fl_components.parameters import NDArrays
from fl_components.privacy.dp_fedavg import SecureRandom
from fl_components.round.types import LocalUpdate, Metrics, SiteInstructions
from fl_components.site.dpsgd import private_local_train
from fl_components.site.models import build_model
from fl_components.site.training import evaluate, local_train

CENTRAL_DIR = "_central"
log = logging.getLogger(__name__)
# (site, train file, mtime, size) already warned about in this process: a site loads its
# files for every job, the warning is said once per file version
_WARNED_UNSCALED: set[tuple[str, str, int, int]] = set()


def materialize_sites(config: FederationConfig, *, overwrite: bool = False) -> list[Path]:
    """Partition a bundled set into ``sites/<federation>/<site>/`` (train.npz, test.npz).

    Also writes the central test split to ``sites/<federation>/_central/test.npz``. Existing
    folders are kept unless ``overwrite`` (the same seed rebuilds the same split).
    """
    if config.data.source != "bundled":
        raise ConfigError(
            "data.source is 'site_files': sites bring their own data; nothing to partition"
        )
    root = federation_dir(config)
    folders = [root / name for name in config.site_names]
    central = root / CENTRAL_DIR / "test.npz"
    if not overwrite and central.is_file() and all((f / "train.npz").is_file() for f in folders):
        return folders
    d = config.data
    sites, central_test = partition_bundled(
        dataset=d.dataset,
        site_names=config.site_names,
        partitioner=d.partitioner,
        alpha=d.alpha,
        shards_per_site=d.shards_per_site,
        quantity_sigma=d.quantity_sigma,
        test_fraction=d.test_fraction,
        site_test_fraction=d.site_test_fraction,
        seed=config.seed,
        synthetic_alpha=d.synthetic_alpha,
        synthetic_beta=d.synthetic_beta,
    )
    for site in sites:
        write_site(root, site)
    write_split(central, central_test)
    return folders


def central_test_split(config: FederationConfig) -> Split | None:
    """The coordinator's central test split (bundled sets only; None for real sites)."""
    if config.data.source != "bundled":
        return None
    return read_split(federation_dir(config) / CENTRAL_DIR / "test.npz")


def round_target(site_count: int, *, fraction: float, minimum: int) -> int:
    """How many updates a round needs: max(minimum, ceil(fraction * n)), at most n."""
    return min(site_count, max(minimum, int(np.ceil(fraction * site_count))))


def select_participants(
    site_names: tuple[str, ...],
    *,
    fraction: float,
    minimum: int,
    round_num: int,
    seed: int,
    secret: bool = False,
    extra: int = 0,
) -> tuple[str, ...]:
    """Pick a round's cohort: a reproducible uniform draw, or a secret Poisson sample.

    By default: max(minimum, ceil(fraction * n)) sites drawn uniformly without replacement,
    reproducible from ``(seed, round_num)``, plus ``extra`` over-selected ones (at most n).

    With ``secret=True`` (participant-level DP with ``privacy.sampling: random``): every
    site is included independently with probability q = ``fraction``, from the OS's CSPRNG
    (:class:`~fl_components.privacy.dp_fedavg.SecureRandom`), as DP-FedAvg samples
    (McMahan et al. 2018, arXiv:1710.06963, Algorithm 1) and as the accountant assumes;
    nobody holding the config can replay it. The cohort may then be empty or smaller than
    ``minimum``: it is returned as drawn, and the caller accounts the round at q whatever
    it does next (see :meth:`fl_components.privacy.rounds.PrivacyRounds.cohort_too_small`);
    redrawing until the cohort is big enough would change q.
    """
    n = len(site_names)
    if secret:
        included = SecureRandom().uniform(n) < fraction
        return tuple(name for name, keep in zip(site_names, included, strict=True) if keep)
    count = min(n, max(minimum, int(np.ceil(fraction * n))) + extra)
    if count < minimum:
        raise RoundError(f"only {n} site(s) available, participation.min_participants is {minimum}")
    rng = np.random.default_rng([seed, round_num, 0xF3D])
    chosen = rng.choice(n, size=count, replace=False)
    return tuple(site_names[i] for i in sorted(chosen))


@dataclass
class Site:
    """A participant's side: it reads only its own folder."""

    name: str
    folder: Path
    config: FederationConfig
    info: DatasetInfo

    def load(self) -> SiteData:
        """The site's own train and held-out splits, read by name against the contract."""
        data = load_configured_site(self.config, self.name, self.folder, info=self.info)
        if self.config.data.source == "site_files":
            self._warn_if_unscaled(data)
        if self.config.data.scale == "site":
            return standardize_site(data)
        if self.config.data.scale == "federation":
            return federation_standardized(data, self.config.data.scaling, site=self.name)
        return data

    def _warn_if_unscaled(self, data: SiteData) -> None:
        """Log once per file version when training features look unscaled or like an ID."""
        far = unscaled_columns(data.train) if self.config.data.scale == "none" else []
        if not far and not data.train.id_like:
            return
        train_file = find_split_file(self.folder, "train", source=self.config.data.source)
        stat = train_file.stat()
        key = (self.name, str(train_file.resolve()), stat.st_mtime_ns, stat.st_size)
        if key in _WARNED_UNSCALED:
            return
        _WARNED_UNSCALED.add(key)
        if data.train.id_like:
            log.warning(
                "site %s: %s has column(s) %s that differ on every row (an ID?): a model can "
                "only memorize them; move them from data.columns to data.drop unless they "
                "are real features",
                self.name,
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
            self.name,
            train_file,
            shown,
            more,
            SCALE_MAX_ABS_MEAN,
            SCALE_MIN_STD,
            SCALE_MAX_STD,
        )

    def train(
        self,
        global_parameters: NDArrays,
        *,
        round_num: int,
        seed: int,
        instructions: SiteInstructions | None = None,
        spent_by: tuple[str, str] = ("", ""),
    ) -> LocalUpdate:
        """Local training from the global parameters, as the strategy instructs.

        ``spent_by``: the coordinator's (MLflow run id, Prefect flow run id), written into the
        site's privacy ledger with what a DP-SGD round spends.
        """
        instructions = instructions if instructions is not None else SiteInstructions()
        data = self.load()
        model = build_model(self.config.model, self.info, seed=self.config.seed)
        if self.config.privacy.record_level:
            return private_local_train(
                model,
                global_parameters,
                data.train,
                self.config,
                site=self.name,
                folder=self.folder,
                round_num=round_num,
                seed=seed,
                instructions=instructions,
                mlflow_run_id=spent_by[0] or None,
                flow_run_id=spent_by[1] or None,
            )
        return local_train(
            model,
            global_parameters,
            data.train,
            self.config.training,
            site=self.name,
            round_num=round_num,
            seed=seed,
            instructions=instructions,
            folder=self.folder,
        )

    def evaluate(self, parameters: NDArrays) -> Metrics:
        """Score the given global parameters on the site's held-out split."""
        data = self.load()
        model = build_model(self.config.model, self.info, seed=self.config.seed)
        return evaluate(model, parameters, data.test, device=self.config.training.device)
