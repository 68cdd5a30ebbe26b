"""Champion and challenger are compared on the same sites; guard rails hold back a bad model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_components.config import (
    FederationConfig,
    ParticipationConfig,
    PromotionConfig,
    SiteConfig,
    TrackingConfig,
)
from fl_components.data.types import Split
from fl_components.exchange import ExchangeError, metrics_from_payload, metrics_payload
from fl_components.parameters import get_parameters
from fl_components.promotion import (
    PromotionDecision,
    common_scores,
    decide_promotion,
    divergence,
    evaluation_coverage,
    federated_accuracy,
    guard_rails,
    hold_back,
    majority_baseline,
)
from fl_components.round.types import Metrics
from fl_components.site.training import evaluate
from tasks.promotion import promote_if_better, round_losses

SITES = ("site-a", "site-b", "site-c")


def test_a_site_missing_from_the_champion_evaluation_is_left_out_of_both() -> None:
    challenger = {
        "site-a": Metrics(loss=0.3, accuracy=0.9, examples=10),
        "site-b": Metrics(loss=0.4, accuracy=0.8, examples=30),
        "site-c": Metrics(loss=0.1, accuracy=0.99, examples=10),
    }
    champion = {  # site-c dropped out of the champion's evaluation
        "site-a": Metrics(loss=0.3, accuracy=0.85, examples=10),
        "site-b": Metrics(loss=0.4, accuracy=0.82, examples=30),
    }
    # on all its sites the challenger looks better: (9 + 24 + 9.9) / 50 = 0.858 > 0.8275
    assert federated_accuracy(challenger) == pytest.approx(0.858)

    mine, theirs = common_scores(challenger, champion)
    coverage = evaluation_coverage(mine, SITES)
    decision = decide_promotion(
        challenger_accuracy=federated_accuracy(mine),
        champion_accuracy=federated_accuracy(theirs),
        champion_version="4",
        coverage=coverage,
    )

    # on the sites both scored: (9 + 24) / 40 = 0.825 against (8.5 + 24.6) / 40 = 0.8275
    assert federated_accuracy(mine) == pytest.approx(0.825)
    assert federated_accuracy(theirs) == pytest.approx(0.8275)
    assert decision.alias == "challenger"
    assert "on 2 of 3 sites (missing: site-c)" in decision.reason
    assert coverage.metrics() == {"eval/sites": 2.0, "eval/partial": 1.0}


def test_a_full_evaluation_is_not_partial() -> None:
    scores = {s: Metrics(loss=0.5, accuracy=0.7, examples=5) for s in SITES}

    coverage = evaluation_coverage(scores, SITES)
    decision = decide_promotion(
        challenger_accuracy=0.7, champion_accuracy=None, champion_version=None, coverage=coverage
    )

    assert coverage.metrics() == {"eval/sites": 3.0, "eval/partial": 0.0}
    assert decision.alias == "champion" and decision.reason.endswith("on all 3 sites")


# --- guard rails: diverged, below the majority-class baseline, partial, overridden ---


def _scores(*accuracy_and_counts: tuple[float, tuple[int, ...]]) -> dict[str, Metrics]:
    return {
        site: Metrics(loss=0.5, accuracy=acc, examples=sum(counts), label_counts=counts)
        for site, (acc, counts) in zip(SITES, accuracy_and_counts, strict=False)
    }


def _would_be_champion(accuracy: float) -> PromotionDecision:
    return decide_promotion(
        challenger_accuracy=accuracy, champion_accuracy=None, champion_version=None
    )


def test_the_majority_baseline_pools_the_sites_label_counts() -> None:
    # class 0: 8 + 1 = 9 of 20, class 1: 2 + 9 = 11 of 20: "always 1" scores 0.55
    scores = _scores((0.9, (8, 2)), (0.9, (1, 9)))

    assert majority_baseline(scores) == pytest.approx(0.55)
    assert majority_baseline({"a": Metrics(loss=0.1, accuracy=0.9, examples=5)}) is None


def test_a_model_below_the_majority_baseline_is_held_back() -> None:
    scores = _scores((0.7, (7, 3)), (0.7, (7, 3)), (0.7, (7, 3)))  # "always 0" scores 0.70
    coverage = evaluation_coverage(scores, SITES)

    holds = guard_rails(
        accuracy=0.7, scores=scores, coverage=coverage, losses=[2.3, 0.6], max_loss_growth=10
    )
    decision = hold_back(_would_be_champion(0.7), holds, allowed=frozenset())

    assert [h.rail for h in holds] == ["below_baseline"]
    assert decision.alias == "challenger"
    assert "does not beat the majority-class baseline 0.7000" in decision.reason
    assert "promotion.allow_below_baseline: true" in decision.reason


def test_a_diverged_run_is_held_back() -> None:
    scores = _scores((0.95, (5, 5)), (0.95, (5, 5)), (0.95, (5, 5)))
    coverage = evaluation_coverage(scores, SITES)
    exploding = [2.3, 40.0, 2.7e7]
    nan_loss = {**scores, "site-c": Metrics(loss=float("nan"), accuracy=0.9, examples=10)}

    holds = guard_rails(
        accuracy=0.95, scores=scores, coverage=coverage, losses=exploding, max_loss_growth=10
    )
    assert [h.rail for h in holds] == ["diverged"]
    assert "final loss 2.7e+07 is over 10x the starting model's 2.3" in holds[0].reason
    assert hold_back(_would_be_champion(0.95), holds, allowed=frozenset()).alias == "challenger"
    assert divergence(losses=[2.3, 0.4], scores=nan_loss, max_loss_growth=10) == (
        "non-finite loss at site-c in the final evaluation"
    )
    assert divergence(losses=[2.3, float("inf"), 0.4], scores=scores, max_loss_growth=10) == (
        "non-finite global loss at round 1"
    )
    assert divergence(losses=[2.3, 0.4], scores=scores, max_loss_growth=10) is None


def test_an_evaluation_that_left_a_site_out_is_held_back() -> None:
    scores = _scores((0.95, (5, 5)), (0.95, (5, 5)))  # site-c's data failed
    coverage = evaluation_coverage(scores, SITES)

    holds = guard_rails(
        accuracy=0.95, scores=scores, coverage=coverage, losses=[2.3, 0.2], max_loss_growth=10
    )
    decision = hold_back(_would_be_champion(0.95), holds, allowed=frozenset())

    assert [h.rail for h in holds] == ["partial"]
    assert decision.alias == "challenger"
    assert "evaluated on 2 of 3 sites (missing: site-c)" in decision.reason


def test_the_operator_can_override_a_rail_and_the_reason_still_says_so() -> None:
    scores = _scores((0.95, (5, 5)), (0.95, (5, 5)))
    coverage = evaluation_coverage(scores, SITES)
    holds = guard_rails(
        accuracy=0.95, scores=scores, coverage=coverage, losses=[2.3, 0.2], max_loss_growth=10
    )
    allowed = PromotionConfig(allow_partial=True).allowed

    decision = hold_back(_would_be_champion(0.95), holds, allowed=allowed)

    assert allowed == {"partial"}
    assert decision.alias == "champion"
    assert decision.reason.endswith(
        "promoted despite: evaluated on 2 of 3 sites (missing: site-c) (promotion.allow_partial)"
    )


def test_a_model_that_passes_every_rail_is_promoted_as_before() -> None:
    scores = _scores((0.95, (5, 5)), (0.95, (5, 5)), (0.95, (5, 5)))
    coverage = evaluation_coverage(scores, SITES)

    holds = guard_rails(
        accuracy=0.95, scores=scores, coverage=coverage, losses=[2.3, 0.2], max_loss_growth=10
    )

    assert holds == []
    assert hold_back(_would_be_champion(0.95), holds, allowed=frozenset()).alias == "champion"


def test_a_lost_evaluation_is_not_read_as_divergence() -> None:
    history = [
        {"round": 1.0, "global/loss": float("nan"), "eval/sites": 0.0},  # no site scored
        {"round": 0.0, "global/loss": 2.3, "eval/sites": 3.0},
        {"round": 2.0, "global/loss": 0.4, "eval/sites": 3.0},
    ]

    assert round_losses(history) == [2.3, 0.4]


def test_a_site_sends_its_held_out_label_counts() -> None:
    split = Split(features=np.zeros((5, 3), dtype=np.float32), labels=np.array([0, 2, 2, 1, 2]))
    model = torch.nn.Linear(3, 4)
    parameters = get_parameters(model)

    score = evaluate(model, parameters, split, device="cpu")
    wire = metrics_from_payload(
        metrics_payload(score, site="site-a", round_num=3), site="site-a", round_num=3
    )

    assert score.label_counts == (1, 1, 3)  # rows per class seen (no padding to the width)
    assert wire == score


class _Tracker:
    """What promote_if_better writes, kept in memory."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}

    def set_alias(self, alias: str, version: str) -> None:
        self.aliases[alias] = version

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        self.metrics.update(metrics)


