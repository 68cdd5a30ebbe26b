"""The coordinator flow: one federated training run, round after round.

Per round: plan (select the sites), run the round engine (dispatch the site jobs, validate,
aggregate, update the global model), account privacy, and log the previous round once its
federated evaluation, folded into this round's dispatch, is in. One last evaluation follows
the last round; then the final model is logged, registered and compared with the champion.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from fl_components.config import FederationConfig
from fl_components.data.check import model_input_names
from fl_components.data.types import DatasetInfo, Split
from fl_components.errors import BudgetExhaustedError
from fl_components.parameters import NDArrays, set_parameters
from fl_components.promotion import PromotionDecision
from fl_components.round.engine import (
    EvaluationRequest,
    RoundAbortedError,
    RoundPlan,
    RoundReport,
    evaluate_sites,
    run_round,
)
from fl_components.round.types import DropoutKind, Metrics
from fl_components.strategies import ServerState
from fl_components.task.loading import resolve_task
from fl_components.tracking import RunTracker, accuracy_plot, epsilon_plots
from flows.coordinator import (
    Run,
    RunCancelledError,
    TrainedRound,
    account_round,
    begin_round,
    evaluation_metrics,
    log_privacy_report,
    plan_round,
    record_aborted,
    record_round,
    skip_small_cohort,
    start_run,
    starting_privacy,
    stop_for_budget,
    stop_if_cancelled,
)
from flows.naming import coordinator_run_name
from flows.progress import report
from flows.resume import save_round
from flows.run_summary import publish_run_summary
from tasks.promotion import promote_if_better, round_losses
from tasks.tracking import run_logger

log = logging.getLogger(__name__)


@dataclass
class TrainingSummary:
    """What a finished run reports back."""

    federation: str
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    rounds: int
    final_accuracy: float
    final_loss: float
    model_version: str | None
    history: list[dict[str, float]] = field(default_factory=list)
    prefect_flow_run_id: str = ""
    promotion: str = ""  # "champion: <why>", "challenger: <why>"; "" if nothing registered


def _log_final_model(
    config: FederationConfig,
    info: DatasetInfo,
    tracker: RunTracker,
    state: ServerState,
    central_test: Split | None,
) -> str | None:
    """Log (and register) the final global model with a signature."""
    task = resolve_task(config, info)
    final_model = task.build_model(config.seed)
    set_parameters(final_model, state.parameters)
    # an input example from the public central split; otherwise the task's own (the
    # built-in tasks: zeros; the coordinator holds no site's data)
    example = central_test.features[:4] if central_test is not None else task.input_example()
    return tracker.log_model(
        final_model,
        input_example=example,
        register=config.tracking.register_model,
        input_names=model_input_names(config),
    )


def _record(
    run: Run,
    pending: TrainedRound | None,
    scores: dict[str, Metrics],
    history: list[dict[str, float]],
    *,
    start: ServerState,
    ended: float,
) -> None:
    """Log the round (None: the baseline, round 0) whose evaluation just came in; checkpoint it.

    ``start``: the state the round now running started from; with ``pending`` None its
    model is θ_0, which the baseline's central evaluation scores. Resumed, a round the
    crashed attempt logged already is only checkpointed (never logged twice at one step),
    and the baseline is not logged again.
    """
    logged = run.resumed.logged_rounds if run.resumed is not None else frozenset()
    round_num = 0 if pending is None else pending.report.round
    if round_num in logged:  # (resumed from a checkpoint: round 0 is always among them)
        if pending is not None:
            save_round(
                run.config, mlflow_run_id=run.run_id, state=pending.state,
                round_num=round_num, history=history,
            )  # fmt: skip
        return
    if pending is None:
        baseline = evaluation_metrics(run, start.parameters, scores, round_num=0)
        run.tracker.log_metrics(baseline, step=0)
        history.append({"round": 0.0, **baseline})
        return
    metrics = record_round(run, pending, scores, ended=ended)
    history.append({"round": float(round_num), **metrics})
    save_round(
        run.config, mlflow_run_id=run.run_id, state=pending.state,
        round_num=round_num, history=history,
    )  # fmt: skip
    report("round", {"round": pending.report.round, "metrics": metrics})
    run_logger().info(
        "round %d/%d: accuracy %.4f loss %.4f (%d participants, %.2fs)",
        pending.report.round,
        run.config.rounds,
        metrics["global/accuracy"],
        metrics["global/loss"],
        int(metrics["participants"]),
        metrics["round_seconds"],
    )


def _finish(
    run: Run, state: ServerState, history: list[dict[str, float]], scores: dict[str, Metrics]
) -> tuple[str | None, PromotionDecision | None]:
    """Plots, the final model (registered), and the champion/challenger decision."""
    rounds = [row for row in history if row["round"] > 0]
    run.tracker.log_figure(accuracy_plot(rounds), "plots/accuracy.png")
    if run.privacy.enabled and any("privacy/epsilon" in row for row in rounds):
        per_round, trade_off = epsilon_plots(rounds)
        run.tracker.log_figure(per_round, "plots/epsilon.png")
        run.tracker.log_figure(trade_off, "plots/accuracy_vs_epsilon.png")
    log_privacy_report(run, state)
    stop_if_cancelled(before="registering the final model")
    version = _log_final_model(run.config, run.info, run.tracker, state, run.central_test)
    decision = None
    if version is None:
        run_logger().warning(
            "no model registered (tracking.register_model is false): nothing to promote"
        )
    else:  # scores: the last federated evaluation
        stop_if_cancelled(before=f"promoting version {version}")
        decision = promote_if_better(
            run.config,
            run.backend,
            run.tracker,
            version=version,
            challenger_scores=scores,
            losses=round_losses(history),
            shapes=[tuple(p.shape) for p in state.parameters],
        )
    return version, decision


def _retry_worthwhile(run: Run, error: RoundAbortedError) -> bool:
    """Whether an aborted round may be tried again.

    Retries are configured, and no site declined for its budget (that does not pass).
    """
    declined = any(d.kind is DropoutKind.DECLINED for d in error.dropouts)
    return run.config.participation.round_retries > 0 and not declined


def _retry_round(
    run: Run, state: ServerState, error: RoundAbortedError, *, round_num: int
) -> tuple[RoundPlan, ServerState, RoundReport]:
    """Try an aborted round again, after a backoff that doubles each time (bounded).

    The previous round's evaluation is logged already (each attempt carries none). Each
    attempt begins, and is accounted, as a round of its own; a site asked again for the same
    round and model returns the release it kept (its ledger charges it once).

    Raises
    ------
    RoundAbortedError
        The last attempt's, once ``participation.round_retries`` are spent.
    """
    participation = run.config.participation
    for attempt in range(1, participation.round_retries + 1):
        wait = min(participation.retry_backoff_seconds * 2 ** (attempt - 1), 3600.0)
        reasons = "; ".join(f"{d.site}: {d.kind}" for d in error.dropouts)
        log.warning(
            "round %d aborted (%s); attempt %d of %d in %.0fs",
            round_num, reasons, attempt + 1, participation.round_retries + 1, wait,
        )  # fmt: skip
        time.sleep(wait)
        plan = plan_round(run, state, round_num=round_num, evaluation=None)
        state = begin_round(run, state, plan)  # each attempt charged: the next one sees it
        try:
            next_state, outcome = _run_round(run, state, plan)
        except RoundAbortedError as again:
            error = again
            if not _retry_worthwhile(run, again):
                break
            continue
        return plan, next_state, outcome
    record_aborted(run, state, plan, error.dropouts)
    raise RoundAbortedError(
        f"{error} (after {participation.round_retries} retries)",
        evaluations=error.evaluations,
        dropouts=error.dropouts,
    ) from None


def _after_abort(
    run: Run,
    pending: TrainedRound | None,
    state: ServerState,
    plan: RoundPlan,
    error: RoundAbortedError,
    history: list[dict[str, float]],
    *,
    round_num: int,
) -> tuple[RoundPlan, ServerState, RoundReport]:
    """An aborted round: log the previous round (its score still counts); retry, or raise."""
    _record(run, pending, error.evaluations, history, start=state, ended=time.perf_counter())
    if not _retry_worthwhile(run, error):
        record_aborted(run, state, plan, error.dropouts)
        raise error
    return _retry_round(run, state, error, round_num=round_num)


def _run_round(run: Run, state: ServerState, plan: RoundPlan) -> tuple[ServerState, RoundReport]:
    """One round through the engine; its report kept without the arrays it applied."""
    next_state, outcome = run_round(state, plan, run.backend, run.strategy)
    return next_state, outcome.released()


def _starting_point(
    run: Run, theta_0: NDArrays
) -> tuple[int, ServerState, list[dict[str, float]], EvaluationRequest | None]:
    """First round, state, history so far, and the evaluation the first dispatch carries."""
    point = run.resumed
    state = point.state() if point is not None else None
    if point is None or state is None:  # a fresh run: the baseline rides with round 1
        initial = starting_privacy(run, run.strategy.initial_state(theta_0))
        return 1, initial, [], EvaluationRequest(round=0, sites=run.config.site_names)
    # adaptive clipping goes on from state.clip_norm, where the checkpoint left it; the
    # accountant from the ledger's rounds and whatever the crashed attempt began
    return point.next_round, starting_privacy(run, state), point.history(), None


@flow(name="federated-training", flow_run_name=coordinator_run_name, log_prints=True)
def federated_training(
    config: FederationConfig = FederationConfig(),  # noqa: B008
    resume: str | None = None,
) -> TrainingSummary | State[None]:
    """Train a global model across the federation's sites for ``config.rounds`` rounds.

    ``resume``: the MLflow run id of a crashed run to go on with from its last checkpoint
    (a Prefect retry of a crashed run resumes by itself; see :mod:`flows.resume`).
    Cancelled (its flow run CANCELLING, seen between rounds or before the registration),
    it returns a ``Cancelled`` state: its MLflow run ends KILLED, nothing is registered.
    """
    run, theta_0 = start_run(config, resume=resume)
    report("start", {"config": config, "run_id": run.run_id})
    first, state, history, evaluation = _starting_point(run, theta_0)
    del theta_0  # the first state holds its own copy: one model fewer held all run
    pending: TrainedRound | None = None
    status, version, decision = "FAILED", None, None
    try:
        for round_num in range(first, config.rounds + 1):
            stop_if_cancelled(before=f"round {round_num}")
            try:
                plan = plan_round(run, state, round_num=round_num, evaluation=evaluation)
            except BudgetExhaustedError as refusal:  # nothing spent for it: stop cleanly
                stop_for_budget(run, state, refusal, round_num=round_num)
                break
            skipped, state = skip_small_cohort(run, begin_round(run, state, plan), plan)
            if skipped:  # begun (started.json, step charged); a Poisson draw too small
                continue
            started = time.perf_counter()
            try:
                next_state, outcome = _run_round(run, state, plan)
            except RoundAbortedError as error:  # the previous round's score still counts
                plan, next_state, outcome = _after_abort(
                    run, pending, state, plan, error, history, round_num=round_num
                )
            else:
                _record(run, pending, outcome.evaluations, history, start=state, ended=started)
            privacy_metrics, state = account_round(run, outcome, next_state)
            pending = TrainedRound(outcome, state, {**outcome.metrics, **privacy_metrics}, started)
            evaluation = EvaluationRequest(round=round_num, sites=config.site_names)
        scores = _final_scores(run, state, evaluation, last_round=first - 1)
        _record(run, pending, scores, history, start=state, ended=time.perf_counter())
        version, decision = _finish(run, state, history, scores)
        publish_run_summary(
            config, run.tracker, final=history[-1], version=version, decision=decision
        )
        status = "FINISHED"
    except RunCancelledError as cancelled:
        status = "KILLED"
        log.warning("%s", cancelled)
        return Cancelled(message=str(cancelled))
    except TerminationSignal:  # the worker killed it on cancellation (or it was stopped)
        status = "KILLED"
        raise
    finally:
        run.tracker.end(status=status)
    summary = _summary(run, history, version=version, decision=decision)
    report("end", {"summary": summary})
    return summary


def _final_scores(
    run: Run, state: ServerState, evaluation: EvaluationRequest | None, *, last_round: int
) -> dict[str, Metrics]:
    """The last round's evaluation (None: resumed after the last round, scored again here)."""
    if evaluation is None:  # resumed after the last round: score it for the promotion
        evaluation = EvaluationRequest(round=last_round, sites=run.config.site_names)
    return evaluate_sites(state.parameters, evaluation, run.backend)


def _summary(
    run: Run,
    history: list[dict[str, float]],
    *,
    version: str | None,
    decision: PromotionDecision | None,
) -> TrainingSummary:
    """What the flow returns: the run's links, its last round's figures, the promotion."""
    last = history[-1]
    return TrainingSummary(
        federation=run.config.name,
        mlflow_run_id=run.link.run_id,
        experiment_id=run.link.experiment_id,
        tracking_uri=run.link.tracking_uri,
        rounds=run.config.rounds,
        final_accuracy=last["global/accuracy"],
        final_loss=last["global/loss"],
        model_version=version,
        history=[row for row in history if row["round"] > 0],
        prefect_flow_run_id=str(flow_run.get_id() or ""),
        promotion="" if decision is None else f"{decision.alias}: {decision.reason}",
    )
