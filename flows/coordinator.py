"""What the coordinator holds across one run, and how it plans and records each round.

Orchestration helpers for :func:`flows.federated_training.federated_training` that are not
Prefect tasks: the run's fixed parts (:class:`Run`), the plan of a round (selection, seeds,
the folded evaluation, secure aggregation), and what is logged once a round's evaluation is
in. The round itself is :func:`fl_components.round.engine.run_round`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

import numpy as np
from prefect.runtime import flow_run

from fl_components.checkpoint import mark_round_started
from fl_components.compression.instruction import CompressionInstruction
from fl_components.config import FederationConfig
from fl_components.data.types import DatasetInfo, Split
from fl_components.errors import BudgetExhaustedError, FedpipeError
from fl_components.federated_statistics import with_federation_scaling
from fl_components.federation import (
    central_test_split,
    dataset_info,
    materialize_sites,
)
from fl_components.parameters import NDArrays, get_parameters
from fl_components.privacy.accounting import ClientRound
from fl_components.privacy.federation_ledger import FederationLedger, federation_ledger_path
from fl_components.privacy.participant_round import clip_norm_in_force, next_clip_norm
from fl_components.privacy.report import PRIVACY_REPORT_JSON, PRIVACY_REPORT_MD, report_markdown
from fl_components.privacy.rounds import PrivacyRounds, declined_record
from fl_components.round.engine import EvaluationRequest, RoundPlan, RoundReport
from fl_components.round.planning import draw_selection, plain_plan, strategy_for
from fl_components.round.types import Dropout, DropoutKind, Metrics
from fl_components.secure_aggregation.coordinator import SecureSum
from fl_components.strategies import ServerState, Strategy
from fl_components.strategies.private import DPFedAvg
from fl_components.task.loading import resolve_task, task_identity
from fl_components.tracking import (
    RunLink,
    RunTracker,
    load_registered_parameters,
    load_run_model,
    registered_run_id,
)
from flows.resume import ResumePoint, close_crashed_attempt, find_resume_point, run_folder
from tasks.evaluation import evaluate_global
from tasks.privacy import log_privacy
from tasks.sites import LocalBackend, SiteBackend
from tasks.tracking import log_round, round_markdown, run_logger

log = logging.getLogger(__name__)


class RunCancelledError(FedpipeError):
    """The run's own Prefect flow run was cancelled: it stops, nothing more is trained."""


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
    resumed: ResumePoint | None = None  # a crashed run picked up again (flows.resume)

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
        run_logger().warning("no 'champion' model registered for %s; starting fresh", config.name)
    if config.init_from == "run" and config.init_run_id:
        return get_parameters(load_run_model(config.tracking, run_id=config.init_run_id)), "run"
    return get_parameters(model), "fresh"


def _reopen_crashed(tracker: RunTracker, resumed: ResumePoint, *, flow_run_id: str) -> RunLink:
    """Close the crashed attempt's runs and reopen its MLflow run (see :mod:`flows.resume`)."""
    crashed = tracker.client.get_run(resumed.mlflow_run_id).data.tags
    for line in close_crashed_attempt(
        crashed.get("prefect.flow_run_id", ""), current_flow_run_id=flow_run_id
    ):
        log.info("resume: %s", line)
    link = tracker.reopen(
        resumed.mlflow_run_id,
        tags={"fedpipe.resumed_by": flow_run_id, "fedpipe.resumed_from": str(resumed.next_round)},
    )
    log.warning("resuming MLflow run %s at round %d", link.run_id, resumed.next_round)
    return link


