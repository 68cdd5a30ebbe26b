"""Champion/challenger promotion at the end of a training run.

The current champion's weights are evaluated on the same sites, through the same backend,
in the same run as the new model; :func:`fl_components.promotion.decide_promotion` decides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.parameters import get_parameters
from fl_components.promotion import (
    Coverage,
    Hold,
    PromotionDecision,
    common_scores,
    decide_promotion,
    evaluation_coverage,
    federated_accuracy,
    guard_rails,
    hold_back,
    majority_baseline,
)
from fl_components.round.engine import Dispatch, EvaluationRequest, evaluate_sites
from fl_components.round.types import Metrics
from fl_components.tracking import RunTracker, load_registered_parameters, registered_version
from tasks.tracking import run_logger

log = logging.getLogger(__name__)


def promote_if_better(
    config: FederationConfig,
    dispatch: Dispatch,
    tracker: RunTracker,
    *,
    version: str,
    challenger_scores: dict[str, Metrics],
    losses: Sequence[float] = (),
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> PromotionDecision:
    """Give ``version`` the alias ``champion`` or ``challenger`` and tag the run with why.

    ``losses``: the global loss per logged round, round 0 first (the divergence check).
    ``shapes``: the registered model's parameter shapes; a champion of other shapes (another
    architecture) is not sent to the sites, where it could only fail.
    A model that would be champion but fails a guard rail
    (:func:`fl_components.promotion.guard_rails`) is challenger unless ``config.promotion``
    allows that rail; the decision and its reason go to the flow run's log and the run's
    tags (``fedpipe.promotion_reason``, ``fedpipe.promotion_held``).
    See :func:`_record_decision` for the tags and metrics of the comparison.
    """
    # the guard rails judge the model's own evaluation (own_scores), not the narrowed one
    own_scores = challenger_scores
    champion_version = registered_version(config.tracking, name=config.name, alias="champion")
    challenger_scores, champion_scores = _scores_to_compare(
        config,
        dispatch,
        version=version,
        champion_version=champion_version,
        own_scores=own_scores,
        shapes=shapes,
    )
    coverage = evaluation_coverage(challenger_scores, config.site_names)
    challenger = federated_accuracy(challenger_scores)
    champion_accuracy = None if not champion_scores else federated_accuracy(champion_scores)
    decision = _against_champion(
        challenger=challenger,
        champion_accuracy=champion_accuracy,
        champion_scores=champion_scores,
        champion_version=champion_version,
        unscored=champion_scores is None
        and champion_version not in (None, version)
        and bool(challenger_scores),
        coverage=coverage,
    )
    decision, holds = _held_back(decision, config, own_scores=own_scores, losses=losses)
    _record_decision(
        tracker,
        config,
        decision,
        holds,
        version=version,
        champion_version=champion_version,
        coverage=coverage,
        metrics=_promotion_metrics(
            challenger, champion_accuracy, coverage=coverage, own=own_scores
        ),
    )
    return decision


def _scores_to_compare(
    config: FederationConfig,
    dispatch: Dispatch,
    *,
    version: str,
    champion_version: str | None,
    own_scores: dict[str, Metrics],
    shapes: Sequence[tuple[int, ...]] | None,
) -> tuple[dict[str, Metrics], dict[str, Metrics] | None]:
    """Challenger and champion scores on the sites that scored both (champion None: unscored)."""
    champion_scores = _champion_scores(
        config,
        dispatch,
        version=version,
        champion_version=champion_version,
        sites=own_scores,
        shapes=shapes,
    )
    if champion_scores is None:
        return own_scores, None
    return common_scores(own_scores, champion_scores)


def _promotion_metrics(
    challenger: float,
    champion_accuracy: float | None,
    *,
    coverage: Coverage,
    own: Mapping[str, Metrics],
) -> dict[str, float]:
    """The comparison's figures: both accuracies, its sites, the majority-class baseline."""
    metrics = {
        "promotion/challenger_accuracy": challenger,
        "promotion/sites": float(len(coverage.sites)),
        "promotion/partial": float(coverage.partial),
    }
    if champion_accuracy is not None:
        metrics["promotion/champion_accuracy"] = champion_accuracy
    baseline = majority_baseline(own)
    if baseline is not None:
        metrics["promotion/majority_baseline"] = baseline
    return metrics


def _held_back(
    decision: PromotionDecision,
    config: FederationConfig,
    *,
    own_scores: dict[str, Metrics],
    losses: Sequence[float],
) -> tuple[PromotionDecision, list[Hold]]:
    """The guard rails on the model's own evaluation; a champion held back to challenger."""
    holds = guard_rails(
        accuracy=federated_accuracy(own_scores),
        scores=own_scores,
        coverage=evaluation_coverage(own_scores, config.site_names),
        losses=losses,
        max_loss_growth=config.promotion.max_loss_growth,
    )
    return hold_back(decision, holds, allowed=config.promotion.allowed), holds


