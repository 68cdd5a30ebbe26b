"""The participant backend interface: where a round's site work runs.

``local`` (the embedded default) submits each site's task to Prefect's in-process task
runner; the ``work-pool`` backend dispatches the participant flow to each site's own work
pool. The coordinator flow talks only to :class:`ParticipantBackend`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo
from fl_components.parameters import NDArrays
from fl_components.training import LocalUpdate, Metrics, seed_for
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


class ParticipantBackend(ABC):
    """Runs a round's site work: local training of the selected sites and evaluation."""

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


class LocalBackend(ParticipantBackend):
    """Sites are folders on this machine; their tasks run on the flow's task runner."""

    def __init__(self, config: FederationConfig, info: DatasetInfo) -> None:
        self.config = config
        self.info = info

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


def build_backend(config: FederationConfig, info: DatasetInfo) -> ParticipantBackend:
    """The backend named by ``config.backend``."""
    if config.backend == "local":
        return LocalBackend(config, info)
    from tasks.work_pool import WorkPoolBackend  # imported lazily: needs a Prefect server

    return WorkPoolBackend(config, info)
