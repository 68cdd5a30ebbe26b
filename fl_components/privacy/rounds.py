"""The coordinator's view of privacy in a round: epsilon per site, declines, DP-FedAvg.

Pure bookkeeping for the coordinator flow (no Prefect, no MLflow): what each site reported
in ``LocalUpdate.extra``, which sites declined for budget, what the privacy report and
MLflow are told, and the federation's ledger on disk. The privacy state carried from round
to round is not here: the participant-level accountant's rounds (charged write-ahead when
a round begins) and the clip norm ride in ``ServerState``; the methods that change them
take a state and return a new one (:mod:`fl_components.privacy.participant_state`,
:func:`~fl_components.privacy.participant_round.next_clip_norm`). DP-FedAvg follows
McMahan et al. 2018, ICLR, arXiv:1710.06963; adaptive clipping Andrew et al. 2021, NeurIPS,
arXiv:1905.03871.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_components.config import FederationConfig
from fl_components.errors import BudgetExhaustedError
from fl_components.privacy import participant_round
from fl_components.privacy.accounting import ClientRound, ParticipantAccountant
from fl_components.privacy.dp_fedavg import (
    DPAggregate,
    SecureRandom,
)
from fl_components.privacy.federation_ledger import FederationLedger
from fl_components.privacy.ledger import default_delta
from fl_components.privacy.participant_state import accountant_of, accounted, charged, settled
from fl_components.privacy.run_record import RunPrivacyRecord, round_columns, site_params
from fl_components.round.types import LocalUpdate, ServerState

DECLINED = "declined"


def declined_record(
    declined: Mapping[str, str], *, round_num: int
) -> tuple[dict[str, float], dict[str, str]]:
    """``privacy/declined`` metric and ``privacy.declined.<site>`` tags of a round.

    Log them *before* a round in which every site declined fails the run.
    """
    tags = {f"privacy.declined.{s}": f"round {round_num}: {r}"[:5000] for s, r in declined.items()}
    return {"privacy/declined": float(len(declined))}, tags


@dataclass
class PrivacyRounds:
    """The coordinator's privacy reporter: what is logged and reported, and the ledger.

    The accountant's rounds of this run are not kept here: they are ``ServerState``'s
    (``accountant_history``, ``begun_rounds``); what changes them takes a state and returns
    a new one. ``prior`` is the earlier runs' rounds (read from the federation ledger once).
    """

    config: FederationConfig
    rng: SecureRandom = field(default_factory=SecureRandom)
    params_logged: set[str] = field(default_factory=set)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    last_aggregate: DPAggregate | None = None
    ledger: FederationLedger | None = None
    run_id: str | None = None
    record: RunPrivacyRecord = field(default_factory=RunPrivacyRecord)
    prior: list[ClientRound] = field(default_factory=list)

    @property
    def participant_level(self) -> bool:
        """True when participant-level DP-FedAvg is on (privacy.mode)."""
        return self.config.privacy.participant_level

    @property
    def enabled(self) -> bool:
        """True unless privacy.mode is 'off'."""
        return self.config.privacy.mode != "off"

    @property
    def poisson(self) -> bool:
        """True when participants are Poisson-sampled (DP-FedAvg with amplification)."""
        return self.participant_level and self.config.privacy.sampling == "random"

    @property
    def client_delta(self) -> float:
        """Participant-level delta: privacy.delta, or a power of ten below 1/(10 sites)."""
        delta = self.config.privacy.delta
        return delta if delta is not None else default_delta(len(self.config.sites))

    def accountant(self, state: ServerState) -> ParticipantAccountant | None:
        """The participant-level accountant of ``state`` (None when it is off)."""
        if not self.participant_level:
            return None
        return accountant_of(self.config, state, prior=self.prior)

    def _require_participant_level(self) -> None:
        if not self.participant_level:
            raise ValueError("participant-level DP is off (privacy.mode); nothing to account")

    def _participant_accountant(self, state: ServerState | None = None) -> ParticipantAccountant:
        self._require_participant_level()
        return accountant_of(self.config, state, prior=self.prior)

    def bind_run(self, mlflow_run_id: str) -> None:
        """The MLflow run this coordinator's rounds belong to (names the report's rows)."""
        self.run_id = mlflow_run_id

    def attach_ledger(
        self,
        state: ServerState,
        ledger: FederationLedger,
        *,
        mlflow_run_id: str,
        flow_run_id: str | None,
        parent_run_id: str | None,
    ) -> ServerState:
        """Compose this run with the rounds of every run its model descends from.

        ``parent_run_id`` is the MLflow run the starting model came from (the champion's
        run with ``init_from: champion``, ``init_run_id`` with ``init_from: run``); None
        for a fresh model. Returns ``state`` holding this run's own rounds as the ledger
        has them (a resumed run's; none for a fresh one): settle a checkpoint's after.
        """
        accountant = self._participant_accountant()
        ledger.begin_run(
            mlflow_run_id=mlflow_run_id,
            flow_run_id=flow_run_id,
            parent_run_id=parent_run_id,
            accountant=accountant.accountant,
            delta=self.client_delta,
        )
        self.prior = ledger.prior_for(mlflow_run_id)
        self.ledger, self.run_id = ledger, mlflow_run_id
        # a resumed run's own rounds are in the ledger already: they stay this run's
        own = tuple(ledger.rounds_of(mlflow_run_id))
        return state.evolve(accountant_history=own, begun_rounds={})

    def begin_round(self, selected: tuple[str, ...], *, round_num: int) -> ClientRound:
        """The participant-level step of a round about to be dispatched, with a fresh key.

        Nothing is accounted yet: write it where a resumed run will find it (the
        checkpoint's ``started.json``), then :meth:`charge` it, before any site is sent
        anything.
        """
        return self._participant_accountant().begun(
            noise_multiplier=self.config.privacy.client_noise_multiplier,
            selected=selected,
            round_num=round_num,
        )

    def charge(
        self, state: ServerState, entry: ClientRound, *, round_num: int, settled: bool = False
    ) -> tuple[ServerState, bool]:
        """Account a begun round now (write-ahead): in the state and the ledger.

        Whatever happens to the round after (trained, skipped, aborted, or a crash), it is
        spent. Idempotent by ``entry.attempt``. ``settled``: charged on resume for a round
        an earlier attempt began. Returns the new state, and True when ``state`` did not
        hold the round yet.
        """
        self._require_participant_level()
        state, added = charged(state, entry, round_num=round_num)
        if self.ledger is not None and self.run_id is not None:
            self.ledger.record(self.run_id, entry, round_num=round_num, settled=settled)
        return state, added

    def settle(
        self, state: ServerState, begun: Iterable[ClientRound]
    ) -> tuple[ServerState, dict[int, int]]:
        """On resume: charge every round an earlier attempt began and left unaccounted.

        ``begun``: the steps charged or begun before the crash (a checkpoint's accountant
        rounds and ``started.json``'s); each is charged unless its attempt is accounted
        already, so a round whose outcome is unknown counts as spent exactly once.

        Returns
        -------
        tuple[ServerState, dict[int, int]]
            The new state, and round -> steps newly charged (for the run's log).
        """
        self._require_participant_level()
        state, outcomes = settled(state, begun)
        counts: dict[int, int] = {}
        for entry, round_num, added in outcomes:
            if self.ledger is not None and self.run_id is not None:
                self.ledger.record(self.run_id, entry, round_num=round_num, settled=True)
            if added:
                counts[round_num] = counts.get(round_num, 0) + 1
        return state, counts

    def check_round(
        self, state: ServerState, selected: tuple[str, ...], *, round_num: int
    ) -> float:
        """Client epsilon after the round; refuse it past privacy.max_client_epsilon.

        Call before dispatching the round. Raises BudgetExhaustedError.
        """
        accountant = self._participant_accountant(state)
        privacy = self.config.privacy
        planned = accountant.planned(
            noise_multiplier=privacy.client_noise_multiplier, selected=selected
        )
        if self.ledger is not None and self.run_id is not None:
            return self.ledger.check(
                self.run_id,
                planned,
                round_num=round_num,
                delta=self.client_delta,
                accountant=privacy.accountant,
                max_epsilon=privacy.max_client_epsilon,
            )
        after = accountant.epsilon_after(planned, delta=self.client_delta)
        if privacy.max_client_epsilon is not None and after > privacy.max_client_epsilon:
            raise BudgetExhaustedError(
                f"round {round_num} refused: participant-level epsilon would reach "
                f"{after:.3f} past privacy.max_client_epsilon {privacy.max_client_epsilon:g} "
                f"at delta {self.client_delta:.0e}; raise max_client_epsilon or "
                "client_noise_multiplier, or lower participation.fraction"
            )
        return after

    def refuse(
        self, state: ServerState, error: BudgetExhaustedError, *, round_num: int
    ) -> dict[str, float]:
        """Note the round refused for privacy.max_client_epsilon: the run stops before it.

        Nothing was charged for it (the check comes before the write-ahead charge); the
        privacy report says which round, why, and what was spent. Returns the metrics to
        log at the refused round's step.
        """
        spent = None
        accountant = self.accountant(state)
        if accountant is not None and (accountant.rounds or accountant.prior):
            spent = accountant.epsilon(self.client_delta)
        self.record.refuse(round_num=round_num, reason=str(error), epsilon=spent)
        return {"privacy/refused": 1.0}

    def cohort_too_small(self, selected: tuple[str, ...]) -> bool:
        """True when a Poisson cohort is below participation.min_participants (or empty).

        Such a round is skipped (the global model is left unchanged) but still accounted:
        call :meth:`account` with ``result=None``; redrawing would change q.
        """
        return len(selected) < self.config.participation.min_participants

    def expected_cohort(self, participants: int) -> float:
        """m, what the mean and the clipped-bit fraction divide by.

        Under Poisson selection the fixed q·N (the actual cohort size is secret); under a
        fixed, public selection the count that came back (known anyway).
        """
        return participant_round.expected_cohort(self.config, participants)

    def count_noise_std(self, participants: int) -> float:
        """σ_b of the centred adaptive-clipping count (Andrew et al.: m / 20), at least z.

        From the *expected* cohort m, so that the noise, like the denominator, does not
        depend on how many were drawn.
        """
        return participant_round.count_noise_std(self.config, participants)

    def update_noise_multiplier(self, participants: int) -> float:
        """Noise multiplier of the update itself (smaller share when the count is noised)."""
        return participant_round.noise_multiplier_of_update(self.config, participants)

    @property
    def denominator(self) -> float | None:
        """Fixed denominator q·N of DP-FedAvg under Poisson selection; None otherwise."""
        return participant_round.fixed_denominator(self.config)

    def account(
        self,
        state: ServerState,
        result: DPAggregate | None,
        *,
        selected: tuple[str, ...],
        round_num: int,
    ) -> tuple[ServerState, ClientRound]:
        """Account the round with its *selection* (q from it); the new state and its step.

        ``result`` is None for a round skipped after selection (cohort too small, every
        update lost): it is accounted all the same. Records it in the federation ledger,
        unless the round was charged when it began (:meth:`charge`).
        """
        self._require_participant_level()
        # the whole mechanism (update + noised count) has multiplier z: account z
        state, entry, now = accounted(self.config, state, selected=selected, round_num=round_num)
        if now and self.ledger is not None and self.run_id is not None:
            self.ledger.record(self.run_id, entry, round_num=round_num)
        if result is not None:
            self.last_aggregate = result
        return state, entry

    def note_site_epsilons(self, site_epsilons: Mapping[str, float]) -> None:
        """Record sites' ledger epsilons: from their updates and from their declines."""
        self.site_epsilon.update({site: float(e) for site, e in site_epsilons.items()})

    def note_declines(
        self,
        reasons: Mapping[str, str],
        spent: Mapping[str, float | None],
        *,
        round_num: int,
    ) -> None:
        """Record the round's budget refusals for the privacy report."""
        for site, reason in reasons.items():
            self.record.decline(site, reason, epsilon=spent.get(site), round_num=round_num)

    def report(
        self, state: ServerState, *, mlflow_run_id: str, flow_run_id: str | None
    ) -> dict[str, Any]:
        """The run's privacy report at ``state`` (JSON-safe; see ``report.report_markdown``)."""
        accountant = self.accountant(state)
        return self.record.report(
            self.config.privacy,
            federation=self.config.name,
            mlflow_run_id=mlflow_run_id,
            flow_run_id=flow_run_id,
            accountant=accountant,
            ledger=self.ledger,
            client_delta=self.client_delta if accountant is not None else None,
        )

    def federation_epsilon(self) -> float | None:
        """Max over every site's ledger seen so far, declined ones included; None if none."""
        return max(self.site_epsilon.values()) if self.site_epsilon else None

    def metrics(
        self,
        state: ServerState,
        updates: list[LocalUpdate],
        dp: DPAggregate | None,
        *,
        declined: Mapping[str, float | None],
    ) -> dict[str, float]:
        """``privacy/...`` metrics of the round.

        ``state``: the round's, accounted. ``declined`` maps each site that declined for
        budget (DropoutKind.DECLINED) to the epsilon its ledger holds (None if unknown).
        ``privacy/epsilon`` is the max over every site's ledger seen in the run, decliners
        included.
        """
        metrics: dict[str, float] = {}
        for update in updates:
            if "epsilon" in update.extra and self.run_id is None:
                raise ValueError(
                    "PrivacyRounds.bind_run(mlflow_run_id) before logging DP-SGD rounds: the "
                    "privacy report names the run of each"
                )
            self.record.site_update(update, run=self.run_id or "")
            if "epsilon" in update.extra:
                self.note_site_epsilons({update.site: update.extra["epsilon"]})
                metrics[f"privacy/site/{update.site}/epsilon"] = update.extra["epsilon"]
                if "remaining" in update.extra:  # absent: the site's budget is unlimited
                    metrics[f"privacy/site/{update.site}/remaining"] = update.extra["remaining"]
        self.note_site_epsilons({s: e for s, e in declined.items() if e is not None})
        for site, spent in declined.items():
            if spent is not None:
                metrics[f"privacy/site/{site}/epsilon"] = spent
        site_max = self.federation_epsilon()
        if site_max is not None:
            metrics["privacy/epsilon"] = site_max
        metrics["privacy/declined"] = float(len(declined))
        accountant = self.accountant(state)
        if accountant is not None and accountant.rounds:
            client_epsilon = accountant.epsilon(self.client_delta)
            metrics["privacy/client_epsilon"] = client_epsilon
            metrics["privacy/client_sample_rate"] = accountant.rounds[-1].sample_rate
            # rounds charged to this run so far, begun-but-unknown ones of a crash included
            metrics["privacy/client_rounds"] = float(sum(r.steps for r in accountant.rounds))
            if dp is not None:
                metrics["privacy/clip_norm"] = dp.clip_norm
                if dp.clipped is not None and dp.norms:  # unknown under secure aggregation
                    metrics["privacy/clipped_fraction"] = dp.clipped / len(dp.norms)
            if "privacy/epsilon" not in metrics:
                metrics["privacy/epsilon"] = client_epsilon
        return metrics

    def params(self, updates: list[LocalUpdate]) -> dict[str, str]:
        """Params not logged yet: what anyone needs to recompute every epsilon."""
        privacy = self.config.privacy
        params: dict[str, str] = {}
        if self.participant_level:
            accountant = accountant_of(self.config)
            params.update(
                {
                    "privacy.client.delta": repr(self.client_delta),
                    "privacy.client.noise_multiplier": repr(privacy.client_noise_multiplier),
                    "privacy.client.clip_norm": repr(privacy.clip_norm),
                    # q of the selection; per round in the metric privacy/client_sample_rate
                    "privacy.client.sample_rate": repr(accountant.sample_rate()),
                    "privacy.client.sampling": privacy.sampling,
                    "privacy.client.amplification": accountant.amplification,
                }
            )
        for update in updates:
            params.update(site_params(update))
        if self.enabled:
            params["privacy.accountant_used"] = privacy.accountant
            params["privacy.mode_used"] = privacy.mode
        fresh = {k: v for k, v in params.items() if k not in self.params_logged}
        self.params_logged.update(fresh)
        return fresh

    def columns(
        self, updates: list[LocalUpdate], declined: Collection[str]
    ) -> dict[str, dict[str, str]]:
        """Extra columns of the round's markdown table: epsilon and budget left per site.

        ``declined``: the sites whose dropout is DropoutKind.DECLINED.
        """
        return round_columns(updates, declined)
