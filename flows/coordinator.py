"""What the coordinator holds across one run, and how it plans and records each round.

Orchestration helpers for :func:`flows.federated_training.federated_training` that are not
Prefect tasks: the run's fixed parts (:class:`Run`), the plan of a round (selection, seeds,
the folded evaluation, secure aggregation), and what is logged once a round's evaluation is
in. The round itself is :func:`fl_components.engine.run_round`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from prefect.runtime import flow_run

from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo, Split
from fl_components.engine import Dropout, EvaluationRequest, RoundPlan, RoundReport
from fl_components.federation import (
    central_test_split,
    dataset_info,
    materialize_sites,
    select_participants,
)
from fl_components.models import build_model
from fl_components.parameters import NDArrays, get_parameters
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.secure_aggregation import SecureSum
from fl_components.strategies import ServerState, Strategy, build_strategy
from fl_components.strategies.private import DPFedAvg
from fl_components.tracking import (
    RunLink,
    RunTracker,
    load_registered_parameters,
    load_run_model,
)
from fl_components.training import Metrics, seed_for
from tasks.privacy import log_privacy
from tasks.sites import LocalBackend, SiteBackend
from tasks.tracking import log_round, round_markdown
from tasks.training import evaluate_global

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """What stays fixed across the rounds of one run."""

    config: FederationConfig
    info: DatasetInfo
    backend: SiteBackend
    strategy: Strategy
    privacy: PrivacyRounds
    tracker: RunTracker
    link: RunLink
    central_test: Split | None
    origin: str
    initial_parameters: NDArrays

    @property
    def run_id(self) -> str:
        """The MLflow run id (also binds secure aggregation's messages to this run)."""
        return self.link.run_id


def build_backend(config: FederationConfig, info: DatasetInfo, *, run_id: str) -> SiteBackend:
    """The backend named by ``config.backend``."""
    if config.backend == "local":
        return LocalBackend(config, info)
    from tasks.work_pool import WorkPoolBackend  # needs a Prefect server

    return WorkPoolBackend(config, info, run_id=str(flow_run.get_id() or run_id))


def initial_parameters(config: FederationConfig, model: Any) -> tuple[NDArrays, str]:
    """Global θ_0: fresh weights from the seed, the registry champion's, or a run's."""
    if config.init_from == "champion":
        champion = load_registered_parameters(config.tracking, name=config.name, alias="champion")
        if champion is not None:
            return get_parameters(champion), "champion"
        log.warning("no 'champion' model registered for %s; starting fresh", config.name)
    if config.init_from == "run" and config.init_run_id:
        return get_parameters(load_run_model(config.tracking, run_id=config.init_run_id)), "run"
    return get_parameters(model), "fresh"


def start_run(config: FederationConfig) -> Run:
    """Prepare the data (embedded sites only), the model, the strategy; open the MLflow run."""
    if config.data.source == "bundled" and config.backend == "local":
        materialize_sites(config)  # work-pool: sites hold their own data; never touch it here
    info = dataset_info(config)
    model = build_model(config.model, info, seed=config.seed)
    parameters, origin = initial_parameters(config, model)
    privacy = PrivacyRounds(config)
    strategy = build_strategy(
        config.strategy, num_sites=len(config.sites), local_lr=config.training.lr
    )
    if config.privacy.participant_level:
        strategy = DPFedAvg(strategy, privacy)
    tracker = RunTracker(config)
    link = tracker.start(
        run_name=f"{config.name}-{flow_run.get_name() or 'local'}",
        tags={
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": str(flow_run.get_name() or ""),
            "prefect.flow_run_url": str(flow_run.get_flow_run_ui_url() or ""),
            "fedpipe.init_from": origin,
            "fedpipe.backend": config.backend,
            "fedpipe.strategy": config.strategy.name,
            "fedpipe.aggregator": config.strategy.aggregator,
        },
    )
    # what the rule really runs with (defaults resolved), beside the config as given
    tracker.log_params(
        {
            f"strategy.effective.{k.removeprefix('strategy.')}": v
            for k, v in strategy.params().items()
        }
    )
    return Run(
        config=config,
        info=info,
        backend=build_backend(config, info, run_id=link.run_id),
        strategy=strategy,
        privacy=privacy,
        tracker=tracker,
        link=link,
        # work-pool: the coordinator holds no data; the global score is the federated one
        central_test=central_test_split(config) if config.backend == "local" else None,
        origin=origin,
        initial_parameters=parameters,
    )


def plan_round(
    run: Run, state: ServerState, *, round_num: int, evaluation: EvaluationRequest | None
) -> RoundPlan:
    """Select the round's sites and say how it runs (seeds, folded evaluation, secagg)."""
    config = run.config
    selected = select_participants(
        config.site_names,
        fraction=config.participation.fraction,
        minimum=config.participation.min_participants,
        round_num=round_num,
        seed=config.seed,
        # client-sampling amplification holds only if nobody can replay the selection
        secret=config.privacy.participant_level and config.privacy.sampling == "random",
    )
    index = {name: i for i, name in enumerate(config.site_names)}
    secure = None
    if config.secure_aggregation.enabled:
        secure = SecureSum.for_round(
            config,
            run.backend.registry(),
            run_id=run.run_id,
            round_num=round_num,
            selected=selected,
            like=state.parameters,
        )
    return RoundPlan(
        round=round_num,
        selected=selected,
        seeds={
            s: seed_for(base=config.seed, round_num=round_num, site_index=index[s])
            for s in selected
        },
        min_participants=config.participation.min_participants,
        evaluation=evaluation,
        secure=secure,
    )


def dropout_reasons(dropouts: list[Dropout]) -> dict[str, str]:
    """``{site: "<kind>: <reason>"}`` for the round's artifact and privacy bookkeeping."""
    return {d.site: str(d) for d in dropouts}


def account_round(run: Run, report: RoundReport) -> dict[str, float]:
    """Account participant-level DP, log the privacy params; the round's privacy metrics."""
    privacy = run.privacy
    if not privacy.enabled:
        return {}
    survivors = tuple(u.site for u in report.updates)
    if report.aggregated.private is not None:
        privacy.account(report.aggregated.private, participants=survivors)
    dropouts = dropout_reasons(report.dropouts)
    log_privacy(run.tracker, privacy.params(report.updates), dropouts, round_num=report.round)
    return privacy.metrics(report.updates, dropouts, report.aggregated.private)


def evaluation_metrics(
    run: Run, parameters: NDArrays, scores: dict[str, Metrics], *, round_num: int
) -> dict[str, float]:
    """A federated evaluation's metrics, fairness across sites, and the central test split."""
    metrics: dict[str, float] = {}
    for site, score in scores.items():
        metrics[f"site/{site}/accuracy"] = score.accuracy
        metrics[f"site/{site}/loss"] = score.loss
    total = sum(s.examples for s in scores.values())
    if total:
        metrics["sites/mean_accuracy"] = (
            sum(s.accuracy * s.examples for s in scores.values()) / total
        )
        metrics["sites/mean_loss"] = sum(s.loss * s.examples for s in scores.values()) / total
        accuracies = np.array([s.accuracy for s in scores.values()], dtype=np.float64)
        metrics["sites/worst_accuracy"] = float(accuracies.min())
        metrics["sites/accuracy_std"] = float(accuracies.std())
        metrics["sites/accuracy_p10"] = float(np.percentile(accuracies, 10))
    metrics["eval/sites"] = float(len(scores))
    if run.central_test is not None:
        score = evaluate_global(
            run.config, run.info, parameters, run.central_test, round_num=round_num
        )
        metrics["global/accuracy"], metrics["global/loss"] = score.accuracy, score.loss
    else:  # real sites: the global score is the example-weighted federated evaluation
        metrics["global/accuracy"] = metrics.get("sites/mean_accuracy", float("nan"))
        metrics["global/loss"] = metrics.get("sites/mean_loss", float("nan"))
    return metrics


@dataclass(frozen=True)
class TrainedRound:
    """A round trained and applied, waiting for its federated evaluation to be logged."""

    report: RoundReport
    state: ServerState
    metrics: dict[str, float]
    started: float


def record_round(
    run: Run, trained: TrainedRound, scores: dict[str, Metrics], *, ended: float
) -> dict[str, float]:
    """Log a round once its evaluation is in: metrics at step = round, the round's artifact."""
    report = trained.report
    metrics = evaluation_metrics(run, trained.state.parameters, scores, round_num=report.round)
    # from the round's start to the next round's (the last: until its evaluation is in)
    metrics.update(trained.metrics, round_seconds=ended - trained.started)
    dropouts = dropout_reasons(report.dropouts)
    markdown = round_markdown(
        federation=run.config.name,
        round_num=report.round,
        metrics=metrics,
        site_metrics=scores,
        examples={u.site: u.num_examples for u in report.updates},
        dropouts=dropouts,
        extra_columns=run.privacy.columns(report.updates, dropouts),
    )
    log_round(run.tracker, metrics, markdown, federation=run.config.name, round_num=report.round)
    return metrics
