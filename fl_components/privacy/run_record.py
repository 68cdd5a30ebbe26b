"""What the coordinator saw of privacy during one run, gathered for the privacy report.

Record-level rounds come from what each site reported with its update (DP-SGD's sigma,
Poisson rate q and steps, Abadi et al. 2016, arXiv:1607.00133, as accounted by the site's
ledger); declines from the typed ``DECLINED`` dropouts; participant-level rounds from the
accountant (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963) and the federation ledger.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from fl_components.config import PrivacyConfig
from fl_components.privacy.accounting import ParticipantAccountant
from fl_components.privacy.federation_ledger import FederationLedger
from fl_components.privacy.report import SiteBudget, SiteRound, build_privacy_report
from fl_components.round.types import LocalUpdate
from fl_components.site.dpsgd import GRAD_SAMPLE_MODES


@dataclass
class RunPrivacyRecord:
    """Per-site rounds, deltas, ledger figures and declines seen in the run."""

    site_rounds: dict[str, list[SiteRound]] = field(default_factory=lambda: defaultdict(list))
    site_deltas: dict[str, float] = field(default_factory=dict)
    site_budgets: dict[str, SiteBudget] = field(default_factory=dict)
    declines: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # the round the coordinator refused for the participant-level budget (the run stopped)
    refused: dict[str, Any] | None = None

    def site_update(self, update: LocalUpdate, *, run: str) -> None:
        """Note a DP-SGD round a site reported (no-op for an update without DP)."""
        extra = update.extra
        if "epsilon" not in extra:
            return
        self.site_rounds[update.site].append(
            SiteRound(
                run=run,
                round=update.round,
                noise_multiplier=float(extra["noise_multiplier"]),
                sample_rate=float(extra["sample_rate"]),
                steps=int(extra["steps"]),
            )
        )
        self.site_deltas[update.site] = float(extra["delta"])
        budget = extra.get("max_epsilon")  # absent: the site's budget is unlimited
        self.site_budgets[update.site] = SiteBudget(
            float(extra["epsilon"]), None if budget is None else float(budget)
        )

    def decline(self, site: str, reason: str, *, epsilon: float | None, round_num: int) -> None:
        """Note a budget refusal (and the epsilon the site's ledger holds, when known)."""
        self.declines[site].append(f"round {round_num}: {reason}")
        if epsilon is not None:
            known = self.site_budgets.get(site)
            self.site_budgets[site] = SiteBudget(
                float(epsilon), known.max_epsilon if known else None
            )

    def refuse(self, *, round_num: int, reason: str, epsilon: float | None) -> None:
        """Note the round refused for the participant-level budget, which ended the run."""
        self.refused = {"round": round_num, "reason": reason, "client_epsilon_spent": epsilon}

    def report(
        self,
        privacy: PrivacyConfig,
        *,
        federation: str,
        mlflow_run_id: str,
        flow_run_id: str | None,
        accountant: ParticipantAccountant | None,
        ledger: FederationLedger | None,
        client_delta: float | None,
    ) -> dict[str, Any]:
        """The run's privacy report (:func:`fl_components.privacy.report.build_privacy_report`)."""
        client_rounds = None
        if accountant is not None:
            client_rounds = _client_rounds(accountant, ledger, mlflow_run_id)
        return build_privacy_report(
            federation=federation,
            mlflow_run_id=mlflow_run_id,
            flow_run_id=flow_run_id,
            mode=privacy.mode,
            accountant=privacy.accountant,
            site_rounds=dict(self.site_rounds),
            site_deltas=self.site_deltas,
            site_budgets=self.site_budgets,
            client_rounds=client_rounds,
            client_delta=client_delta if accountant is not None else None,
            client_sampling=privacy.sampling if accountant is not None else None,
            max_client_epsilon=privacy.max_client_epsilon,
            declines=dict(self.declines),
            refused=self.refused,
        )


def _client_rounds(
    accountant: ParticipantAccountant, ledger: FederationLedger | None, run_id: str
) -> list[SiteRound]:
    """The lineage's rounds from the ledger (with their runs), else this run's alone."""
    if ledger is not None and run_id in ledger.runs:
        return [
            SiteRound(rid, r.round, r.noise_multiplier, r.sample_rate, r.steps, r.sites)
            for rid in ledger.lineage(run_id)
            for r in ledger.runs[rid].rounds
        ]
    return [
        SiteRound(run_id, i, r.noise_multiplier, r.sample_rate, r.steps, r.sites)
        for i, r in enumerate(accountant.rounds, start=1)
    ]


def site_params(update: LocalUpdate) -> dict[str, str]:
    """MLflow params of a site's DP-SGD round: what recomputes its epsilon (none without DP)."""
    extra = update.extra
    if "epsilon" not in extra:
        return {}
    prefix = f"privacy.site.{update.site}"
    return {
        f"{prefix}.delta": repr(extra["delta"]),
        f"{prefix}.noise_multiplier": repr(extra["noise_multiplier"]),
        f"{prefix}.sample_rate": repr(extra["sample_rate"]),
        f"{prefix}.steps_per_round": str(int(extra["steps"])),
        f"{prefix}.max_grad_norm": repr(extra["max_grad_norm"]),
        f"{prefix}.grad_sample_mode": GRAD_SAMPLE_MODES[int(extra["grad_sample_mode"])],
    }


def round_columns(
    updates: list[LocalUpdate], declined: Collection[str]
) -> dict[str, dict[str, str]]:
    """Extra columns of the round's table: epsilon and budget left per site, decliners too."""
    epsilon: dict[str, str] = {}
    remaining: dict[str, str] = {}
    for update in updates:
        if "epsilon" in update.extra:
            epsilon[update.site] = f"{update.extra['epsilon']:.3f}"
            left = update.extra.get("remaining")  # absent: the site's budget is unlimited
            remaining[update.site] = "unlimited" if left is None else f"{left:.3f}"
    for site in declined:
        epsilon[site] = "declined"
        remaining[site] = "exhausted"
    if not epsilon:
        return {}
    return {"epsilon": epsilon, "budget left": remaining}
