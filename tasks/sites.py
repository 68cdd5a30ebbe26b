"""Where a round's site jobs run: the backend interface and the local (embedded) backend.

A backend is a dispatch, ``backend(jobs) -> {site: SiteResult | Dropout}``, plus the
federation's public-key registry for secure aggregation. ``local`` (the embedded default)
runs each job as a Prefect task on the flow's task runner, sites being folders on this
machine; the ``work-pool`` backend (:mod:`tasks.work_pool`) sends each job to the site's
own work pool. Both run the same site-side code, :func:`fl_components.site.jobs.run_job`.
"""

from __future__ import annotations

import logging
import os
import queue
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components.compression.download import ModelDownloads
from fl_components.config import FederationConfig
from fl_components.data.types import DatasetInfo
from fl_components.federation import Site, site_folder
from fl_components.round.types import Dropout, DropoutKind, SiteJob, SiteResult
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.secure_aggregation.protocol import PublicKeys, Registry
from fl_components.site.jobs import InProcessSites, run_job
from fl_components.site.training import share_cores

log = logging.getLogger(__name__)


class SiteBackend(ABC):
    """Runs site jobs; the round engine's dispatch.

    ``downloads`` is the run's model-delta memory (``compression.download: delta``; None
    otherwise): what the coordinator knows its sites hold, handed to each round's plan.
    """

    downloads: ModelDownloads | None = None

    @abstractmethod
    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        """Run every job (one per site) and answer for each site."""

    @abstractmethod
    def registry(self) -> Registry:
        """The federation's public-key registry (public keys only)."""


def _answer_of(
    site: str,
    future: Any,
    *,
    parse: Callable[[str, Any], SiteResult] | None,
    kind_of: Callable[[Exception], DropoutKind],
) -> SiteResult | Dropout:
    """One site's answer from its future: its result (parsed), or a typed dropout."""
    try:
        result = future.result()
    except Exception as error:  # a site's failure must not sink the round
        log.warning("site %s failed: %s", site, error)
        return Dropout(site, kind_of(error), f"{type(error).__name__}: {error}")
    if parse is None:
        answer: SiteResult | Dropout = result
    else:
        try:
            answer = parse(site, result)
        except Exception as error:
            log.warning("site %s: answer refused: %s", site, error)
            return Dropout(site, DropoutKind.REJECTED, f"{type(error).__name__}: {error}")
    if isinstance(answer, SiteResult) and answer.refusal is not None:
        log.warning("site %s: %s", site, answer.refusal)
    return answer


def collect_answers(
    futures: Mapping[str, Any],
    *,
    parse: Callable[[str, Any], SiteResult] | None = None,
    kind_of: Callable[[Exception], DropoutKind] = lambda error: DropoutKind.FAILED,
) -> dict[str, SiteResult | Dropout]:
    """Wait for each site's future; an error becomes a typed :class:`Dropout`.

    ``parse(site, result)`` turns a raw result (a work-pool payload) into a
    :class:`SiteResult`; one it refuses fails the site as ``rejected``.
    """
    return {
        site: _answer_of(site, future, parse=parse, kind_of=kind_of)
        for site, future in futures.items()
    }


def stream_answers(
    futures: MutableMapping[str, Any],
    *,
    parse: Callable[[str, Any], SiteResult] | None = None,
    kind_of: Callable[[Exception], DropoutKind] = lambda error: DropoutKind.FAILED,
) -> Iterator[tuple[str, SiteResult | Dropout]]:
    """Each site's answer as its future completes, as :func:`collect_answers` reads it.

    Streaming aggregation: ``futures`` is consumed, each future removed once its answer is
    read, so an answer the round engine has folded and dropped is referenced by nothing here.
    """
    arrived: queue.SimpleQueue[str] = queue.SimpleQueue()
    for site, future in futures.items():
        register = getattr(future, "add_done_callback", None)
        if callable(register):
            register(lambda _done, site=site: arrived.put(site))
        else:  # a future without callbacks: read in turn (result() waits for it)
            arrived.put(site)
    while futures:
        site = arrived.get()
        future = futures.pop(site, None)
        if future is None:  # a callback fired twice
            continue
        answer = _answer_of(site, future, parse=parse, kind_of=kind_of)
        del future
        yield site, answer
        del answer


