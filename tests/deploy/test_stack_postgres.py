"""The deployment end to end on the stack's own PostgreSQL, training a user's own task.

`fedpipe up --database postgresql` with 3 sites whose federation names a task package
outside the repository (``tests/task/user_package.py``, installed at every site by being on
their ``PYTHONPATH``), with secure aggregation: one run from the UI's Run button with FedAvg,
one with FedProx and record-level DP; then the database server killed and repaired.

The test skips, never fails, where PostgreSQL is not installed (``auto`` then falls back to
SQLite, which tests/ops/test_postgres.py checks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.stack.postgres import find_bindir
from tests.deploy.stack_harness import REPO, SITES, _assert_every_site_served_every_round
from tests.deploy.test_stack import (
    _api_get,
    _api_post,
    _assert_metrics_at_each_round,
    _fedpipe,
    _mlflow_run_for,
    _wait_flow_run,
    running_stack,
)
from tests.task.user_package import write_package, write_site

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed here")
    # run as root, the cluster runs as `postgres`, which must enter the state folder
    root = Path(tempfile.mkdtemp(prefix="fedpipe-pgstack-"))
    root.chmod(0o711)
    user = write_package(root / "user")
    sites = []
    for i, site in enumerate(SITES):
        write_site(root / "sites" / site, seed=i)
        sites.append({"name": site, "data_path": str(root / "sites" / site)})
    federation = {
        "task": "clinic_fl.fl:task",
        "sites": sites,
        "data": None,
        "model": None,
        "training": {"epochs": 1, "batch_size": 16},
        "secure_aggregation": {"enabled": True},
    }
    path = os.pathsep.join([str(REPO), str(user)])
    try:
        with running_stack(
            root,
            name="e2e-pg",
            extra_args=("--database", "postgresql"),
            federation_update=federation,
            env_extra={"PYTHONPATH": path},
        ) as record:
            yield record
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_run_button_on_postgres(stack: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    server = next(p for p in stack["processes"] if p["name"] == "prefect-server")
    assert Path(f"/proc/{server['pid']}").exists()
    assert stack["processes"][0]["name"] == "postgres"  # first up, last down
    assert stack["database"].startswith("postgresql (the stack's own")
    assert not (Path(stack["root"]) / "prefect" / "prefect.db").exists()  # not SQLite

    deployment = _api_get(f"{api}/deployments/name/federated-training/federated-training").json()
    config = deployment["parameters"]["config"]
    assert config["backend"] == "work-pool"
    created = _api_post(  # what the UI's Run button sends
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": {**config, "rounds": 2, "init_from": "fresh"}}},
    )
    assert created.status_code == 201, created.text
    run = _wait_flow_run(api, created.json()["id"], timeout=400)
    assert run["state"]["type"] == "COMPLETED", run["state"].get("message")

    _assert_every_site_served_every_round(api, run["id"], rounds=2)

    # MLflow: per-round metrics at step = round
    client = MlflowClient(stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, "e2e-pg", run["id"])
    _assert_metrics_at_each_round(client, mlrun.info.run_id, rounds=2)
    rounds = client.get_metric_history(mlrun.info.run_id, "round_seconds")
    if rounds:
        print(f"postgres median round_seconds: {statistics.median(m.value for m in rounds):.2f}")
    # the user's code trained, under secure aggregation, and is named in MLflow
    params = mlrun.data.params
    assert params["task.identity.spec"] == "clinic_fl.fl:task"
    assert params["task.identity.package"] == "clinic_fl"
    assert params["secure_aggregation.enabled"] == "True"
    assert mlrun.data.tags["fedpipe.task_sha256"] == params["task.identity.sha256"]

    # no lock errors, and the database's password in no log and not in stack.json
    from ops.stack.credentials import load_credentials

    credentials = load_credentials(Path(stack["root"]))
    assert credentials is not None and credentials.database_password
    state = Path(stack["root"])
    for path in [state / "stack.json", *(state / "logs").glob("*.log")]:
        text = path.read_text(errors="replace")
        assert "database is locked" not in text, path
        assert credentials.database_password not in text, path


def test_a_users_task_with_fedprox_and_record_level_dp(stack: dict[str, Any]) -> None:
    """The same deployed task with FedProx and DP-SGD, still masked: every site's ledger
    charges the run and names the task's source hash (the code that touched its data).

    (SCAFFOLD needs each update in the clear, which these sites' policies refuse; the
    embedded runs of tests/task/test_user_task_runs.py train the task with it.)"""
    api = stack["prefect_api_url"]
    deployment = _api_get(f"{api}/deployments/name/federated-training/federated-training").json()
    config = {
        **deployment["parameters"]["config"],
        "rounds": 2,
        "init_from": "fresh",
        "strategy": {"name": "fedprox", "proximal_mu": 0.1},
        "privacy": {"mode": "record", "noise_multiplier": 0.8, "max_grad_norm": 1.0},
    }
    created = _api_post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": config}},
    )
    assert created.status_code == 201, created.text
    run = _wait_flow_run(api, created.json()["id"], timeout=600)
    assert run["state"]["type"] == "COMPLETED", run["state"].get("message")
    _assert_every_site_served_every_round(api, run["id"], rounds=2)

    from mlflow.tracking import MlflowClient

    mlrun = _mlflow_run_for(MlflowClient(stack["mlflow_url"]), "e2e-pg", run["id"])
    sha = mlrun.data.params["task.identity.sha256"]
    assert float(mlrun.data.metrics["privacy/epsilon"]) > 0
    for site in SITES:
        ledger = json.loads(
            (Path(stack["sites"][site]["data"]) / "privacy_ledger.json").read_text()
        )
        entries = [e for e in ledger["entries"] if e.get("task_sha256") == sha]
        assert entries, f"site {site}: no ledger entry names the task {sha[:12]}: {ledger}"


def test_a_killed_database_is_named_by_doctor_and_repaired(stack: dict[str, Any]) -> None:
    """PostgreSQL killed (SIGKILL, its group): doctor names it and `fedpipe up --repair`,
    the repair starts it on its port with its data, and the Prefect server serves again."""
    from ops.stack.processes import _group_members

    state = stack["root"]
    (database,) = [p for p in stack["processes"] if p["name"] == "postgres"]
    os.killpg(database["pgid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _group_members(database["pgid"]) and time.monotonic() < deadline:
        time.sleep(0.2)

    # the operator's shell has the task package installed, as the sites do
    installed = {"PYTHONPATH": os.pathsep.join([str(REPO), str(Path(state).parent / "user")])}
    doctor = _fedpipe("doctor", "--state-dir", state, timeout=300, env_extra=installed)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    flat = doctor.stdout.replace("\n", "")
    assert "postgres: fedpipe up --repair --state-dir" in flat, doctor.stdout
    assert "Traceback" not in doctor.stdout + doctor.stderr

    repaired = _fedpipe("up", "--repair", "--state-dir", state, timeout=600)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "postgres: restarted" in repaired.stdout, repaired.stdout
    record = json.loads((Path(state) / "stack.json").read_text())
    assert record["postgres"]["port"] == stack["postgres"]["port"]

    api = stack["prefect_api_url"]
    deployment = _api_get(f"{api}/deployments/name/federated-training/federated-training")
    assert deployment.status_code == 200, deployment.text  # the same data: it is there
    doctor = _fedpipe("doctor", "--state-dir", state, timeout=300, env_extra=installed)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
