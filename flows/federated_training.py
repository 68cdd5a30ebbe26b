"""The coordinator flow: one federated training run, round after round.

Per round: select participants, train them where their data lives, aggregate, update the
global model, evaluate it on every site and on the central test split, log the round. The
evaluation of round t's model travels with round t+1's training dispatch (the sites score the
model they receive before training from it), so a round costs one dispatch to the sites; a
round is logged once its evaluation is in, and one last evaluation follows the last round.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo, Split
from fl_components.errors import RoundError
from fl_components.federation import (
    central_test_split,
    dataset_info,
    materialize_sites,
    select_participants,
)
from fl_components.models import build_model
from fl_components.parameters import NDArrays, get_parameters, nbytes, set_parameters
from fl_components.privacy.rounds import PrivacyRounds, dropout_reason
from fl_components.strategies import ServerState, Strategy, build_strategy
from fl_components.tracking import (
    RunTracker,
    accuracy_plot,
    epsilon_plots,
    load_registered_parameters,
    load_run_model,
)
from fl_components.training import Metrics
from flows.progress import report
from tasks.participants import ParticipantBackend, TrainingOutcome, build_backend
from tasks.privacy import dp_aggregate, log_privacy
from tasks.promotion import promote_if_better
from tasks.secure_aggregation import secure_round
from tasks.tracking import log_round, round_markdown
from tasks.training import aggregate, evaluate_global, update_global

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


def _initial_parameters(config: FederationConfig, model: Any) -> tuple[NDArrays, str]:
    """Global θ_0: fresh weights from the seed, or the registry champion's weights."""
    if config.init_from == "champion":
        champion = load_registered_parameters(config.tracking, name=config.name, alias="champion")
        if champion is not None:
            return get_parameters(champion), "champion"
        get_run_logger().warning(
            "no 'champion' model registered for %s; starting fresh", config.name
        )
    if config.init_from == "run" and config.init_run_id:
        return get_parameters(load_run_model(config.tracking, run_id=config.init_run_id)), "run"
    return get_parameters(model), "fresh"


@dataclass(frozen=True)
class _Run:
    """What stays fixed across the rounds of one run."""

    config: FederationConfig
    info: DatasetInfo
    backend: ParticipantBackend
    strategy: Strategy
    privacy: PrivacyRounds
    tracker: RunTracker
    central_test: Split | None
    run_id: str


@dataclass(frozen=True)
class _Aggregate:
    """A round's training outcome and the mean update it yields."""

    outcome: TrainingOutcome
    mean_update: NDArrays
    dp_result: Any
    metrics: dict[str, float]


def _train_and_aggregate(
    run: _Run, state: ServerState, selected: tuple[str, ...], *, round_num: int
) -> _Aggregate:
    """Train the selected sites and aggregate: securely, with DP noise, or in the clear."""
    config = run.config
    if config.secure_aggregation.enabled:  # the coordinator learns only the sum
        secure = secure_round(
            config,
            run.backend,
            run.privacy,
            selected,
            state.parameters,
            run_id=run.run_id,
            round_num=round_num,
        )
        _require_quorum(config, secure.outcome, selected, round_num=round_num)
        # weighted (or DP-noised) at the sites, unmasked as a sum
        return _Aggregate(secure.outcome, secure.mean_update, secure.dp_result, secure.metrics)
    outcome = run.backend.train(selected, state.parameters, round_num=round_num)
    _require_quorum(config, outcome, selected, round_num=round_num)
    plain = {"bytes/up": float(sum(nbytes(u.delta) for u in outcome.updates))}
    if config.privacy.participant_level:  # DP-FedAvg noise added here (no secagg)
        dp_result = dp_aggregate(run.privacy, outcome.updates, round_num=round_num)
        run.privacy.account(dp_result, participants=tuple(u.site for u in outcome.updates))
        return _Aggregate(outcome, dp_result.mean_update, dp_result, plain)
    return _Aggregate(outcome, aggregate(outcome.updates, round_num=round_num), None, plain)


def _require_quorum(
    config: FederationConfig,
    outcome: TrainingOutcome,
    selected: tuple[str, ...],
    *,
    round_num: int,
) -> None:
    """Abort the round, global model untouched, when too few sites returned an update."""
    if len(outcome.updates) >= config.participation.min_participants:
        return
    reasons = "; ".join(f"{d.site}: {d.reason}" for d in outcome.dropouts)
    raise RoundError(
        f"round {round_num}: only {len(outcome.updates)} of {len(selected)} sites "
        f"returned an update, participation.min_participants is "
        f"{config.participation.min_participants} ({reasons}); the global model "
        "was left unchanged"
    )