@task(name="site_job", task_run_name="{job.kind}-{job.site}-r{job.round}", cache_policy=NO_CACHE)
def site_job(config: FederationConfig, info: DatasetInfo, job: SiteJob) -> SiteResult:
    """One site's job, run here on the site's own folder (no retries: masks, DP noise)."""
    share_cores(config.training, sites=len(config.sites))  # this process trains many sites
    folder = site_folder(config, job.site)
    site = Site(name=job.site, folder=folder, config=config, info=info)
    return run_job(site, job, keys_dir=secure_round.site_keys_dir(folder))


@task(name="enroll", task_run_name="enroll-{site}", cache_policy=NO_CACHE)
def enroll_site(config: FederationConfig, *, site: str) -> PublicKeys:
    """Make the site's keys in its own folder if missing; return its public keys."""
    return secure_round.enroll_site(secure_round.site_keys_dir(site_folder(config, site)))


@task(
    name="site_cohort",
    task_run_name="cohort-{index}-r{round_num}",
    cache_policy=NO_CACHE,
)
def site_cohort(
    config: FederationConfig,
    info: DatasetInfo,
    jobs: list[SiteJob],
    *,
    index: int,
    round_num: int,
) -> dict[str, SiteResult | Dropout]:
    """Several sites' jobs in one task, one after another (simulations with many sites).

    A site's failure is its own dropout, as with one task per site.
    """
    share_cores(config.training, sites=len(config.sites))  # this process trains many sites
    return InProcessSites(config, info=info)(jobs)


def cohorts(jobs: Sequence[SiteJob], *, count: int) -> list[list[SiteJob]]:
    """``jobs`` dealt round-robin into at most ``count`` non-empty cohorts, order kept within."""
    dealt: list[list[SiteJob]] = [[] for _ in range(max(1, count))]
    for position, job in enumerate(jobs):
        dealt[position % len(dealt)].append(job)
    return [cohort for cohort in dealt if cohort]


class LocalBackend(SiteBackend):
    """Sites are folders on this machine; their jobs run on the flow's task runner.

    A wave of up to ``runner.cohort_threshold`` jobs runs one task per site
    (``train-site-03-r4``); a larger one (a simulation of 100+ sites) runs as two cohorts of
    sites per worker, one task each (``cohort-0-r4``), since the per-task cost of
    Prefect's engine and event recording then outweighs the training itself.
    """

    def __init__(self, config: FederationConfig, info: DatasetInfo) -> None:
        self.config = config
        self.info = info
        self._registry: Registry | None = None
        self.downloads = ModelDownloads.from_config(config)

    def stream(self, jobs: Sequence[SiteJob]) -> Iterator[tuple[str, SiteResult | Dropout]]:
        """Submit every job, then each answer as it arrives (streaming aggregation).

        Above ``runner.cohort_threshold`` each cohort's answers arrive together.
        """
        if len(jobs) > self.config.runner.cohort_threshold:
            yield from self(jobs).items()
            return
        futures = {job.site: site_job.submit(self.config, self.info, job) for job in jobs}
        yield from stream_answers(futures)

    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        """Submit every job (or cohort) at once, then wait for each (a failure drops it)."""
        if len(jobs) <= self.config.runner.cohort_threshold:
            futures = {job.site: site_job.submit(self.config, self.info, job) for job in jobs}
            return collect_answers(futures)
        workers = self.config.runner.workers or os.cpu_count() or 2
        groups = cohorts(jobs, count=2 * workers)
        submitted = [
            (
                group,
                site_cohort.submit(
                    self.config,
                    self.info,
                    group,
                    index=index,
                    round_num=max(job.round for job in group),
                ),
            )
            for index, group in enumerate(groups)
        ]
        answers: dict[str, SiteResult | Dropout] = {}
        for group, future in submitted:
            try:
                answers.update(future.result())
            except Exception as error:  # the whole cohort failed (e.g. its worker died)
                reason = f"{type(error).__name__}: {error}"
                answers.update({j.site: Dropout(j.site, DropoutKind.FAILED, reason) for j in group})
        return answers

    def registry(self) -> Registry:
        """Enrol the simulated sites (keys in each one's folder); publish their public keys.

        Each ``enroll-<site>`` task makes keys in that site's own folder (once) and hands
        back only the public half; the registry file is written here, once per run.
        """
        if self._registry is None:
            futures = {
                site: enroll_site.submit(self.config, site=site) for site in self.config.site_names
            }
            public = {site: future.result() for site, future in futures.items()}
            self._registry = secure_round.publish_public_keys(
                secure_round.registry_path(self.config), public
            )
        return self._registry
