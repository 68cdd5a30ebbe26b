"""What the privacy report tells: each row names its run, each figure says how to recompute it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fl_components.config import FederationConfig
from fl_components.privacy.ledger import PrivacyLedger
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.round.types import LocalUpdate, ServerState

DELTA = 1e-5


EMPTY = ServerState(round=0, parameters=[])


def _rounds() -> PrivacyRounds:
    return PrivacyRounds(
        FederationConfig.model_validate(
            {
                "name": "hospitals",
                "sites": [{"name": "h1"}, {"name": "h2"}],
                "privacy": {"mode": "record", "noise_multiplier": 1.1},
            }
        )
    )


def _update(epsilon: float) -> LocalUpdate:
    return LocalUpdate(
        site="h1",
        round=1,
        delta=[np.zeros(2, dtype=np.float32)],
        num_examples=10,
        train_loss=0.1,
        seconds=0.0,
        extra={
            "epsilon": epsilon,
            "delta": DELTA,
            "noise_multiplier": 1.1,
            "sample_rate": 0.1,
            "steps": 20.0,
            "max_grad_norm": 1.0,
            "grad_sample_mode": 0.0,
        },
    )


def test_record_level_rows_name_the_run_that_spent_them() -> None:
    rounds = _rounds()
    rounds.bind_run("mlflow-run-7")
    rounds.metrics(EMPTY, [_update(0.8)], None, declined={})

    report = rounds.report(EMPTY, mlflow_run_id="mlflow-run-7", flow_run_id=None)

    (site,) = report["sites"]
    assert [row["run"] for row in site["rounds"]] == ["mlflow-run-7"]


def test_record_level_rounds_are_not_logged_without_their_run() -> None:
    with pytest.raises(ValueError, match="bind_run"):
        _rounds().metrics(EMPTY, [_update(0.8)], None, declined={})


def test_a_sites_ledger_epsilon_names_the_command_that_recomputes_it(tmp_path: Path) -> None:
    from ops.cli.main import app

    # the site's ledger: an earlier run's round and this run's
    ledger = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    for run in ("earlier-run", "mlflow-run-7"):
        ledger.record(
            federation="hospitals", round_num=1, noise_multiplier=1.1, sample_rate=0.1,
            steps=20, delta=DELTA, max_epsilon=None, mlflow_run_id=run,
        )  # fmt: skip
    spent = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp").epsilon(DELTA)
    rounds = _rounds()
    rounds.bind_run("mlflow-run-7")
    rounds.metrics(EMPTY, [_update(spent)], None, declined={})

    (site,) = rounds.report(EMPTY, mlflow_run_id="mlflow-run-7", flow_run_id=None)["sites"]

    # this run's rows alone do not give it: the earlier run counts too
    assert site["ledger_epsilon"] == pytest.approx(spent)
    assert site["epsilon_this_run"]["rdp"] < spent
    command = site["ledger_epsilon_recompute"]
    assert command == f"at the site: fedpipe budget <folder of h1> --delta {DELTA!r}"
    # and the command, run at the site, prints that figure
    argv = command.removeprefix("at the site: fedpipe ").replace("<folder of h1>", str(tmp_path))
    result = CliRunner().invoke(app, argv.split())
    assert result.exit_code == 0, result.output
    assert f"epsilon spent {spent:.3f}" in result.output
