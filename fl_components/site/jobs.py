"""The participant's side of a round, written once for every backend.

:func:`run_job` runs one :class:`~fl_components.round.engine.SiteJob` at a site that reads only its
own folder: score the received model (the folded evaluation), train from it, mask the update
(secure aggregation, stage 1) or answer an unmask request (stage 2). The local backend calls
it from a Prefect task, the work-pool participant flow from the site's own worker, the bare
benchmark loop directly.

Refusals the site makes on purpose come back typed, never as an error string to parse: a
privacy budget that would be exceeded is a ``declined`` dropout, unreadable or mis-shaped
data a ``bad_data`` one. Any other error propagates, and the backend reports it as
``failed``.

A job with a ``download`` (``compression.download: delta``) first rebuilds the model at
the site (:func:`receive`): the delta applied to the model the site holds, or, when that
model does not hash to the delta's base, the full model; the answer says which it used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fl_components.compression.download import (
    DownloadKind,
    ModelDownloads,
    apply_download,
    full_download,
    receive_model,
)
from fl_components.compression.site import compress_local_update
from fl_components.config import FederationConfig
from fl_components.data.types import DatasetInfo
from fl_components.errors import BudgetExhaustedError, ConfigError, DataError, FedpipeError
from fl_components.exchange import SITE_DIR_ENV, SITE_NAME_ENV
from fl_components.federation import Site, dataset_info, site_folder
from fl_components.round.types import Dropout, DropoutKind, JobKind, Metrics, SiteJob, SiteResult
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.secure_aggregation.protocol import RoundContext

log = logging.getLogger(__name__)


def _evaluate_first(site: Site, job: SiteJob) -> Metrics | None:
    """The folded evaluation: score the received model before training from it."""
    if job.evaluate_round is None or job.parameters is None:
        return None
    return site.evaluate(job.parameters)


def _work(site: Site, job: SiteJob, keys_dir: Path, evaluation: Metrics | None) -> SiteResult:
    if job.kind is JobKind.EVALUATE:
        if job.parameters is None:
            raise FedpipeError(f"site {site.name!r}: evaluate job without a model")
        return SiteResult(site=site.name, evaluation=site.evaluate(job.parameters))
    if job.kind is JobKind.UNMASK:
        if not isinstance(job.secagg, RoundContext) or job.unmask_request is None:
            raise FedpipeError(f"site {site.name!r}: unmask job without context or request")
        registry = secure_round.load_registry(
            secure_round.registry_path(site.config), sites=job.secagg.participants
        )
        response = secure_round.unmask_at_site(
            site.name,
            site.folder,
            job.secagg,
            job.unmask_request,
            registry=registry,
            keys_dir=keys_dir,
        )
        return SiteResult(site=site.name, unmask_response=response, bytes_up=len(response))
    if job.parameters is None:
        raise FedpipeError(f"site {site.name!r}: {job.kind} job without a model")
    if job.kind is JobKind.MASK:
        if not isinstance(job.secagg, RoundContext):
            raise FedpipeError(f"site {site.name!r}: mask job without a round context")
        registry = secure_round.load_registry(
            secure_round.registry_path(site.config), sites=job.secagg.participants
        )
        masked = secure_round.mask_at_site(
            site,
            job.parameters,
            job.secagg,
            registry=registry,
            keys_dir=keys_dir,
            seed=job.seed,
            instructions=job.instructions,
            spent_by=(job.mlflow_run_id, job.flow_run_id),
        )
        return SiteResult(
            site=site.name, masked=masked, evaluation=evaluation, bytes_up=len(masked.payload)
        )
    update = site.train(
        job.parameters,
        round_num=job.round,
        seed=job.seed,
        instructions=job.instructions,
        spent_by=(job.mlflow_run_id, job.flow_run_id),
    )
    if job.compression is not None and job.compression.config.enabled:
        update, message = compress_local_update(
            update, instruction=job.compression, site_dir=site.folder, seed=job.seed
        )
        return SiteResult(
            site=site.name,
            update=update,
            evaluation=evaluation,
            bytes_up=message.nbytes,
            upload=message,
        )
    return SiteResult(site=site.name, update=update, evaluation=evaluation)


def receive(site: Site, job: SiteJob) -> tuple[SiteJob, DownloadKind | None]:
    """Rebuild the job's model from its ``download`` at ``site``; which download was used.

    The delta is applied to the model the site holds if that hashes to the delta's base;
    otherwise the site takes the full model (here in this process: ``job.parameters``). The
    result is verified against the broadcast hash and kept as the site's held model.

    Raises
    ------
    CompressionError
        If the rebuilt model does not hash to the broadcast's (corrupt or mismatched).
    """
    download = job.download
    if download is None or job.parameters is None:
        return job, None
    like = job.parameters
    full = download if download.kind is DownloadKind.FULL else full_download(like)
    model, used = receive_model(
        site.folder,
        base_sha=download.base_sha,
        apply_delta=lambda held: apply_download(download, held=held, like=like),
        fetch_full=lambda: apply_download(full, held=None, like=like),
    )
    return replace(job, parameters=model, download=None), used


def run_job(site: Site, job: SiteJob, *, keys_dir: str | os.PathLike[str]) -> SiteResult:
    """Run ``job`` at ``site``; a deliberate refusal comes back as ``SiteResult.refusal``.

    Parameters
    ----------
    site : Site
        The site, reading only its own folder.
    job : SiteJob
        What to do (its ``site`` must be this site).
    keys_dir : path
        The site's long-term secure-aggregation keys (``mask``/``unmask`` only).

    Raises
    ------
    FedpipeError
        If the job is for another site or lacks what its kind needs; any error other than a
        budget refusal or bad data propagates.
    """
    if job.site != site.name:
        raise FedpipeError(f"this is site {site.name!r}; refusing a job for site {job.site!r}")
    evaluation: Metrics | None = None
    job, received = receive(site, job)
    try:
        evaluation = _evaluate_first(site, job)
        return replace(_work(site, job, Path(keys_dir), evaluation), received=received)
    except BudgetExhaustedError as error:
        spent = getattr(error, "spent", None)  # SiteBudgetExhausted: the ledger's figure
        refusal = Dropout(site.name, DropoutKind.DECLINED, str(error), epsilon_spent=spent)
    except DataError as error:
        refusal = Dropout(site.name, DropoutKind.BAD_DATA, str(error))
    return SiteResult(site=site.name, evaluation=evaluation, refusal=refusal, received=received)


def site_from_environment(config: FederationConfig, name: str) -> Site:
    """The site this worker serves, from its environment; refuses another site's work.

    Raises
    ------
    ConfigError
        If the worker was started without ``FEDPIPE_SITE_DIR`` or for another site.
    """
    folder = os.environ.get(SITE_DIR_ENV)
    if not folder:
        raise ConfigError(
            f"{SITE_DIR_ENV} is not set in this worker's environment; start the site's worker "
            f"as `{SITE_DIR_ENV}=/path/to/data {SITE_NAME_ENV}={name} prefect worker start "
            f"--pool <site-pool>`"
        )
    served = os.environ.get(SITE_NAME_ENV)
    if served and served != name:
        raise ConfigError(
            f"this worker serves site {served!r} but was sent work for site {name!r}; "
            "check the deployment's work pool (sites[].work_pool)"
        )
    if name not in config.site_names:
        raise ConfigError(f"site {name!r} is not in federation {config.name!r}")
    return Site(name=name, folder=Path(folder), config=config, info=dataset_info(config))


class InProcessSites:
    """A dispatch with no orchestration at all: every job runs here, one after another.

    The bare loop of the benchmarks and the engine's own tests; sites are folders on this
    machine, as with the ``local`` backend, but no Prefect task wraps them.
    """

    def __init__(self, config: FederationConfig, *, info: DatasetInfo | None = None) -> None:
        self.config = config
        self.info = dataset_info(config) if info is None else info
        self.downloads = ModelDownloads.from_config(config)  # the run's model-delta memory

    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        """Run each job in turn; an unexpected error drops that site as ``failed``."""
        answers: dict[str, SiteResult | Dropout] = {}
        for job in jobs:
            folder = site_folder(self.config, job.site)
            site = Site(name=job.site, folder=folder, config=self.config, info=self.info)
            try:
                answers[job.site] = run_job(site, job, keys_dir=secure_round.site_keys_dir(folder))
            except Exception as error:  # a site's failure must not sink the round
                log.warning("site %s failed: %s", job.site, error)
                reason = f"{type(error).__name__}: {error}"
                answers[job.site] = Dropout(job.site, DropoutKind.FAILED, reason)
        return answers
