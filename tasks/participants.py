"""The participant backend interface: where a round's site work runs.

``local`` (the embedded default) submits each site's task to Prefect's in-process task
runner; the ``work-pool`` backend dispatches the participant flow to each site's own work
pool. The coordinator flow talks only to :class:`ParticipantBackend`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo
from fl_components.parameters import NDArrays
from fl_components.secagg import Registry, RoundContext
from fl_components.secure_round import MaskedContribution, publish_public_keys, registry_path
from fl_components.training import LocalUpdate, Metrics, seed_for
from tasks.secure_site import enroll_site, mask_site, unmask_site
from tasks.training import evaluate_site, local_train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dropout:
    """A selected site that returned no update this round, and why."""

    site: str
    reason: str


@dataclass(frozen=True)
class TrainingOutcome:
    """The round's updates and the sites that dropped out."""

    updates: list[LocalUpdate]
    dropouts: list[Dropout]


@dataclass(frozen=True)
class MaskedOutcome:
    """Secure aggregation, stage 1: the sites' masked messages and the sites that dropped."""

    contributions: list[MaskedContribution]
    dropouts: list[Dropout]


@dataclass(frozen=True)
class UnmaskOutcome:
    """Secure aggregation, stage 2: the survivors' unmask responses and who failed."""

    responses: dict[str, bytes]
    dropouts: list[Dropout]


def collect_results(
    futures: dict[str, Any],
    *,
    what: str,
    round_num: int,
    parse: Callable[[str, Any], Any] | None = None,
) -> tuple[dict, list[Dropout]]:
    """Wait for each site's future; a failure becomes a :class:`Dropout` naming the reason.

    ``parse(site, result)`` turns a result into what the round needs (a site's payload
    into its update, say); a result it refuses fails that site like an error would.
    """
    results, dropouts = {}, []
    for site, future in futures.items():
        try:
            result = future.result()
            results[site] = parse(site, result) if parse is not None else result
        except Exception as error:  # a site's failure must not sink the round
            log.warning("site %s failed %s in round %d: %s", site, what, round_num, error)
            dropouts.append(Dropout(site=site, reason=f"{type(error).__name__}: {error}"))
    return results, dropouts