@dataclass
class _TrainedRound:
    """A round trained and aggregated, waiting for its federated evaluation to be logged."""

    round_num: int
    state: ServerState
    metrics: dict[str, float]
    outcome: TrainingOutcome
    dropouts: dict[str, str]
    started: float


def _train_round(run: _Run, state: ServerState, *, round_num: int) -> _TrainedRound:
    """Select, train, aggregate, update; the evaluation comes with the next dispatch."""
    config = run.config
    started = time.perf_counter()
    selected = select_participants(
        config.site_names,
        fraction=config.participation.fraction,
        minimum=config.participation.min_participants,
        round_num=round_num,
        seed=config.seed,
        # client-sampling amplification holds only if nobody can replay the selection
        secret=config.privacy.participant_level and config.privacy.sampling == "random",
    )
    result = _train_and_aggregate(run, state, selected, round_num=round_num)
    outcome = result.outcome
    state = update_global(run.strategy, state, result.mean_update, round_num=round_num)
    dropouts = {d.site: dropout_reason(d.reason) for d in outcome.dropouts}
    examples = sum(u.num_examples for u in outcome.updates)
    metrics = {
        "participants": float(len(outcome.updates)),
        "dropouts": float(len(outcome.dropouts)),
        "bytes/down": float(nbytes(state.parameters) * len(selected)),
        "train/loss": sum(u.train_loss * u.num_examples for u in outcome.updates)
        / max(1, examples),
        "secagg/enabled": float(config.secure_aggregation.enabled),
        **result.metrics,
    }
    if run.privacy.enabled:
        metrics.update(run.privacy.metrics(outcome.updates, dropouts, result.dp_result))
        log_privacy(run.tracker, run.privacy.params(outcome.updates), dropouts, round_num=round_num)
    return _TrainedRound(round_num, state, metrics, outcome, dropouts, started)


def _log_trained_round(
    run: _Run, trained: _TrainedRound, site_scores: dict[str, Metrics], *, ended: float
) -> dict[str, float]:
    """Log a round once its federated evaluation is in: metrics at step = round, markdown."""
    config = run.config
    metrics = _evaluation_metrics(run, trained.state, site_scores, round_num=trained.round_num)
    # from the round's start to the next round's (the last: until its evaluation is in)
    metrics.update(trained.metrics, round_seconds=ended - trained.started)
    outcome = trained.outcome
    markdown = round_markdown(
        federation=config.name,
        round_num=trained.round_num,
        metrics=metrics,
        site_metrics=site_scores,
        examples={u.site: u.num_examples for u in outcome.updates},
        dropouts=trained.dropouts,
        extra_columns=run.privacy.columns(outcome.updates, trained.dropouts),
    )
    log_round(run.tracker, metrics, markdown, federation=config.name, round_num=trained.round_num)
    return metrics


def _evaluation_metrics(
    run: _Run, state: ServerState, site_scores: dict[str, Metrics], *, round_num: int
) -> dict[str, float]:
    """Metrics of a federated evaluation, plus the central test split when there is one."""
    config, info, central_test = run.config, run.info, run.central_test
    metrics: dict[str, float] = {}
    for site, score in site_scores.items():
        metrics[f"site/{site}/accuracy"] = score.accuracy
        metrics[f"site/{site}/loss"] = score.loss
    total = sum(s.examples for s in site_scores.values())
    if total:
        metrics["sites/mean_accuracy"] = (
            sum(s.accuracy * s.examples for s in site_scores.values()) / total
        )
        metrics["sites/mean_loss"] = sum(s.loss * s.examples for s in site_scores.values()) / total
    if central_test is not None:
        score = evaluate_global(config, info, state.parameters, central_test, round_num=round_num)
        metrics["global/accuracy"], metrics["global/loss"] = score.accuracy, score.loss
    else:  # real sites: the global score is the example-weighted federated evaluation
        metrics["global/accuracy"] = metrics.get("sites/mean_accuracy", float("nan"))
        metrics["global/loss"] = metrics.get("sites/mean_loss", float("nan"))
    return metrics


def _log_final_model(
    config: FederationConfig,
    info: DatasetInfo,
    tracker: RunTracker,
    state: ServerState,
    central_test: Split | None,
) -> str | None:
    """Log (and register) the final global model with a signature."""
    import numpy as np

    final_model = build_model(config.model, info, seed=config.seed)
    set_parameters(final_model, state.parameters)
    # an input example from the public central split; for real sites, zeros (no site data)
    example = (
        central_test.features[:4]
        if central_test is not None
        else np.zeros((2, info.n_features), dtype=np.float32)
    )
    return tracker.log_model(
        final_model, input_example=example, register=config.tracking.register_model
    )


