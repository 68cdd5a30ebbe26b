"""Participant-level accounting across a crash: a begun round is spent, and spent once.

A round is charged when it begins (write-ahead), before any site is sent anything; a
resumed run charges again whatever the crashed attempt began that its ledger or checkpoint
lacks, and nothing twice (each begun round carries an attempt key).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_components.checkpoint import mark_round_started, started_rounds
from fl_components.config import FederationConfig
from fl_components.privacy.accounting import ClientRound, participant_epsilon
from fl_components.privacy.federation_ledger import FederationLedger
from fl_components.privacy.rounds import PrivacyRounds
from flows.resume import ResumePoint

SITES = tuple(f"s{i}" for i in range(10))


def _config() -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "clinics",
            "sites": [{"name": s} for s in SITES],
            "participation": {"fraction": 0.3, "min_participants": 1},
            "privacy": {"mode": "participant", "delta": 1e-3},
        }
    )


def _attempt(ledger_path: Path) -> PrivacyRounds:
    """One coordinator attempt of run 'r1': its privacy state, the ledger attached."""
    rounds = PrivacyRounds(_config())
    ledger = FederationLedger.load(ledger_path, federation="clinics")
    rounds.attach_ledger(ledger, mlflow_run_id="r1", flow_run_id="f", parent_run_id=None)
    return rounds


def _begin(rounds: PrivacyRounds, folder: Path, round_num: int, *, charge: bool = True) -> None:
    entry = rounds.begin_round(SITES[:3], round_num=round_num)
    mark_round_started(folder, round_num, privacy_step=entry.to_json())
    if charge:  # a crash between the two writes leaves the ledger without it
        rounds.charge(entry, round_num=round_num)


def test_a_round_begun_is_charged_once_whatever_happens_after(tmp_path: Path) -> None:
    rounds = _attempt(tmp_path / "ledger.json")
    _begin(rounds, tmp_path / "ckpt", 1)
    rounds.account(None, selected=SITES[:3], round_num=1)  # the round then ends: no 2nd step

    assert len(rounds.accountant.rounds) == 1
    assert len(FederationLedger.load(tmp_path / "ledger.json").runs["r1"].rounds) == 1


def test_resuming_charges_the_unknown_round_even_when_the_ledger_missed_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ckpt"
    crashed = _attempt(tmp_path / "ledger.json")
    for round_num in (1, 2):
        _begin(crashed, folder, round_num)
        crashed.account(None, selected=SITES[:3], round_num=round_num)
    checkpointed = crashed.state_dict()  # round 2's checkpoint
    _begin(crashed, folder, 3, charge=False)  # crash: started.json has it, the ledger not

    resumed = _attempt(tmp_path / "ledger.json")
    point = ResumePoint("r1", None, started=started_rounds(folder))
    point_steps = [ClientRound.from_json(r) for r in checkpointed["rounds"]] + point.begun_steps()
    charged = resumed.settle(point_steps)
    again = resumed.settle(point_steps)  # a second resume of the same crash adds nothing

    assert charged == {3: 1} and again == {}
    ledger = FederationLedger.load(tmp_path / "ledger.json")
    assert [(r.round, r.settled) for r in ledger.runs["r1"].rounds] == [
        (1, False),
        (2, False),
        (3, True),
    ]
    assert len(resumed.accountant.rounds) == 3
    three = participant_epsilon([ClientRound(1.0, 0.3)] * 3, delta=1e-3, accountant="rdp")
    assert resumed.accountant.epsilon(1e-3) == pytest.approx(three)

    _begin(resumed, folder, 3)  # the re-run of round 3: another run of the mechanism
    assert len(resumed.accountant.rounds) == 4
    assert [r.round for r in FederationLedger.load(tmp_path / "ledger.json").runs["r1"].rounds] == [
        1,
        2,
        3,
        3,
    ]


def test_a_resumed_run_keeps_its_own_rounds_apart_from_its_lineage(tmp_path: Path) -> None:
    first = _attempt(tmp_path / "ledger.json")
    _begin(first, tmp_path / "ckpt", 1)
    resumed = _attempt(tmp_path / "ledger.json")

    assert resumed.accountant.prior == [] and len(resumed.accountant.rounds) == 1
    assert resumed.metrics([], None, declined={})["privacy/client_rounds"] == 1.0
