"""Champion/challenger promotion at the end of a training run.

The current champion's weights are evaluated on the same sites, through the same backend,
in the same run as the new model; :func:`fl_components.promotion.decide_promotion` decides.
"""

from __future__ import annotations

import logging

from fl_components.config import FederationConfig
from fl_components.engine import Dispatch, EvaluationRequest, evaluate_sites
from fl_components.parameters import get_parameters
from fl_components.promotion import PromotionDecision, decide_promotion, federated_accuracy
from fl_components.tracking import RunTracker, load_registered_parameters, registered_version
from fl_components.training import Metrics

log = logging.getLogger(__name__)


def promote_if_better(
    config: FederationConfig,
    dispatch: Dispatch,
    tracker: RunTracker,
    *,
    version: str,
    challenger_scores: dict[str, Metrics],
) -> PromotionDecision:
    """Give ``version`` the alias ``champion`` or ``challenger`` and tag the run with why."""
    challenger = federated_accuracy(challenger_scores)
    champion_version = registered_version(config.tracking, name=config.name, alias="champion")
    champion_accuracy: float | None = None
    if champion_version is not None and champion_version != version:
        model = load_registered_parameters(config.tracking, name=config.name, alias="champion")
        if model is not None:
            try:
                request = EvaluationRequest(round=config.rounds, sites=tuple(challenger_scores))
                scores = evaluate_sites(get_parameters(model), request, dispatch)
                champion_accuracy = federated_accuracy(scores)
            except Exception as error:  # e.g. the champion has another architecture
                log.warning(
                    "champion version %s could not be evaluated: %s", champion_version, error
                )
    decision = decide_promotion(
        challenger_accuracy=challenger,
        champion_accuracy=champion_accuracy,
        champion_version=champion_version if champion_accuracy is not None else None,
    )
    tracker.set_alias(decision.alias, version)
    tags = {
        "fedpipe.promotion": decision.alias,
        "fedpipe.promotion_reason": decision.reason,
        "fedpipe.model_version": version,
    }
    if champion_version is not None:
        tags["fedpipe.previous_champion"] = champion_version
    tracker.set_tags(tags)
    metrics = {"promotion/challenger_accuracy": challenger}
    if champion_accuracy is not None:
        metrics["promotion/champion_accuracy"] = champion_accuracy
    tracker.log_metrics(metrics, step=config.rounds)
    return decision