@flow(name="federated-training", flow_run_name="{config.name}", log_prints=True)
def federated_training(config: FederationConfig = FederationConfig()) -> TrainingSummary:  # noqa: B008
    """Train a global model across the federation's sites for ``config.rounds`` rounds."""
    logger = get_run_logger()
    if config.data.source == "bundled" and config.backend == "local":
        materialize_sites(config)  # work-pool: sites hold their own data; never touch it here
    info = dataset_info(config)
    # work-pool: the coordinator holds no data; the global score is the federated evaluation
    central_test = central_test_split(config) if config.backend == "local" else None
    model = build_model(config.model, info, seed=config.seed)
    initial, origin = _initial_parameters(config, model)
    state = ServerState(round=0, parameters=initial)
    strategy = build_strategy(config.strategy)
    backend = build_backend(config, info)

    tracker = RunTracker(config)
    link = tracker.start(
        run_name=f"{config.name}-{flow_run.get_name() or 'local'}",
        tags={
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": str(flow_run.get_name() or ""),
            "prefect.flow_run_url": str(flow_run.get_flow_run_ui_url() or ""),
            "fedpipe.init_from": origin,
            "fedpipe.backend": config.backend,
        },
    )
    report("start", {"config": config, "run_id": link.run_id})
    logger.info("MLflow run %s in experiment %s", link.run_id, link.experiment_id)

    history: list[dict[str, float]] = []
    run = _Run(
        config=config,
        info=info,
        backend=backend,
        strategy=strategy,
        privacy=PrivacyRounds(config),
        tracker=tracker,
        central_test=central_test,
        run_id=link.run_id,
    )
    status = "FAILED"
    baseline: dict[str, float] = {}
    initial_state = state

    def record(awaiting: _TrainedRound | None, scores: dict[str, Metrics], *, ended: float) -> None:
        """Log the round (None: the baseline, round 0) whose evaluation just came in."""
        nonlocal baseline
        if awaiting is None:
            baseline = _evaluation_metrics(run, initial_state, scores, round_num=0)
            tracker.log_metrics(baseline, step=0)
            return
        metrics = _log_trained_round(run, awaiting, scores, ended=ended)
        history.append({"round": float(awaiting.round_num), **metrics})
        report("round", {"round": awaiting.round_num, "metrics": metrics})
        logger.info(
            "round %d/%d: accuracy %.4f loss %.4f (%d participants, %.2fs)",
            awaiting.round_num,
            config.rounds,
            metrics["global/accuracy"],
            metrics["global/loss"],
            int(metrics["participants"]),
            metrics["round_seconds"],
        )

    try:
        # a round's federated evaluation rides along with the next round's dispatch (the
        # next round trains from that very model), then one last evaluation after the end
        backend.request_evaluation(config.site_names, state.parameters, round_num=0)
        awaiting: _TrainedRound | None = None
        for round_num in range(1, config.rounds + 1):
            try:
                trained = _train_round(run, state, round_num=round_num)
            except BaseException:
                with contextlib.suppress(Exception):  # keep what the previous round measured
                    record(awaiting, backend.collect_evaluation(), ended=time.perf_counter())
                raise
            record(awaiting, backend.collect_evaluation(), ended=trained.started)
            state, awaiting = trained.state, trained
            backend.request_evaluation(config.site_names, state.parameters, round_num=round_num)
        site_scores = backend.collect_evaluation()
        record(awaiting, site_scores, ended=time.perf_counter())

        tracker.log_figure(accuracy_plot(history), "plots/accuracy.png")
        if run.privacy.enabled and any("privacy/epsilon" in row for row in history):
            per_round, trade_off = epsilon_plots(history)
            tracker.log_figure(per_round, "plots/epsilon.png")
            tracker.log_figure(trade_off, "plots/accuracy_vs_epsilon.png")
        version = _log_final_model(config, info, tracker, state, central_test)
        if version is not None:
            # site_scores: the last federated evaluation (the baseline's if no round ran)
            promote_if_better(
                config, backend, tracker, version=version, challenger_scores=site_scores
            )
        status = "FINISHED"
    finally:
        tracker.end(status=status)

    last = history[-1] if history else baseline
    summary = TrainingSummary(
        federation=config.name,
        mlflow_run_id=link.run_id,
        experiment_id=link.experiment_id,
        tracking_uri=link.tracking_uri,
        rounds=config.rounds,
        final_accuracy=last["global/accuracy"],
        final_loss=last["global/loss"],
        model_version=version,
        history=history,
        prefect_flow_run_id=str(flow_run.get_id() or ""),
    )
    report("end", {"summary": summary})
    return summary