def test_the_decision_and_its_reason_are_logged_and_tagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = FederationConfig(
        name="guarded",
        sites=tuple(SiteConfig(name=s) for s in SITES),
        participation=ParticipationConfig(min_participants=1),
        tracking=TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
    )
    scores = _scores((0.6, (7, 3)), (0.6, (7, 3)), (0.6, (7, 3)))
    tracker = _Tracker()

    with caplog.at_level(logging.INFO, logger="fedpipe"):
        decision = promote_if_better(
            config,
            dispatch=None,  # type: ignore[arg-type]  # no champion: nothing to evaluate
            tracker=tracker,  # type: ignore[arg-type]
            version="1",
            challenger_scores=scores,
            losses=[2.3, 0.5],
        )

    assert decision.alias == "challenger" and tracker.aliases == {"challenger": "1"}
    assert tracker.tags["fedpipe.promotion_held"] == "below_baseline"
    assert tracker.tags["fedpipe.promotion_reason"] == decision.reason
    assert tracker.metrics["promotion/majority_baseline"] == pytest.approx(0.7)
    assert f"model guarded version 1 is challenger: {decision.reason}" in caplog.text


@pytest.mark.parametrize(
    "counts", [[1, 1, 1], [6, -1], list(range(200_000))], ids=["short", "negative", "huge"]
)
def test_label_counts_that_do_not_describe_the_split_are_refused(counts: list[int]) -> None:
    """A site that misreports its classes, to move the baseline, is refused."""
    payload = metrics_payload(
        Metrics(loss=0.1, accuracy=0.9, examples=5), site="site-a", round_num=1
    )

    with pytest.raises(ExchangeError, match="label_counts"):
        metrics_from_payload({**payload, "label_counts": counts}, site="site-a", round_num=1)
