"""Champion/challenger: a new model replaces the champion only if it evaluates better.

Both models are scored by the same federated evaluation (the sites' held-out splits, in the
same run) and compared on the sites that scored *both*, so the comparison is like for like
even when a site drops out of one of the evaluations; ties keep the champion. An evaluation
that misses some of the federation's sites is partial, and says so (``eval/partial``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fl_components.round.types import Metrics


@dataclass(frozen=True)
class PromotionDecision:
    """Which alias the new model version gets, and why."""

    alias: str  # "champion" or "challenger"
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None


@dataclass(frozen=True)
class Coverage:
    """Which of the federation's sites an evaluation (or a comparison) is made on."""

    sites: tuple[str, ...]  # the sites scored
    expected: tuple[str, ...]  # the federation's sites

    @property
    def missing(self) -> tuple[str, ...]:
        """The federation's sites without a score."""
        return tuple(s for s in self.expected if s not in self.sites)

    @property
    def partial(self) -> bool:
        """True when some site of the federation was not scored."""
        return bool(self.missing)

    def metrics(self) -> dict[str, float]:
        """``eval/sites`` (how many sites scored) and ``eval/partial`` (1.0: some missing)."""
        return {"eval/sites": float(len(self.sites)), "eval/partial": float(self.partial)}

    def describe(self) -> str:
        """``on 2 of 3 sites (missing: site-c)``, or ``on all 3 sites``."""
        if not self.partial:
            return f"on all {len(self.expected)} sites"
        return (
            f"on {len(self.sites)} of {len(self.expected)} sites "
            f"(missing: {', '.join(self.missing)})"
        )


def evaluation_coverage(scores: Mapping[str, Metrics], expected: tuple[str, ...]) -> Coverage:
    """The coverage of one federated evaluation of a federation with sites ``expected``."""
    return Coverage(tuple(s for s in expected if s in scores), tuple(expected))


def common_scores(
    first: Mapping[str, Metrics], second: Mapping[str, Metrics]
) -> tuple[dict[str, Metrics], dict[str, Metrics]]:
    """Both evaluations restricted to the sites that scored in both (in ``first``'s order)."""
    shared = [site for site in first if site in second]
    return {s: first[s] for s in shared}, {s: second[s] for s in shared}


def federated_accuracy(scores: Mapping[str, Metrics]) -> float:
    """Example-weighted mean accuracy over the sites' held-out splits (nan if none)."""
    total = sum(s.examples for s in scores.values())
    if total == 0:
        return float("nan")
    return sum(s.accuracy * s.examples for s in scores.values()) / total


def decide_promotion(
    *,
    challenger_accuracy: float,
    champion_accuracy: float | None,
    champion_version: str | None,
    coverage: Coverage | None = None,
) -> PromotionDecision:
    """Promote when there is no champion or the challenger's accuracy is strictly higher.

    ``coverage``: the sites both accuracies were measured on; a partial one is named in the
    reason (the decision itself is the same: both models were scored on those sites).
    """
    where = "on the same sites" if coverage is None else f"on the same sites, {coverage.describe()}"
    if champion_accuracy is None or champion_version is None:
        on = "" if coverage is None else f" {coverage.describe()}"
        return PromotionDecision(
            "champion",
            f"no champion yet; promoted with federated accuracy {challenger_accuracy:.4f}{on}",
            challenger_accuracy,
            None,
        )
    if challenger_accuracy > champion_accuracy:
        return PromotionDecision(
            "champion",
            f"federated accuracy {challenger_accuracy:.4f} beats champion version "
            f"{champion_version}'s {champion_accuracy:.4f} {where}",
            challenger_accuracy,
            champion_accuracy,
        )
    return PromotionDecision(
        "challenger",
        f"federated accuracy {challenger_accuracy:.4f} does not beat champion version "
        f"{champion_version}'s {champion_accuracy:.4f} {where}; champion kept",
        challenger_accuracy,
        champion_accuracy,
    )
