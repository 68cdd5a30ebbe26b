"""Kill a coordinator mid-run, resume it: each round is in the same MLflow run exactly once.

The CLI runs the local backend in its own process group (its temporary Prefect server
included); SIGKILL after round 2's row stops it without any clean-up, as a crash would.
`fedpipe run --resume <MLflow run id>` then goes on from the last checkpoint. A DP run
(both levels) crashed in-process mid-round resumes too, its unknown round counted as spent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 4


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "state" / "prefect"),
        "COLUMNS": "120",
        "PYTHONPATH": str(REPO),
    }


def _kill_after_round(tmp_path: Path, round_num: int) -> tuple[str, str]:
    """Start `fedpipe run`, SIGKILL its group once round ``round_num``'s row is out."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli.main", "run", "fed.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    seen, run_id = [], ""
    deadline = time.monotonic() + 900
    for line in process.stdout:
        seen.append(line)
        found = re.search(r"MLflow run ([0-9a-f]{32})", line)
        run_id = found.group(1) if found else run_id
        if re.match(rf"\s+{round_num}\s+\d+\s+[\d.]+", line) or time.monotonic() > deadline:
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return run_id, "".join(seen)


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_mlflow_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = {
        "name": "resume-fed",
        "rounds": ROUNDS,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "seed": 5,
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(config))

    run_id, before = _kill_after_round(tmp_path, 2)
    assert run_id, before
    folder = tmp_path / "state" / "checkpoints" / "resume-fed" / run_id
    assert (folder / "latest.json").is_file(), before
    resumed = subprocess.run(
        [sys.executable, "-m", "ops.cli.main", "run", "fed.yaml", "--resume", run_id],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = resumed.stdout + resumed.stderr

    assert resumed.returncode == 0, output
    assert f"MLflow run {run_id}" in output  # the same run, reopened
    client = MlflowClient(config["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name("resume-fed")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "global/accuracy")]
    assert sorted(steps) == list(range(ROUNDS + 1)), steps  # every round once
    for site in ("site-0", "site-1", "site-2"):
        site_steps = [m.step for m in client.get_metric_history(run_id, f"site/{site}/accuracy")]
        assert sorted(site_steps) == list(range(ROUNDS + 1)), (site, site_steps)
    assert (folder / f"round-{ROUNDS:04d}" / "arrays.safetensors").is_file()
    assert "Traceback" not in output


class _Crash(Exception):
    """The coordinator dies mid-round (after the sites trained, before anything is logged)."""


def test_a_dp_run_crashed_mid_round_resumes_and_counts_the_unknown_round(
    prefect_harness: None, small_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Participant- and record-level DP (mode both): the round cut short is spent at the
    coordinator, and its re-run is charged again there. At the sites, re-run round 2 (same
    model) is answered with the updates released before the crash, charged once; round 3
    comes from another model (round 2's fresh noise) and is a new release, charged again."""
    from mlflow.tracking import MlflowClient
    from opacus.accountants import RDPAccountant

    import flows.federated_training as training
    from fl_components.federation import federation_dir
    from fl_components.privacy.federation_ledger import FederationLedger, federation_ledger_path
    from fl_components.privacy.ledger import RDP_ORDERS, PrivacyLedger, epsilon_of

    config = small_config.model_validate(
        {
            **small_config.model_dump(exclude_unset=True),
            "rounds": ROUNDS,
            "model": {"kind": "logreg"},
            "training": {"epochs": 1, "batch_size": 32},
            "participation": {"fraction": 1.0, "min_participants": 2},
            "privacy": {"mode": "both", "delta": 1e-3, "noise_multiplier": 1.0},
        }
    )
    real_round = training.run_round

    def crashes_in_round_3(state, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_round(state, plan, *args, **kwargs)  # the sites trained and charged
        if plan.round == 3:
            raise _Crash("coordinator lost in round 3")
        return result

    with monkeypatch.context() as crash:
        crash.setattr(training, "run_round", crashes_in_round_3)
        with pytest.raises(_Crash):
            training.federated_training(config)
    client = MlflowClient(config.tracking.tracking_uri)
    (crashed,) = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])
    run_id = crashed.info.run_id

    summary = training.federated_training(config, resume=run_id)  # old code: ConfigError

    assert summary.mlflow_run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "global/accuracy")]
    assert sorted(steps) == list(range(ROUNDS + 1)), steps  # every round logged once
    # round 1 was checkpointed; rounds 2 (its evaluation rode with round 3) and 3 were begun
    assert run.data.tags["privacy.client.unknown_rounds"] == "2,3"
    ledger = FederationLedger.load(federation_ledger_path(config.tracking, config.name))
    charged = [r.round for r in ledger.runs[run_id].rounds]
    assert charged == [1, 2, 3, 2, 3, 4]  # 2 and 3 before the crash, and re-run after it

    epsilons = client.get_metric_history(run_id, "privacy/client_epsilon")
    final = max(epsilons, key=lambda m: m.step).value
    q = float(run.data.params["privacy.client.sample_rate"])
    z = float(run.data.params["privacy.client.noise_multiplier"])
    uninterrupted_plus_unknown = epsilon_of([(z, q, ROUNDS + 1)], delta=1e-3, accountant="rdp")
    assert final >= uninterrupted_plus_unknown
    # recomputed from what is logged: the privacy report's rounds, through Opacus
    report = json.loads(
        Path(client.download_artifacts(run_id, "privacy/privacy_report.json")).read_text()
    )
    accountant = RDPAccountant()
    accountant.history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in
                          report["client"]["rounds"]]  # fmt: skip
    assert accountant.get_epsilon(1e-3, alphas=RDP_ORDERS) == pytest.approx(final, rel=1e-9)
    rounds_logged = client.get_metric_history(run_id, "privacy/client_rounds")
    assert max(rounds_logged, key=lambda m: m.step).value == 6.0

    for site in config.site_names:  # record level: one charge per release at each site
        entries = PrivacyLedger.load(federation_dir(config) / site / "privacy_ledger.json").entries
        assert sorted(e.round for e in entries if e.mlflow_run_id == run_id) == [1, 2, 3, 3, 4]
