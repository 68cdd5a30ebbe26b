"""The participant-level accountant's state across rounds, as pure functions of ServerState.

This run's rounds charged so far live in ``ServerState.accountant_history`` (each with the
attempt key drawn when it began), the rounds charged when they began and not accounted yet
in ``ServerState.begun_rounds``; the clip norm in force in ``ServerState.clip_norm`` (moved
by :func:`fl_components.privacy.participant_round.next_clip_norm`). Each function here
takes a state and returns a new one; the accountant that composes the rounds is rebuilt
from the state when asked (:func:`accountant_of`), with the earlier runs' rounds the
federation ledger holds. Nothing here writes anywhere: the ledger is the caller's
(:class:`fl_components.privacy.rounds.PrivacyRounds`).

McMahan et al. 2018, ICLR, arXiv:1710.06963 (participant-level DP-FedAvg); accounting as in
:mod:`fl_components.privacy.accounting`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fl_components.config import FederationConfig
from fl_components.privacy.accounting import ClientRound, ParticipantAccountant
from fl_components.round.types import ServerState


def accountant_of(
    config: FederationConfig,
    state: ServerState | None = None,
    *,
    prior: Sequence[ClientRound] = (),
) -> ParticipantAccountant:
    """The participant-level accountant of ``state``: ``prior`` rounds, then the state's.

    ``prior``: the rounds of the runs the model descends from (the federation ledger's).
    Without ``state``, one with no round of this run (its settings only).
    """
    privacy = config.privacy
    return ParticipantAccountant(
        sampling=privacy.sampling,
        accountant=privacy.accountant,
        fraction=config.participation.fraction,
        prior=list(prior),
        rounds=[] if state is None else list(state.accountant_history),
    )


def attempts(state: ServerState) -> set[str]:
    """The attempt keys of the rounds ``state`` holds charged."""
    return {r.attempt for r in state.accountant_history if r.attempt is not None}


def charged(state: ServerState, entry: ClientRound, *, round_num: int) -> tuple[ServerState, bool]:
    """``state`` with ``entry`` charged when its round began (write-ahead).

    Idempotent by ``entry.attempt``: an attempt the state holds is not charged again. The
    entry is noted begun for ``round_num`` either way (:func:`accounted` does not charge
    it again). Returns the new state and whether the entry was added.
    """
    added = entry.attempt is None or entry.attempt not in attempts(state)
    history = (*state.accountant_history, entry) if added else state.accountant_history
    begun = {**state.begun_rounds, round_num: entry}
    return state.evolve(accountant_history=history, begun_rounds=begun), added


def accounted(
    config: FederationConfig,
    state: ServerState,
    *,
    selected: tuple[str, ...],
    round_num: int,
) -> tuple[ServerState, ClientRound, bool]:
    """``state`` with round ``round_num`` accounted with its *selection* (q from it).

    A round charged when it began is only taken off ``begun_rounds``; otherwise one step of
    the whole mechanism (multiplier z) is charged now. Returns the new state, the round's
    step, and whether it was charged now (the ledger then lacks it).
    """
    begun = dict(state.begun_rounds)
    entry = begun.pop(round_num, None)
    if entry is not None:
        return state.evolve(begun_rounds=begun), entry, False
    entry = accountant_of(config).planned(
        noise_multiplier=config.privacy.client_noise_multiplier, selected=selected
    )
    return state.evolve(accountant_history=(*state.accountant_history, entry)), entry, True


def settled(
    state: ServerState, begun: Iterable[ClientRound]
) -> tuple[ServerState, list[tuple[ClientRound, int, bool]]]:
    """On resume: ``state`` with every step an earlier attempt began charged (once).

    Returns the new state (none of the steps noted begun: none is the round this attempt
    is about to run) and, per step, its round and whether it was newly charged.
    """
    outcomes: list[tuple[ClientRound, int, bool]] = []
    for entry in begun:
        round_num = entry.round if entry.round is not None else 0
        state, added = charged(state, entry, round_num=round_num)
        outcomes.append((entry, round_num, added))
    return state.evolve(begun_rounds={}), outcomes
