"""Participant-level accounting for DP-FedAvg: rounds composed with client sampling.

Each round is a sampled Gaussian mechanism on the participants (McMahan et al. 2018, ICLR,
arXiv:1710.06963, Section 3 and Theorem 1: the moments accountant with q = expected share
of participants per round), composed over rounds with RDP (Mironov, Talwar & Zhang 2019,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530).

Amplification by sampling holds only when selection is random *and* secret. With a fixed
or public selection the accountant uses q = 1 and counts, for each participant, only the
rounds it joined; the reported epsilon is the worst participant's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fl_components.privacy.ledger import epsilon_of


@dataclass
class ParticipantAccountant:
    """Composes DP-FedAvg rounds at the participant level.

    Attributes
    ----------
    sampling : str
        'random' (q = participants per round / all sites) or 'fixed' (q = 1 over the
        rounds each participant joined).
    accountant : str
        Opacus accountant name.
    population : int
        Number of sites selection draws from.
    """

    sampling: str
    accountant: str
    population: int
    rounds: list[tuple[float, float]] = field(default_factory=list)
    joined: Counter[str] = field(default_factory=Counter)

    def step(self, *, noise_multiplier: float, participants: tuple[str, ...]) -> None:
        """Account one round with the given (effective) noise multiplier."""
        sample_rate = len(participants) / self.population
        self.rounds.append((noise_multiplier, sample_rate))
        self.joined.update(participants)

    @property
    def amplification(self) -> str:
        """Which accounting applied, in words (logged to MLflow)."""
        if self.sampling == "random":
            return "client sampling: q = participants per round / sites"
        return "none: fixed selection, q = 1 over the rounds each participant joined"

    def epsilon(self, delta: float) -> float:
        """Participant-level epsilon at ``delta`` after the rounds so far."""
        if not self.rounds:
            return 0.0
        if self.sampling == "random":
            history = [(z, q, 1) for z, q in self.rounds]
            return epsilon_of(history, delta=delta, accountant=self.accountant)
        # q = 1: a participant pays only for the rounds it was in; the noise multiplier is
        # taken as the smallest used (a conservative bound when it varied)
        if not self.joined:
            return 0.0
        z = min(z for z, _ in self.rounds)
        worst = max(self.joined.values())
        return epsilon_of([(z, 1.0, worst)], delta=delta, accountant=self.accountant)