def _against_champion(
    *,
    challenger: float,
    champion_accuracy: float | None,
    champion_scores: dict[str, Metrics] | None,
    champion_version: str | None,
    unscored: bool,
    coverage: Coverage,
) -> PromotionDecision:
    """Champion or challenger on accuracy alone, before the guard rails have their say.

    ``unscored``: a champion exists but could not be scored; ``champion_scores`` empty: no
    site scored both models.
    """
    if unscored:  # no safetensors weights (an older fedpipe's model) or another architecture
        return PromotionDecision(
            "champion",
            f"champion version {champion_version} could not be scored (see the run's log: "
            "logged without safetensors weights, or another architecture); promoted with "
            f"federated accuracy {challenger:.4f} {coverage.describe()}",
            challenger,
            None,
        )
    if champion_scores is not None and not champion_scores:  # no site scored both models
        return PromotionDecision(
            "challenger",
            f"champion version {champion_version} scored on none of the sites that scored "
            "this model: no comparison, champion kept",
            challenger,
            None,
        )
    return decide_promotion(
        challenger_accuracy=challenger,
        champion_accuracy=champion_accuracy,
        champion_version=champion_version if champion_accuracy is not None else None,
        coverage=coverage,
    )


def _record_decision(
    tracker: RunTracker,
    config: FederationConfig,
    decision: PromotionDecision,
    holds: Sequence[Hold],
    *,
    version: str,
    champion_version: str | None,
    coverage: Coverage,
    metrics: Mapping[str, float],
) -> None:
    """The alias on ``version``; the decision and its reason to the log and the run's tags.

    Challenger and champion are compared on the sites that scored both; the run is tagged
    ``fedpipe.eval_partial`` and logs ``metrics`` (``promotion/sites`` /
    ``promotion/partial``, ...) at its last step for that comparison (``eval/sites`` /
    ``eval/partial`` at the last step are the evaluation's own, logged with the round: once
    per step).
    """
    tracker.set_alias(decision.alias, version)
    run_logger().log(
        logging.INFO if decision.alias == "champion" and not holds else logging.WARNING,
        "promotion: model %s version %s is %s: %s",
        config.name,
        version,
        decision.alias,
        decision.reason,
    )
    tags = {
        "fedpipe.promotion": decision.alias,
        "fedpipe.promotion_reason": decision.reason[:5000],
        "fedpipe.promotion_held": ",".join(h.rail for h in holds) or "none",
        "fedpipe.model_version": version,
        "fedpipe.eval_partial": str(coverage.partial).lower(),
    }
    if champion_version is not None:
        tags["fedpipe.previous_champion"] = champion_version
    tracker.set_tags(tags)
    tracker.log_metrics(metrics, step=config.rounds)


def round_losses(history: Sequence[Mapping[str, float]]) -> list[float]:
    """The global loss per logged round, round 0 first, for the divergence check.

    A round no site scored (and with no central test split) has no loss: left out, so that
    a lost evaluation does not read as divergence.
    """
    rows = sorted((r for r in history if "global/loss" in r), key=lambda r: r["round"])
    return [
        r["global/loss"]
        for r in rows
        if math.isfinite(r["global/loss"]) or r.get("eval/sites", 1.0) > 0
    ]


def _champion_scores(
    config: FederationConfig,
    dispatch: Dispatch,
    *,
    version: str,
    champion_version: str | None,
    sites: dict[str, Metrics],
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> dict[str, Metrics] | None:
    """The champion's federated evaluation on ``sites``; None without a champion to score."""
    if champion_version is None or champion_version == version or not sites:
        return None
    try:
        model = load_registered_parameters(config.tracking, name=config.name, alias="champion")
    except ConfigError as error:  # logged by an older fedpipe: never unpickled, not compared
        log.warning("champion version %s not compared: %s", champion_version, error)
        return None
    if model is None:
        return None
    parameters = get_parameters(model)
    held = [tuple(p.shape) for p in parameters]
    if shapes is not None and held != [tuple(s) for s in shapes]:
        log.warning(
            "champion version %s not compared: another architecture (%d parameter arrays, "
            "%d values; this run's model has %d arrays, %d values); not sent to the sites",
            champion_version,
            len(held),
            sum(math.prod(s) for s in held),
            len(shapes),
            sum(math.prod(s) for s in shapes),
        )
        return None
    try:
        request = EvaluationRequest(round=config.rounds, sites=tuple(sites))
        return evaluate_sites(parameters, request, dispatch)
    except Exception as error:  # e.g. the champion has another architecture
        log.warning("champion version %s could not be evaluated: %s", champion_version, error)
        return None
