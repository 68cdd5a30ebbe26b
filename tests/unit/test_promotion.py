"""Champion and challenger are compared on the same sites; a partial evaluation says so."""

from __future__ import annotations

import pytest

from fl_components.promotion import (
    common_scores,
    decide_promotion,
    evaluation_coverage,
    federated_accuracy,
)
from fl_components.round.types import Metrics

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
