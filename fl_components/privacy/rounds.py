"""The coordinator's view of privacy in a round: epsilon per site, declines, DP-FedAvg.

Pure bookkeeping for the coordinator flow (no Prefect, no MLflow): what each site reported
in ``LocalUpdate.extra``, which sites declined for budget, the participant-level accountant
and (with adaptive clipping) the clip norm carried from round to round. DP-FedAvg follows
McMahan et al. 2018, ICLR, arXiv:1710.06963; adaptive clipping Andrew et al. 2021, NeurIPS,
arXiv:1905.03871.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fl_components.config import FederationConfig
from fl_components.privacy.accounting import ParticipantAccountant
from fl_components.privacy.dp_fedavg import (
    DPAggregate,
    SecureRandom,
    adaptive_clip_norm,
    dp_fedavg_aggregate,
    update_noise_multiplier,
)
from fl_components.privacy.dpsgd import GRAD_SAMPLE_MODES
from fl_components.privacy.ledger import default_delta
from fl_components.training import LocalUpdate

DECLINED = "declined"
_BUDGET_ERROR = "BudgetExhaustedError"


def dropout_reason(reason: str) -> str:
    """A budget refusal reads 'declined: <reason>'; other reasons are kept as they are."""
    if reason.startswith(_BUDGET_ERROR):
        return f"{DECLINED}: {reason.removeprefix(_BUDGET_ERROR).lstrip(': ')}"
    return reason


@dataclass
class PrivacyRounds:
    """Privacy state the coordinator carries across rounds."""

    config: FederationConfig
    clip_norm: float = 0.0
    accountant: ParticipantAccountant | None = None
    rng: SecureRandom = field(default_factory=SecureRandom)
    params_logged: set[str] = field(default_factory=set)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    last_aggregate: DPAggregate | None = None

    def __post_init__(self) -> None:
        privacy = self.config.privacy
        self.clip_norm = privacy.clip_norm
        if privacy.participant_level:
            self.accountant = ParticipantAccountant(
                sampling=privacy.sampling,
                accountant=privacy.accountant,
                population=len(self.config.sites),
            )

    @property
    def enabled(self) -> bool:
        """True unless privacy.mode is 'off'."""
        return self.config.privacy.mode != "off"

    @property
    def client_delta(self) -> float:
        """Participant-level delta: privacy.delta, or a power of ten below 1/(10 sites)."""
        delta = self.config.privacy.delta
        return delta if delta is not None else default_delta(len(self.config.sites))

    def count_noise_std(self, participants: int) -> float:
        """σ_b of the adaptive-clipping count (Andrew et al.: m / 20), at least z."""
        return max(participants / 20, self.config.privacy.client_noise_multiplier)

    def update_noise_multiplier(self, participants: int) -> float:
        """Noise multiplier of the update itself (smaller share when the count is noised)."""
        privacy = self.config.privacy
        if not privacy.adaptive_clipping:
            return privacy.client_noise_multiplier
        return update_noise_multiplier(
            privacy.client_noise_multiplier,
            count_noise_multiplier=self.count_noise_std(participants),
        )

    def aggregate(self, updates: list[LocalUpdate]) -> DPAggregate:
        """DP-FedAvg over the round's updates (pure: call :meth:`account` after it)."""
        return dp_fedavg_aggregate(
            [u.delta for u in updates],
            clip_norm=self.clip_norm,
            noise_multiplier=self.update_noise_multiplier(len(updates)),
            rng=self.rng,
        )

    def account(self, result: DPAggregate, *, participants: tuple[str, ...]) -> None:
        """Account the round at the participant level and adapt the clip norm."""
        privacy = self.config.privacy
        if self.accountant is None:
            raise ValueError("participant-level DP is off (privacy.mode); nothing to account")
        # the whole mechanism (update + noised count) has multiplier z: account z
        self.accountant.step(
            noise_multiplier=privacy.client_noise_multiplier, participants=participants
        )
        self.last_aggregate = result
        if privacy.adaptive_clipping:
            self.clip_norm = adaptive_clip_norm(
                self.clip_norm,
                norms=result.norms,
                target_quantile=privacy.target_quantile,
                learning_rate=privacy.clip_learning_rate,
                count_noise_std=self.count_noise_std(len(result.norms)),
                rng=self.rng,
            )

    def metrics(
        self, updates: list[LocalUpdate], dropouts: dict[str, str], dp: DPAggregate | None
    ) -> dict[str, float]:
        """``privacy/...`` metrics of the round (the federation's epsilon is the max)."""
        metrics: dict[str, float] = {}
        for update in updates:
            if "epsilon" in update.extra:
                self.site_epsilon[update.site] = update.extra["epsilon"]
                metrics[f"privacy/site/{update.site}/epsilon"] = update.extra["epsilon"]
                if update.extra.get("remaining", -1.0) >= 0:
                    metrics[f"privacy/site/{update.site}/remaining"] = update.extra["remaining"]
        if self.site_epsilon:
            metrics["privacy/epsilon"] = max(self.site_epsilon.values())
        declined = [site for site, reason in dropouts.items() if reason.startswith(DECLINED)]
        metrics["privacy/declined"] = float(len(declined))
        if dp is not None and self.accountant is not None:
            client_epsilon = self.accountant.epsilon(self.client_delta)
            metrics["privacy/client_epsilon"] = client_epsilon
            metrics["privacy/clip_norm"] = dp.clip_norm
            metrics["privacy/clipped_fraction"] = dp.clipped / max(1, len(dp.norms))
            if "privacy/epsilon" not in metrics:
                metrics["privacy/epsilon"] = client_epsilon
        return metrics

    def params(self, updates: list[LocalUpdate]) -> dict[str, str]:
        """Params not logged yet: what anyone needs to recompute every epsilon."""
        privacy = self.config.privacy
        params: dict[str, str] = {}
        if self.accountant is not None:
            params.update(
                {
                    "privacy.client.delta": repr(self.client_delta),
                    "privacy.client.noise_multiplier": repr(privacy.client_noise_multiplier),
                    "privacy.client.clip_norm": repr(privacy.clip_norm),
                    "privacy.client.sample_rate": repr(
                        len(updates) / len(self.config.sites)
                        if privacy.sampling == "random"
                        else 1.0
                    ),
                    "privacy.client.amplification": self.accountant.amplification,
                }
            )
        for update in updates:
            extra = update.extra
            if "epsilon" not in extra:
                continue
            prefix = f"privacy.site.{update.site}"
            params.update(
                {
                    f"{prefix}.delta": repr(extra["delta"]),
                    f"{prefix}.noise_multiplier": repr(extra["noise_multiplier"]),
                    f"{prefix}.sample_rate": repr(extra["sample_rate"]),
                    f"{prefix}.steps_per_round": str(int(extra["steps"])),
                    f"{prefix}.max_grad_norm": repr(extra["max_grad_norm"]),
                    f"{prefix}.grad_sample_mode": GRAD_SAMPLE_MODES[int(extra["grad_sample_mode"])],
                }
            )
        if self.enabled:
            params["privacy.accountant_used"] = privacy.accountant
            params["privacy.mode_used"] = privacy.mode
        fresh = {k: v for k, v in params.items() if k not in self.params_logged}
        self.params_logged.update(fresh)
        return fresh

    def columns(
        self, updates: list[LocalUpdate], dropouts: dict[str, str]
    ) -> dict[str, dict[str, str]]:
        """Extra columns of the round's markdown table: epsilon and budget left per site."""
        epsilon: dict[str, str] = {}
        remaining: dict[str, str] = {}
        for update in updates:
            if "epsilon" in update.extra:
                epsilon[update.site] = f"{update.extra['epsilon']:.3f}"
                left = update.extra.get("remaining", -1.0)
                remaining[update.site] = "unlimited" if left < 0 else f"{left:.3f}"
        for site, reason in dropouts.items():
            if reason.startswith(DECLINED):
                epsilon[site] = DECLINED
                remaining[site] = "exhausted"
        if not epsilon:
            return {}
        return {"epsilon": epsilon, "budget left": remaining}
