"""Champion/challenger: a new model replaces the champion only if it evaluates better.

Both models are scored by the same federated evaluation (every site's held-out split, in
the same run), so the comparison is like for like; ties keep the champion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fl_components.training import Metrics


@dataclass(frozen=True)
class PromotionDecision:
    """Which alias the new model version gets, and why."""

    alias: str  # "champion" or "challenger"
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None


def federated_accuracy(scores: Mapping[str, Metrics]) -> float:
    """Example-weighted mean accuracy over the sites' held-out splits (nan if none)."""
    total = sum(s.examples for s in scores.values())
    if total == 0:
        return float("nan")
    return sum(s.accuracy * s.examples for s in scores.values()) / total


def decide_promotion(
    *, challenger_accuracy: float, champion_accuracy: float | None, champion_version: str | None
) -> PromotionDecision:
    """Promote when there is no champion or the challenger's accuracy is strictly higher."""
    if champion_accuracy is None or champion_version is None:
        return PromotionDecision(
            "champion",
            f"no champion yet; promoted with federated accuracy {challenger_accuracy:.4f}",
            challenger_accuracy,
            None,
        )
    if challenger_accuracy > champion_accuracy:
        return PromotionDecision(
            "champion",
            f"federated accuracy {challenger_accuracy:.4f} beats champion version "
            f"{champion_version}'s {champion_accuracy:.4f} on the same sites",
            challenger_accuracy,
            champion_accuracy,
        )
    return PromotionDecision(
        "challenger",
        f"federated accuracy {challenger_accuracy:.4f} does not beat champion version "
        f"{champion_version}'s {champion_accuracy:.4f} on the same sites; champion kept",
        challenger_accuracy,
        champion_accuracy,
    )
