"""``fedpipe budget`` and ``fedpipe privacy-report``: validated arguments, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fl_components.config import TrackingConfig
from fl_components.privacy.accounting import ClientRound
from fl_components.privacy.federation_ledger import FederationLedger, federation_ledger_path
from fl_components.privacy.ledger import PrivacyLedger
from ops.cli.main import app

runner = CliRunner()


def _text(result: Any) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def _site(folder: Path, *, ledger: bool) -> Path:
    folder.mkdir(parents=True)
    np.savez(folder / "train.npz", features=np.zeros((2, 2)), labels=np.zeros(2))
    if ledger:
        PrivacyLedger.open(folder, site="h1", accountant="rdp").record(
            federation="f",
            round_num=1,
            noise_multiplier=1.1,
            sample_rate=0.05,
            steps=40,
            delta=1e-5,
            max_epsilon=3.0,
            mlflow_run_id="run-abc",
        )
    return folder


@pytest.mark.parametrize("delta", ["2", "0", "-1", "1"])
def test_delta_outside_zero_one_is_refused(tmp_path: Path, delta: str) -> None:
    site = _site(tmp_path / "h1", ledger=True)
    result = runner.invoke(app, ["budget", str(site), "--delta", delta])
    assert result.exit_code != 0
    assert "outside (0, 1)" in _text(result) and "Traceback" not in _text(result)


def test_a_folder_that_is_not_a_site_or_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "fed.yaml").write_text("name: x\n")
    (tmp_path / "empty").mkdir()
    as_file = runner.invoke(app, ["budget", str(tmp_path / "fed.yaml")])
    empty = runner.invoke(app, ["budget", str(tmp_path / "empty")])
    untrained = runner.invoke(app, ["budget", str(_site(tmp_path / "h2", ledger=False))])
    assert as_file.exit_code != 0 and "is a file, not a site folder" in _text(as_file)
    assert empty.exit_code != 0 and "is not a site folder" in _text(empty)
    assert "a site folder holds" in _text(empty)
    assert untrained.exit_code != 0 and "has not trained with DP yet" in _text(untrained)


def test_site_budget_prints_the_ledger_with_its_runs(tmp_path: Path) -> None:
    result = runner.invoke(app, ["budget", str(_site(tmp_path / "h1", ledger=True))])
    assert result.exit_code == 0, _text(result)
    assert "run-abc" in _text(result) and "1 rounds, epsilon spent" in _text(result)


def test_federation_budget_shows_each_run_and_its_lineage(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ledger = FederationLedger.load(
        federation_ledger_path(TrackingConfig(tracking_uri=uri), "clinics"), federation="clinics"
    )
    for run, parent in (("r1", None), ("r2", "r1")):
        ledger.begin_run(
            mlflow_run_id=run, flow_run_id=None, parent_run_id=parent, accountant="rdp", delta=1e-3
        )
        ledger.record(run, ClientRound(1.0, 0.3), round_num=1)
    result = runner.invoke(app, ["budget", "--federation", "clinics", "--tracking-uri", uri])
    assert result.exit_code == 0, _text(result)
    assert "r2" in _text(result) and "2 runs" in _text(result)
    missing = runner.invoke(app, ["budget", "--federation", "other", "--tracking-uri", uri])
    assert missing.exit_code != 0 and "has run no participant-level DP" in _text(missing)


def test_privacy_report_prints_the_logged_artifact(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("f", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "# Privacy report: f\n", "privacy/privacy_report.md")
    result = runner.invoke(app, ["privacy-report", run.info.run_id, "--tracking-uri", uri])
    assert result.exit_code == 0, _text(result)
    assert "Privacy report: f" in _text(result)
    absent = runner.invoke(app, ["privacy-report", "nope", "--tracking-uri", uri])
    assert absent.exit_code != 0 and "has no artifact" in _text(absent)
