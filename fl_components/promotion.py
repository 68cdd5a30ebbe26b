"""Champion/challenger: a new model replaces the champion only if it evaluates better.

Both models are scored by the same federated evaluation (the sites' held-out splits, in the
same run) and compared on the sites that scored *both*, so the comparison is like for like
even when a site drops out of one of the evaluations; ties keep the champion. An evaluation
that misses some of the federation's sites is partial, and says so (``eval/partial``).

Guard rails (:func:`guard_rails`) hold back as challenger a model that would otherwise be
champion but diverged, does not beat the majority-class baseline on the sites it was scored
on, or was scored without some of the federation's sites; the operator may override each
(``promotion.allow_*``), and the reason is recorded either way.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

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


def majority_baseline(scores: Mapping[str, Metrics]) -> float | None:
    """Accuracy of always predicting the most frequent class, pooled over ``scores``' sites.

    The bar a model must clear to have learned anything: on sites' held-out splits that are
    70% class 0, "always 0" scores 0.70. None when a site sent no label counts.
    """
    counts = [s.label_counts for s in scores.values() if s.examples]
    if not counts or any(not c for c in counts):
        return None
    width = max(len(c) for c in counts)
    pooled = [sum(c[k] for c in counts if k < len(c)) for k in range(width)]
    total = sum(pooled)
    return max(pooled) / total if total else None


def divergence(
    *, losses: Sequence[float], scores: Mapping[str, Metrics], max_loss_growth: float
) -> str | None:
    """Why the run diverged, or None.

    ``losses``: the global loss per logged round, round 0 (the starting model) first. A
    non-finite loss anywhere (a round's, or a site's in the final evaluation), or a final
    loss more than ``max_loss_growth`` times the starting model's, is divergence.
    """
    bad_sites = [site for site, s in scores.items() if not math.isfinite(s.loss)]
    if bad_sites:
        return f"non-finite loss at {', '.join(bad_sites)} in the final evaluation"
    bad_rounds = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad_rounds:
        return f"non-finite global loss at round {bad_rounds[0]}"
    if len(losses) >= 2 and losses[0] > 0 and losses[-1] > max_loss_growth * losses[0]:
        return (
            f"final loss {losses[-1]:.4g} is over {max_loss_growth:g}x the starting model's "
            f"{losses[0]:.4g}"
        )
    return None


@dataclass(frozen=True)
class Hold:
    """A guard rail the model fails: a reason not to make it champion."""

    rail: str  # "diverged", "below_baseline", "partial": the name of its override
    reason: str


def guard_rails(
    *,
    accuracy: float,
    scores: Mapping[str, Metrics],
    coverage: Coverage,
    losses: Sequence[float],
    max_loss_growth: float,
) -> list[Hold]:
    """The guard rails a new model fails before it may become champion (empty: none).

    ``scores``/``coverage``: the model's own final federated evaluation (not restricted to
    the sites the champion scored); ``accuracy``: its federated accuracy on them.
    """
    holds: list[Hold] = []
    diverged = divergence(losses=losses, scores=scores, max_loss_growth=max_loss_growth)
    if diverged is not None:
        holds.append(Hold("diverged", f"diverged: {diverged}"))
    baseline = majority_baseline(scores)
    if baseline is not None and not accuracy > baseline:  # (nan fails too)
        holds.append(
            Hold(
                "below_baseline",
                f"federated accuracy {accuracy:.4f} does not beat the majority-class "
                f"baseline {baseline:.4f} on the same sites",
            )
        )
    if coverage.partial:
        holds.append(Hold("partial", f"evaluated {coverage.describe()}"))
    return holds


def hold_back(
    decision: PromotionDecision, holds: Sequence[Hold], *, allowed: Collection[str]
) -> PromotionDecision:
    """``decision``, with a champion held back as challenger for a rail not in ``allowed``.

    Either way the reason names every rail failed, and those the operator overrode.
    """
    if decision.alias != "champion" or not holds:
        return decision
    blocking = [h for h in holds if h.rail not in allowed]
    overridden = [h for h in holds if h.rail in allowed]
    notes = "".join(
        f"; promoted despite: {h.reason} (promotion.allow_{h.rail})" for h in overridden
    )
    if not blocking:
        return replace(decision, reason=decision.reason + notes)
    why = "; ".join(h.reason for h in blocking)
    fix = ", ".join(f"promotion.allow_{h.rail}" for h in blocking)
    return replace(
        decision,
        alias="challenger",
        reason=f"not promoted: {why} (would have been: {decision.reason}){notes}; "
        f"to promote it anyway set {fix}: true",
    )