def _open_tracking(
    config: FederationConfig,
    tracker: RunTracker,
    strategy: Strategy,
    *,
    origin: str,
    flow_run_id: str,
) -> RunLink:
    """A new MLflow run: tags that make the compare view useful, the effective strategy."""
    link = tracker.start(
        # the flow run's name is <federation>-<start time> (flows.naming)
        run_name=str(flow_run.get_name() or f"{config.name}-local"),
        tags={
            "prefect.flow_run_id": flow_run_id,
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
    tracker.log_task(task_identity(config).as_dict())
    scaling = config.data.scaling
    if scaling is not None and scaling.epsilon is not None:  # noised federated statistics
        tracker.log_metrics({"privacy/statistics_epsilon": scaling.epsilon}, step=0)
    return link


def start_run(config: FederationConfig, *, resume: str | None = None) -> tuple[Run, NDArrays]:
    """Prepare the data (embedded sites only), the model, the strategy; open the MLflow run.

    The MLflow run is a new one, or, resuming (``resume``, or a Prefect retry of this very
    flow run), the crashed run's, reopened (see :mod:`flows.resume`). Returned beside the
    run, not in it: θ_0, which the first state copies and nothing needs after that (a
    100M-parameter model is 400 MB the coordinator would otherwise hold all run).
    """
    if config.data.source == "bundled" and config.backend == "local":
        materialize_sites(config)  # work-pool: sites hold their own data; never touch it here
    if config.backend == "local":  # data.scale federation: the statistics stage, once
        config = with_federation_scaling(config)
    info = dataset_info(config)
    model = resolve_task(config, info).build_model(config.seed)
    parameters, origin = initial_parameters(config, model)
    privacy = PrivacyRounds(config)
    strategy = strategy_for(config)
    if config.privacy.participant_level:
        strategy = DPFedAvg(strategy, config)
    tracker = RunTracker(config)
    flow_run_id = str(flow_run.get_id() or "")
    resumed = find_resume_point(config, tracker, resume=resume, flow_run_id=flow_run_id)
    if resumed is not None:
        link = _reopen_crashed(tracker, resumed, flow_run_id=flow_run_id)
    else:
        link = _open_tracking(config, tracker, strategy, origin=origin, flow_run_id=flow_run_id)
    privacy.bind_run(link.run_id)  # record-level rows of the privacy report name it too
    run = Run(
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
        resumed=resumed,
    )
    return run, parameters


def starting_privacy(run: Run, state: ServerState) -> ServerState:
    """The participant-level privacy state the run's first round starts from.

    ``state``: the strategy's initial state, or the checkpoint's. The accountant's rounds of
    this run are the federation ledger's; resumed, every round the crashed attempt began
    that the ledger lacks is charged on top (:func:`charge_begun_rounds`).
    """
    if not run.config.privacy.participant_level:
        return state
    # resumed, ``state`` is the checkpoint's: its rounds, before the ledger's replace them
    begun = run.resumed.begun_steps(state) if run.resumed is not None else None
    state = attach_federation_ledger(
        run.config, run.privacy, state, mlflow_run_id=run.run_id, origin=run.origin
    )
    if run.resumed is not None and begun is not None:
        state = charge_begun_rounds(run.tracker, run.privacy, state, run.resumed, begun)
    return state


def attach_federation_ledger(
    config: FederationConfig,
    privacy: PrivacyRounds,
    state: ServerState,
    *,
    mlflow_run_id: str,
    origin: str,
) -> ServerState:
    """Compose this run's participant-level rounds with those its starting model spent.

    The parent is the champion's MLflow run (``init_from: champion``) or ``init_run_id``.
    Returns ``state`` holding this run's own rounds as the ledger has them.
    """
    parent = None
    if origin == "champion":
        parent = registered_run_id(config.tracking, name=config.name, alias="champion")
    elif origin == "run":
        parent = config.init_run_id
    path = federation_ledger_path(config.tracking, config.name)
    return privacy.attach_ledger(
        state,
        FederationLedger.load(path, federation=config.name),
        mlflow_run_id=mlflow_run_id,
        flow_run_id=str(flow_run.get_id() or "") or None,
        parent_run_id=parent,
    )


def charge_begun_rounds(
    tracker: RunTracker,
    privacy: PrivacyRounds,
    state: ServerState,
    resumed: ResumePoint,
    begun: list[ClientRound],
) -> ServerState:
    """Resuming: charge what the crashed attempt began and its records may lack (as spent).

    The federation ledger was charged when each round began; the checkpoint and
    ``started.json`` (``begun``: :meth:`ResumePoint.begun_steps`) make up for a ledger entry
    lost between the two writes. Returns ``state`` with them charged.
    """
    state, charged = privacy.settle(state, begun)
    unknown = sorted(r for r in resumed.started if r >= resumed.next_round)
    tags = {"privacy.client.unknown_rounds": ",".join(str(r) for r in unknown) or "none"}
    tracker.set_tags(tags)
    log.warning(
        "resume: participant-level rounds begun before the crash, outcome unknown, counted as "
        "spent: %s (%s newly charged; %d round(s) of this run accounted)",
        tags["privacy.client.unknown_rounds"],
        ", ".join(f"round {r}" for r in sorted(charged)) or "none",
        len(state.accountant_history),
    )
    return state


def begin_round(run: Run, state: ServerState, plan: RoundPlan) -> ServerState:
    """Record that the round began, then charge its participant-level step (write-ahead).

    Both happen before any site is sent anything: however the round ends (a crash
    included), its step is spent. Returns ``state`` with the step charged.
    """
    privacy = run.privacy
    entry = None
    if privacy.participant_level:
        entry = privacy.begin_round(plan.selected, round_num=plan.round)
    step = None if entry is None else entry.to_json()
    mark_round_started(run_folder(run.config, run.run_id), plan.round, privacy_step=step)
    if entry is not None:
        state, _ = privacy.charge(state, entry, round_num=plan.round)
    return state


def plan_round(
    run: Run, state: ServerState, *, round_num: int, evaluation: EvaluationRequest | None
) -> RoundPlan:
    """Select the round's sites and say how it runs (seeds, folded evaluation, secagg)."""
    config = run.config
    selected = draw_selection(config, round_num=round_num)
    if config.privacy.participant_level:  # refuse the round past privacy.max_client_epsilon
        run.privacy.check_round(state, selected, round_num=round_num)
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
    plan = plain_plan(config, round_num=round_num, selected=selected, evaluation=evaluation)
    return replace(
        plan,
        secure=secure,
        mlflow_run_id=run.run_id,
        flow_run_id=str(flow_run.get_id() or ""),
        # in the clear the site compresses its update; under SecAgg the round context does
        compression=None
        if secure is not None or not config.compression.enabled
        else CompressionInstruction(config.compression, run.run_id, round_num),
        downloads=run.backend.downloads,  # compression.download: delta (None: full models)
    )


def stop_if_cancelled(*, before: str) -> None:
    """Stop (raise) if this run's Prefect flow run is being cancelled or was cancelled.

    Prefect cancels a deployed run by having its worker kill the process; a worker whose
    cancellation observer failed (a Prefect server outage: "Flow run cancellation disabled")
    never does, and the run would train on and register a model. So the coordinator reads
    its own state between rounds and before it registers or promotes. A server that cannot
    be read now does not stop the run (the round's own calls wait the outage out).

    Raises
    ------
    RunCancelledError
        If the flow run is CANCELLING or CANCELLED.
    """
    flow_run_id = flow_run.get_id()
    if not flow_run_id:
        return
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except (httpx.HTTPError, ObjectNotFound) as error:
        log.warning("could not read this flow run's state before %s: %s", before, error)
        return
    if state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED):
        raise RunCancelledError(
            f"flow run {flow_run_id} is {state.type.value.lower()} "
            f"({state.message or 'cancelled'}): stopped before {before}; no model registered "
            "or promoted"
        )


def dropout_reasons(dropouts: list[Dropout]) -> dict[str, str]:
    """``{site: "<kind>: <reason>"}`` for the round's artifact and privacy bookkeeping."""
    return {d.site: str(d) for d in dropouts}


def declines(dropouts: list[Dropout]) -> dict[str, Dropout]:
    """The sites that declined for budget (typed: DropoutKind.DECLINED)."""
    return {d.site: d for d in dropouts if d.kind is DropoutKind.DECLINED}


def account_round(
    run: Run, report: RoundReport, state: ServerState
) -> tuple[dict[str, float], ServerState]:
    """Account participant-level DP, log the privacy params; the metrics and the new state.

    The accountant steps with the round's *selection* (q of the draw, not who answered);
    the step (charged when the round began) and the clip norm in force are the state's
    (what a checkpoint keeps).
    """
    privacy = run.privacy
    if not privacy.enabled:
        return {}, state
    if run.config.privacy.participant_level:
        private = report.aggregated.private
        state, _ = privacy.account(state, private, selected=report.selected, round_num=report.round)
        clip = clip_norm_in_force(run.config, state)
        if private is not None:  # adaptive clipping: the count is released with the update
            clip = next_clip_norm(run.config, clip, private, rng=privacy.rng)
        state = state.evolve(clip_norm=clip)
    declined = declines(report.dropouts)
    reasons = {site: d.reason for site, d in declined.items()}
    spent = {site: d.epsilon_spent for site, d in declined.items()}
    privacy.note_declines(reasons, spent, round_num=report.round)
    log_privacy(run.tracker, privacy.params(report.updates), reasons, round_num=report.round)
    metrics = privacy.metrics(
        state,
        report.updates,
        report.aggregated.private,
        declined={site: d.epsilon_spent for site, d in declined.items()},
    )
    return metrics, state


def skip_small_cohort(run: Run, state: ServerState, plan: RoundPlan) -> tuple[bool, ServerState]:
    """Under Poisson selection, skip (and still account) a cohort below min_participants.

    Returns True when the round was skipped (the global model is left unchanged), and the
    state (the round accounted when skipped).
    """
    privacy = run.privacy
    if not privacy.poisson or not privacy.cohort_too_small(plan.selected):
        return False, state
    state, _ = privacy.account(state, None, selected=plan.selected, round_num=plan.round)
    metrics = privacy.metrics(state, [], None, declined={})
    run.tracker.log_metrics(
        {**metrics, "selected": float(len(plan.selected)), "privacy/skipped": 1.0},
        step=plan.round,
    )
    log.warning(
        "round %d: the Poisson draw selected %d site(s), below participation.min_participants "
        "%d; round skipped (model unchanged) and accounted at q",
        plan.round,
        len(plan.selected),
        run.config.participation.min_participants,
    )
    return True, state


def record_aborted(run: Run, state: ServerState, plan: RoundPlan, dropouts: list[Dropout]) -> None:
    """Before an aborted round fails the run: account it, log who declined and the epsilon.

    ``state``: the one the round began with (its step charged). Accounting a round that
    released nothing over-counts at worst (never under-counts).
    """
    privacy = run.privacy
    if not privacy.enabled:
        return
    if run.config.privacy.participant_level:
        state, _ = privacy.account(state, None, selected=plan.selected, round_num=plan.round)
    declined = declines(dropouts)
    reasons = {site: d.reason for site, d in declined.items()}
    spent = {site: d.epsilon_spent for site, d in declined.items()}
    privacy.note_declines(reasons, spent, round_num=plan.round)
    metrics = privacy.metrics(state, [], None, declined=spent)
    record, tags = declined_record(reasons, round_num=plan.round)
    run.tracker.log_metrics({**metrics, **record}, step=plan.round)
    if tags:
        run.tracker.set_tags(tags)
    log_privacy_report(run, state)


def stop_for_budget(
    run: Run, state: ServerState, refusal: BudgetExhaustedError, *, round_num: int
) -> None:
    """A round refused for privacy.max_client_epsilon ends the run, cleanly.

    The refusal came before the round was charged or dispatched. The rounds before it were
    charged and are logged as usual (the last one once its evaluation is in), then the
    privacy report (saying which round was refused and why) and the last good model.
    """
    metrics = run.privacy.refuse(state, refusal, round_num=round_num)
    run.tracker.log_metrics(metrics, step=round_num)
    run.tracker.set_tags({"fedpipe.stopped": f"round {round_num}: {refusal}"[:5000]})
    log.warning("round %d refused, the run stops here: %s", round_num, refusal)


def log_privacy_report(run: Run, state: ServerState) -> None:
    """Log the run's privacy report at ``state``: privacy/privacy_report.json and .md."""
    if not run.privacy.enabled:
        return
    report = run.privacy.report(
        state, mlflow_run_id=run.run_id, flow_run_id=str(flow_run.get_id() or "") or None
    )
    run.tracker.log_dict(report, PRIVACY_REPORT_JSON)
    run.tracker.log_text(report_markdown(report), PRIVACY_REPORT_MD)


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
    # a site missing from the evaluation moves the federated score: say so (promotion too)
    metrics["eval/partial"] = float(len(scores) < len(run.config.site_names))
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
        extra_columns=run.privacy.columns(report.updates, declines(report.dropouts)),
    )
    log_round(run.tracker, metrics, markdown, federation=run.config.name, round_num=report.round)
    return metrics