class ParticipantBackend(ABC):
    """Runs a round's site work: local training of the selected sites and evaluation.

    Secure aggregation adds :meth:`registry`, :meth:`train_masked` (stage 1) and
    :meth:`unmask` (stage 2); a backend without them cannot run with it enabled.
    """

    @abstractmethod
    def train(
        self, sites: tuple[str, ...], global_parameters: NDArrays, *, round_num: int
    ) -> TrainingOutcome:
        """Train every selected site from the global parameters; collect updates."""

    @abstractmethod
    def evaluate(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int
    ) -> dict[str, Metrics]:
        """Score the parameters on every given site's held-out split."""

    _evaluation: tuple[tuple[str, ...], NDArrays, int] | None = None

    def request_evaluation(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int
    ) -> None:
        """Ask for the federated evaluation of round ``round_num``'s model on ``sites``.

        :meth:`collect_evaluation` returns the scores. A backend may fold the evaluation into
        its next dispatch (the next round trains from these very parameters) rather than give
        it a dispatch of its own; this one evaluates when the scores are collected.
        """
        self._evaluation = (tuple(sites), parameters, round_num)

    def collect_evaluation(self) -> dict[str, Metrics]:
        """The scores of the evaluation last requested (a failing site is left out).

        Raises
        ------
        RuntimeError
            If no evaluation was requested.
        """
        if self._evaluation is None:
            raise RuntimeError("collect_evaluation() without request_evaluation()")
        sites, parameters, round_num = self._evaluation
        self._evaluation = None
        return self.evaluate(sites, parameters, round_num=round_num)

    def registry(self) -> Registry:
        """The federation's public-key registry (public keys only)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support secure aggregation; "
            "set secure_aggregation.enabled: false or use backend 'local' or 'work-pool'"
        )

    def train_masked(
        self, sites: tuple[str, ...], global_parameters: NDArrays, ctx: RoundContext
    ) -> MaskedOutcome:
        """Stage 1: every selected site trains and returns its signed masked update."""
        raise NotImplementedError(f"{type(self).__name__} does not support secure aggregation")

    def unmask(self, requests: dict[str, bytes], ctx: RoundContext) -> UnmaskOutcome:
        """Stage 2: send each survivor its unmask request; collect the responses."""
        raise NotImplementedError(f"{type(self).__name__} does not support secure aggregation")


class LocalBackend(ParticipantBackend):
    """Sites are folders on this machine; their tasks run on the flow's task runner."""

    def __init__(self, config: FederationConfig, info: DatasetInfo) -> None:
        self.config = config
        self.info = info
        self._registry: Registry | None = None

    def train(
        self, sites: tuple[str, ...], global_parameters: NDArrays, *, round_num: int
    ) -> TrainingOutcome:
        """Submit all sites at once, then wait for each (a failure drops that site)."""
        index = {name: i for i, name in enumerate(self.config.site_names)}
        futures = {
            site: local_train.submit(
                self.config,
                self.info,
                global_parameters,
                site=site,
                round_num=round_num,
                seed=seed_for(base=self.config.seed, round_num=round_num, site_index=index[site]),
            )
            for site in sites
        }
        updates, dropouts = [], []
        for site, future in futures.items():
            try:
                updates.append(future.result())
            except Exception as error:  # a site's failure must not sink the round
                log.warning("site %s dropped out of round %d: %s", site, round_num, error)
                dropouts.append(Dropout(site=site, reason=f"{type(error).__name__}: {error}"))
        return TrainingOutcome(updates=updates, dropouts=dropouts)

    def evaluate(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int
    ) -> dict[str, Metrics]:
        """Evaluate on all sites concurrently; a failing site is left out and logged."""
        futures = {
            site: evaluate_site.submit(
                self.config, self.info, parameters, site=site, round_num=round_num
            )
            for site in sites
        }
        results = {}
        for site, future in futures.items():
            try:
                results[site] = future.result()
            except Exception as error:
                log.warning("site %s could not evaluate round %d: %s", site, round_num, error)
        return results

    def registry(self) -> Registry:
        """Enrol simulated sites without keys, publish their public keys; return the registry.

        Each ``enroll-<site>`` task makes keys in that site's own folder (once) and hands
        back only the public half; the registry file is written here, once per run.
        """
        if self._registry is None:
            futures = {
                site: enroll_site.submit(self.config, site=site) for site in self.config.site_names
            }
            public = {site: future.result() for site, future in futures.items()}
            self._registry = publish_public_keys(registry_path(self.config), public)
        return self._registry

    def train_masked(
        self, sites: tuple[str, ...], global_parameters: NDArrays, ctx: RoundContext
    ) -> MaskedOutcome:
        """Submit every site's ``mask-<site>-r<round>`` task; a failure drops that site."""
        index = {name: i for i, name in enumerate(self.config.site_names)}
        futures = {
            site: mask_site.submit(
                self.config,
                self.info,
                global_parameters,
                ctx,
                site=site,
                round_num=ctx.round,
                seed=seed_for(base=self.config.seed, round_num=ctx.round, site_index=index[site]),
            )
            for site in sites
        }
        results, dropouts = collect_results(futures, what="masking", round_num=ctx.round)
        return MaskedOutcome(contributions=list(results.values()), dropouts=dropouts)

    def unmask(self, requests: dict[str, bytes], ctx: RoundContext) -> UnmaskOutcome:
        """Submit every survivor's ``unmask-<site>-r<round>`` task."""
        futures = {
            site: unmask_site.submit(self.config, ctx, request, site=site, round_num=ctx.round)
            for site, request in requests.items()
        }
        results, dropouts = collect_results(futures, what="unmasking", round_num=ctx.round)
        return UnmaskOutcome(responses=results, dropouts=dropouts)


def build_backend(config: FederationConfig, info: DatasetInfo) -> ParticipantBackend:
    """The backend named by ``config.backend``."""
    if config.backend == "local":
        return LocalBackend(config, info)
    from tasks.work_pool import WorkPoolBackend  # imported lazily: needs a Prefect server

    return WorkPoolBackend(config, info)
