"""Participant-level accounting across a crash: a begun round is spent, and spent once.

A round is charged when it begins (write-ahead), before any site is sent anything; a
resumed run charges again whatever the crashed attempt began that its ledger or checkpoint
lacks, and nothing twice (each begun round carries an attempt key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.checkpoint import (
    Checkpoint,
    load_latest,
    mark_round_started,
    save_checkpoint,
    started_rounds,
)
from fl_components.config import FederationConfig
from fl_components.privacy.accounting import ClientRound, participant_epsilon
from fl_components.privacy.dp_fedavg import SecureRandom
from fl_components.privacy.federation_ledger import FederationLedger
from fl_components.privacy.participant_round import (
    clip_norm_in_force,
    next_clip_norm,
    private_mean,
)
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.round.types import LocalUpdate, ServerState
from flows.resume import ResumePoint, run_folder, save_round

SITES = tuple(f"s{i}" for i in range(10))


def _config(**privacy: Any) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "clinics",
            "sites": [{"name": s} for s in SITES],
            "participation": {"fraction": 0.3, "min_participants": 1},
            "privacy": {"mode": "participant", "delta": 1e-3, **privacy},
        }
    )


def _attempt(
    ledger_path: Path,
    *,
    config: FederationConfig | None = None,
    state: ServerState | None = None,
) -> tuple[PrivacyRounds, ServerState]:
    """One coordinator attempt of run 'r1': its privacy reporter and state, the ledger attached.

    ``state``: the one it starts from (a checkpoint's); a fresh one by default.
    """
    rounds = PrivacyRounds(config or _config())
    ledger = FederationLedger.load(ledger_path, federation="clinics")
    state = rounds.attach_ledger(
        state or ServerState(round=0, parameters=[np.zeros(3, dtype=np.float32)]),
        ledger,
        mlflow_run_id="r1",
        flow_run_id="f",
        parent_run_id=None,
    )
    return rounds, state


def _begin(
    rounds: PrivacyRounds, state: ServerState, folder: Path, round_num: int, *, charge: bool = True
) -> ServerState:
    entry = rounds.begin_round(SITES[:3], round_num=round_num)
    mark_round_started(folder, round_num, privacy_step=entry.to_json())
    if charge:  # a crash between the two writes leaves the ledger without it
        state, _ = rounds.charge(state, entry, round_num=round_num)
    return state


def test_a_round_begun_is_charged_once_whatever_happens_after(tmp_path: Path) -> None:
    rounds, state = _attempt(tmp_path / "ledger.json")
    state = _begin(rounds, state, tmp_path / "ckpt", 1)
    # the round then ends: no 2nd step
    state, _ = rounds.account(state, None, selected=SITES[:3], round_num=1)

    assert len(state.accountant_history) == 1 and not state.begun_rounds
    assert len(FederationLedger.load(tmp_path / "ledger.json").runs["r1"].rounds) == 1


def test_resuming_charges_the_unknown_round_even_when_the_ledger_missed_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ckpt"
    crashed, state = _attempt(tmp_path / "ledger.json")
    for round_num in (1, 2):
        state = _begin(crashed, state, folder, round_num)
        state, _ = crashed.account(state, None, selected=SITES[:3], round_num=round_num)
    checkpointed = state.state_dict()  # round 2's checkpoint
    _begin(crashed, state, folder, 3, charge=False)  # crash: started.json has it, the ledger not

    resumed, fresh = _attempt(tmp_path / "ledger.json")
    point = ResumePoint("r1", Checkpoint(2, "r1", checkpointed), started=started_rounds(folder))
    state, charged = resumed.settle(fresh, point.begun_steps(point.state()))
    # a second resume adds nothing
    state, again = resumed.settle(state, point.begun_steps(point.state()))

    assert charged == {3: 1} and again == {}
    ledger = FederationLedger.load(tmp_path / "ledger.json")
    assert [(r.round, r.settled) for r in ledger.runs["r1"].rounds] == [
        (1, False),
        (2, False),
        (3, True),
    ]
    assert len(state.accountant_history) == 3
    three = participant_epsilon([ClientRound(1.0, 0.3)] * 3, delta=1e-3, accountant="rdp")
    accountant = resumed.accountant(state)
    assert accountant is not None and accountant.epsilon(1e-3) == pytest.approx(three)

    state = _begin(resumed, state, folder, 3)  # the re-run of round 3: another run of it
    assert len(state.accountant_history) == 4
    assert [r.round for r in FederationLedger.load(tmp_path / "ledger.json").runs["r1"].rounds] == [
        1,
        2,
        3,
        3,
    ]


def test_a_resumed_run_keeps_its_own_rounds_apart_from_its_lineage(tmp_path: Path) -> None:
    first, state = _attempt(tmp_path / "ledger.json")
    _begin(first, state, tmp_path / "ckpt", 1)
    resumed, state = _attempt(tmp_path / "ledger.json")

    assert resumed.prior == [] and len(state.accountant_history) == 1
    assert resumed.metrics(state, [], None, declined={})["privacy/client_rounds"] == 1.0


def _train(rounds: PrivacyRounds, state: ServerState, folder: Path, round_num: int) -> ServerState:
    """One round as the coordinator runs it: begun (charged), DP-FedAvg, accounted, the clip
    norm moved (``account_round``). The noise is keyed by the round: both runs draw the same."""
    config = rounds.config
    state = _begin(rounds, state, folder, round_num)
    updates = [
        LocalUpdate(site, round_num, [np.full(3, scale, dtype=np.float32)], 10, 0.5, 0.0)
        for site, scale in zip(SITES[:3], (0.05, 0.3, 2.0), strict=True)
    ]
    rng = SecureRandom(round_num.to_bytes(32, "big"))
    result = private_mean(config, updates, clip_norm=clip_norm_in_force(config, state), rng=rng)
    state, _ = rounds.account(state, result, selected=SITES[:3], round_num=round_num)
    clip = next_clip_norm(config, clip_norm_in_force(config, state), result, rng=rng)
    return state.evolve(round=round_num, clip_norm=clip)


@pytest.mark.parametrize("begun_before_crash", [False, True])
def test_clip_norm_and_accountant_resume_from_a_checkpoint_as_if_never_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, begun_before_crash: bool
) -> None:
    """The adapted clip norm and the accountant's rounds ride in the checkpointed state: a
    run resumed after round 2 clips and accounts rounds 3 and 4 exactly as one never
    interrupted. A round begun before the crash (outcome unknown) is spent once more."""
    monkeypatch.setenv("FEDPIPE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    config = _config(adaptive_clipping=True, clip_norm=0.5)
    whole, state = _attempt(tmp_path / "whole.json", config=config)
    clips: list[float | None] = []
    for round_num in range(1, 5):
        state = _train(whole, state, tmp_path / "whole", round_num)
        clips.append(state.clip_norm)
    uninterrupted = state

    folder = run_folder(config, "r1")
    crashed, state = _attempt(tmp_path / "ledger.json", config=config)
    for round_num in (1, 2):
        state = _train(crashed, state, folder, round_num)
        save_round(config, mlflow_run_id="r1", state=state, round_num=round_num, history=[])
    if begun_before_crash:
        _begin(crashed, state, folder, 3)  # charged, then the crash: its outcome unknown

    checkpoint = load_latest(folder)
    assert checkpoint is not None and "privacy" not in checkpoint.extra  # the state's only
    point = ResumePoint("r1", checkpoint, started=started_rounds(folder))
    restored = point.state()
    assert restored is not None and restored.clip_norm == clips[1]  # bit for bit
    resumed, state = _attempt(tmp_path / "ledger.json", config=config, state=restored)
    state, _ = resumed.settle(state, point.begun_steps(point.state()))
    for round_num in (3, 4):
        state = _train(resumed, state, folder, round_num)

    assert clips[0] != 0.5 and len(set(clips)) == 4  # adaptive clipping moved it each round
    assert state.clip_norm == uninterrupted.clip_norm
    unknown = [ClientRound(1.0, 0.3)] if begun_before_crash else []
    assert list(state.accountant_history) == [*uninterrupted.accountant_history, *unknown]
    after, whole_after = resumed.accountant(state), whole.accountant(uninterrupted)
    assert after is not None and whole_after is not None
    expected = participant_epsilon(
        [*uninterrupted.accountant_history, *unknown], delta=1e-3, accountant="rdp"
    )
    assert after.epsilon(1e-3) == expected
    if not begun_before_crash:
        assert after.epsilon(1e-3) == whole_after.epsilon(1e-3)


def test_a_checkpoint_of_the_earlier_layout_resumes_its_keyed_rounds_once(tmp_path: Path) -> None:
    """Before the accountant moved into ServerState, a checkpoint kept its keyed rounds under
    extra["privacy"] and unkeyed [z, q, steps] in the state: the keyed ones are read, and a
    round they hold is not charged twice."""
    crashed, state = _attempt(tmp_path / "ledger.json")
    folder = tmp_path / "ckpt"
    for round_num in (1, 2):
        state = _begin(crashed, state, folder, round_num)
        state, _ = crashed.account(state, None, selected=SITES[:3], round_num=round_num)
    old = state.state_dict()
    old["accountant_history"] = [[1.0, 0.3, 1]] * 2  # what the state held then
    keyed = [r.to_json() for r in state.accountant_history]
    save_checkpoint(
        folder, Checkpoint(2, "r1", old, extra={"history": [], "privacy": {"rounds": keyed}})
    )

    point = ResumePoint("r1", load_latest(folder), started=started_rounds(folder))
    restored = point.state()
    assert restored is not None and restored.accountant_history == state.accountant_history
    assert [r.attempt for r in restored.accountant_history] == [
        r.attempt for r in state.accountant_history
    ]
    resumed, fresh = _attempt(tmp_path / "ledger.json", state=restored)
    fresh, charged = resumed.settle(fresh, point.begun_steps(point.state()))
    assert charged == {} and len(fresh.accountant_history) == 2
