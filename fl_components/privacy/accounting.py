"""Participant-level accounting for DP-FedAvg: rounds composed with client sampling.

Each round is a sampled Gaussian mechanism on the participants (McMahan et al. 2018, ICLR,
arXiv:1710.06963, Algorithm 1 and Theorem 1: each participant is selected independently
with probability q, the noised sum has sensitivity S), composed over rounds with RDP
(Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv:1908.10530) or PRV (Gopi, Lee & Wutschitz 2021, arXiv:2106.02848).

q is a property of the *selection*: with ``privacy.sampling: random`` every site is drawn
by Poisson sampling with q = ``participation.fraction`` (secret CSPRNG draw, see
:func:`fl_components.federation.select_participants`), whoever then answers; every site
is at risk in every round. With a fixed or public selection there is no amplification:
q = 1, and each site pays only for the rounds it was *selected* in; the reported epsilon
is the worst site's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fl_components.privacy.ledger import epsilon_of


@dataclass(frozen=True)
class ClientRound:
    """One participant-level round as the accountant sees it.

    Attributes
    ----------
    noise_multiplier : float
        z of the whole mechanism (update and, with adaptive clipping, the noised count).
    sample_rate : float
        q of the selection (1.0 for a fixed selection).
    steps : int
        Rounds with these settings (1 per logged round).
    sites : tuple of str, optional
        The selected sites for a fixed selection (q = 1); None under Poisson sampling,
        where every site is at risk (and the secret cohort is not kept).
    attempt : str, optional
        A key drawn when the round was begun: one mechanism run, charged once however
        often it is recorded (a resumed run re-running the round begins a new attempt).
    round : int, optional
        The round it was begun for. Neither key nor round takes part in comparisons.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1
    sites: tuple[str, ...] | None = None
    attempt: str | None = field(default=None, compare=False)
    round: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (what started.json and a checkpoint keep)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "sites": None if self.sites is None else list(self.sites),
            "attempt": self.attempt,
            "round": self.round,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ClientRound:
        """Inverse of :meth:`to_json`."""
        sites = document.get("sites")
        return cls(
            noise_multiplier=float(document["noise_multiplier"]),
            sample_rate=float(document["sample_rate"]),
            steps=int(document["steps"]),
            sites=None if sites is None else tuple(str(s) for s in sites),
            attempt=None if document.get("attempt") is None else str(document["attempt"]),
            round=None if document.get("round") is None else int(document["round"]),
        )


def participant_epsilon(rounds: Iterable[ClientRound], *, delta: float, accountant: str) -> float:
    """Worst participant's epsilon at ``delta`` over ``rounds`` (any mix of both kinds).

    A site is at risk in every sampled round (``sites is None``) and in each fixed round
    that selected it; its history is composed in order; the result is the max over sites
    (with only sampled rounds, the one history of all of them).
    """
    rounds = [r for r in rounds if r.steps > 0]
    named = sorted({site for r in rounds if r.sites is not None for site in r.sites})
    if not named:
        return epsilon_of(
            [(r.noise_multiplier, r.sample_rate, r.steps) for r in rounds],
            delta=delta,
            accountant=accountant,
        )
    worst = 0.0
    for site in named:
        history = [
            (r.noise_multiplier, r.sample_rate, r.steps)
            for r in rounds
            if r.sites is None or site in r.sites
        ]
        worst = max(worst, epsilon_of(history, delta=delta, accountant=accountant))
    return worst


@dataclass
class ParticipantAccountant:
    """Composes DP-FedAvg rounds at the participant level.

    Attributes
    ----------
    sampling : str
        'random' (Poisson selection, q = participation.fraction) or 'fixed' (q = 1 over
        the rounds each site was selected in).
    accountant : str
        Opacus accountant name.
    fraction : float
        participation.fraction: the Poisson rate q under 'random'.
    prior : list of ClientRound
        Rounds of the earlier runs the model descends from (the federation ledger).
    rounds : list of ClientRound
        This run's rounds.
    """

    sampling: str
    accountant: str
    fraction: float
    prior: list[ClientRound] = field(default_factory=list)
    rounds: list[ClientRound] = field(default_factory=list)

    def sample_rate(self) -> float:
        """The sample rate of one round's selection: Poisson q, or 1 for a fixed selection."""
        return self.fraction if self.sampling == "random" else 1.0

    def planned(self, *, noise_multiplier: float, selected: tuple[str, ...]) -> ClientRound:
        """The round a selection of ``selected`` sites adds (not yet accounted)."""
        sites = None if self.sampling == "random" else tuple(sorted(selected))
        return ClientRound(noise_multiplier, self.sample_rate(), 1, sites)

    def step(self, *, noise_multiplier: float, selected: tuple[str, ...]) -> ClientRound:
        """Account one round with its selection (never with who answered)."""
        entry = self.planned(noise_multiplier=noise_multiplier, selected=selected)
        self.rounds.append(entry)
        return entry

    def begun(
        self, *, noise_multiplier: float, selected: tuple[str, ...], round_num: int
    ) -> ClientRound:
        """Round ``round_num`` of a selection, with a fresh attempt key (not accounted yet)."""
        planned = self.planned(noise_multiplier=noise_multiplier, selected=selected)
        return replace(planned, attempt=uuid.uuid4().hex, round=round_num)

    def charge(self, entry: ClientRound) -> bool:
        """Account ``entry`` unless its attempt is accounted already; True if it was added."""
        if entry.attempt is not None and entry.attempt in self.attempts():
            return False
        self.rounds.append(entry)
        return True

    def attempts(self) -> set[str]:
        """The attempt keys of this run's accounted rounds."""
        return {r.attempt for r in self.rounds if r.attempt is not None}

    @property
    def amplification(self) -> str:
        """Which accounting applied, in words (logged to MLflow)."""
        if self.sampling == "random":
            return "client sampling: Poisson selection, q = participation.fraction"
        return "none: fixed selection, q = 1 over the rounds each site was selected in"

    def epsilon(self, delta: float) -> float:
        """Participant-level epsilon at ``delta``: earlier runs' rounds and this run's."""
        return participant_epsilon(
            [*self.prior, *self.rounds], delta=delta, accountant=self.accountant
        )

    def epsilon_after(self, planned: ClientRound, *, delta: float) -> float:
        """Epsilon once ``planned`` is accounted too."""
        return participant_epsilon(
            [*self.prior, *self.rounds, planned], delta=delta, accountant=self.accountant
        )
