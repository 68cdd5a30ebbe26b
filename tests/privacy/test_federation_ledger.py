"""The coordinator's federation ledger: budgets compose across the runs a model descends from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_components.config import FederationConfig, TrackingConfig
from fl_components.errors import BudgetExhaustedError, ConfigError
from fl_components.privacy.accounting import ClientRound, participant_epsilon
from fl_components.privacy.federation_ledger import FederationLedger, federation_ledger_path
from fl_components.privacy.ledger import PrivacyLedger
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.round.types import ServerState

ROUND = ClientRound(noise_multiplier=1.0, sample_rate=0.3)
EMPTY = ServerState(round=0, parameters=[])


def _config(max_client_epsilon: float | None = None) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "clinics",
            "sites": [{"name": f"s{i}"} for i in range(10)],
            "participation": {"fraction": 0.3, "min_participants": 1},
            "privacy": {
                "mode": "participant",
                "delta": 1e-3,
                "max_client_epsilon": max_client_epsilon,
            },
        }
    )


def _run(ledger: FederationLedger, run_id: str, parent: str | None, rounds: int) -> None:
    ledger.begin_run(
        mlflow_run_id=run_id,
        flow_run_id=f"flow-{run_id}",
        parent_run_id=parent,
        accountant="rdp",
        delta=1e-3,
    )
    for round_num in range(1, rounds + 1):
        ledger.record(run_id, ROUND, round_num=round_num)


def test_ledger_lives_next_to_the_tracking_store(tmp_path: Path) -> None:
    sqlite = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    assert federation_ledger_path(sqlite, "clinics") == tmp_path / "mlflow/privacy/clinics.json"
    remote = TrackingConfig(tracking_uri="http://mlflow:5000", artifact_root="s3://bucket/a")
    with pytest.raises(ConfigError, match="remote"):
        federation_ledger_path(remote, "clinics")


def test_a_run_from_the_champion_composes_with_its_lineage(tmp_path: Path) -> None:
    ledger = FederationLedger.load(tmp_path / "clinics.json", federation="clinics")
    _run(ledger, "first", None, 10)
    _run(ledger, "second", "first", 5)  # init_from: champion (the first run's model)
    _run(ledger, "unrelated", None, 3)  # a fresh model: its own lineage

    reopened = FederationLedger.load(tmp_path / "clinics.json", federation="clinics")
    assert reopened.lineage("second") == ["first", "second"]
    assert reopened.runs["second"].flow_run_id == "flow-second"
    fifteen = participant_epsilon([ClientRound(1.0, 0.3, 15)], delta=1e-3, accountant="rdp")
    assert reopened.epsilon("second", delta=1e-3, accountant="rdp") == pytest.approx(fifteen)
    three = participant_epsilon([ClientRound(1.0, 0.3, 3)], delta=1e-3, accountant="rdp")
    assert reopened.epsilon("unrelated", delta=1e-3, accountant="rdp") == pytest.approx(three)
    every = participant_epsilon([ClientRound(1.0, 0.3, 18)], delta=1e-3, accountant="rdp")
    assert reopened.total_epsilon(delta=1e-3, accountant="rdp") == pytest.approx(every)


def test_two_writers_never_lose_each_others_rounds(tmp_path: Path) -> None:
    one = FederationLedger.load(tmp_path / "f.json", federation="clinics")
    two = FederationLedger.load(tmp_path / "f.json", federation="clinics")
    _run(one, "a", None, 2)
    _run(two, "b", None, 1)  # `two` was loaded before `a` existed
    final = FederationLedger.load(tmp_path / "f.json")
    assert {rid: len(r.rounds) for rid, r in final.runs.items()} == {"a": 2, "b": 1}


def test_second_run_continues_the_first_runs_client_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "clinics.json"
    first = PrivacyRounds(_config())
    state = first.attach_ledger(
        EMPTY,
        FederationLedger.load(path, federation="clinics"),
        mlflow_run_id="r1",
        flow_run_id="p1",
        parent_run_id=None,
    )
    for round_num in (1, 2, 3):
        state, _ = first.account(state, None, selected=("s1",), round_num=round_num)
    second = PrivacyRounds(_config())
    state = second.attach_ledger(
        EMPTY,
        FederationLedger.load(path, federation="clinics"),
        mlflow_run_id="r2",
        flow_run_id="p2",
        parent_run_id="r1",
    )
    state, _ = second.account(state, None, selected=("s2",), round_num=1)
    four = participant_epsilon([ClientRound(1.0, 0.3, 4)], delta=1e-3, accountant="rdp")
    # before the ledger, the second run reported one round's epsilon from zero
    metrics = second.metrics(state, [], None, declined={})
    assert metrics["privacy/client_epsilon"] == pytest.approx(four)


def test_max_client_epsilon_refuses_the_round_past_it(tmp_path: Path) -> None:
    three = participant_epsilon([ClientRound(1.0, 0.3, 3)], delta=1e-3, accountant="rdp")
    rounds = PrivacyRounds(_config(max_client_epsilon=three + 1e-6))
    state = rounds.attach_ledger(
        EMPTY,
        FederationLedger.load(tmp_path / "c.json", federation="clinics"),
        mlflow_run_id="r1",
        flow_run_id=None,
        parent_run_id=None,
    )
    for round_num in (1, 2, 3):
        rounds.check_round(state, ("s1",), round_num=round_num)
        state, _ = rounds.account(state, None, selected=("s1",), round_num=round_num)
    with pytest.raises(
        BudgetExhaustedError,
        match=r"federation 'clinics' refuses round 4: participant-level epsilon spent "
        r".* past privacy.max_client_epsilon",
    ):
        rounds.check_round(state, ("s1",), round_num=4)


def test_max_client_epsilon_without_a_ledger_still_refuses() -> None:
    rounds = PrivacyRounds(_config(max_client_epsilon=0.5))
    with pytest.raises(BudgetExhaustedError, match=r"max_client_epsilon 0\.5"):
        rounds.check_round(EMPTY, ("s1",), round_num=1)


def test_federation_ledger_of_another_federation_is_refused(tmp_path: Path) -> None:
    _run(FederationLedger.load(tmp_path / "x.json", federation="clinics"), "a", None, 1)
    with pytest.raises(ConfigError, match="keeps federation 'clinics', not 'other'"):
        FederationLedger.load(tmp_path / "x.json", federation="other")


def test_site_ledger_entries_name_the_runs_that_spent_them(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    ledger.record(
        federation="f",
        round_num=1,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=10,
        delta=1e-5,
        max_epsilon=None,
        mlflow_run_id="abc",
        flow_run_id="flow-1",
    )
    entry = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp").entries[0]
    assert (entry.mlflow_run_id, entry.flow_run_id) == ("abc", "flow-1")
