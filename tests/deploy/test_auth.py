"""The stack's servers let no one else in (issue 20): anonymous requests get 401, a site's
MLflow user reads but cannot move the ``champion`` alias (403), the coordinator can; the
credentials live in one 0600 file and appear in no log, command line or record."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.stack.credentials import CREDENTIALS_FILE, MLFLOW_AUTH_INI, load_credentials
from tests.deploy.stack_harness import _fedpipe

pytestmark = pytest.mark.integration


def _credentials(stack: dict[str, Any]) -> Any:
    credentials = load_credentials(Path(stack["root"]))
    assert credentials is not None
    return credentials


def test_anonymous_requests_are_refused(stack: dict[str, Any]) -> None:
    """The attacker reaches the ports but holds no credentials: 401 from both servers, for
    reading and for writing; with the stack's credentials the same calls succeed."""
    api, mlflow = stack["prefect_api_url"], stack["mlflow_url"]
    credentials = _credentials(stack)
    assert httpx.post(f"{api}/flow_runs/filter", json={"limit": 1}, timeout=30).status_code == 401
    create = httpx.post(f"{api}/work_pools/", json={"name": "evil", "type": "process"}, timeout=30)
    assert create.status_code == 401
    wrong = httpx.post(f"{api}/flow_runs/filter", json={}, auth=("fedpipe", "guess"), timeout=30)
    assert wrong.status_code == 401
    user, _, password = credentials.prefect_auth_string.partition(":")
    ok = httpx.post(f"{api}/flow_runs/filter", json={"limit": 1}, auth=(user, password), timeout=30)
    assert ok.status_code == 200
    search = f"{mlflow}/api/2.0/mlflow/experiments/search"
    assert httpx.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    made = httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/create", json={"name": "x"}, timeout=30)
    assert made.status_code == 401
    reader = (credentials.reader.username, credentials.reader.password)
    assert httpx.get(search, params={"max_results": 1}, auth=reader, timeout=30).status_code == 200


def test_a_site_cannot_move_the_champion_alias(stack: dict[str, Any]) -> None:
    """A site's own MLflow user reads the registry but gets 403 setting or deleting the
    ``champion`` alias, and cannot write runs; the coordinator's user can move it."""
    from mlflow.tracking import MlflowClient  # as the coordinator: the harness's environment

    mlflow = stack["mlflow_url"]
    credentials = _credentials(stack)
    client = MlflowClient(mlflow, registry_uri=mlflow)
    experiment = client.create_experiment("auth-alias")
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "weights", "model/model.txt")
    client.create_registered_model("auth-alias-model")
    version = client.create_model_version(
        "auth-alias-model", f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    alias = f"{mlflow}/api/2.0/mlflow/registered-models/alias"
    body = {"name": "auth-alias-model", "alias": "champion", "version": version.version}
    site = credentials.site("north")
    as_site = (site.username, site.password)
    assert httpx.post(alias, json=body, auth=as_site, timeout=30).status_code == 403
    coordinator = (credentials.coordinator.username, credentials.coordinator.password)
    assert httpx.post(alias, json=body, auth=coordinator, timeout=30).status_code == 200
    got = httpx.get(alias, params={"name": "auth-alias-model", "alias": "champion"}, auth=as_site)
    assert got.status_code == 200 and got.json()["model_version"]["version"] == version.version
    params = {"name": "auth-alias-model", "alias": "champion"}
    assert httpx.delete(alias, params=params, auth=as_site, timeout=30).status_code == 403
    runs = f"{mlflow}/api/2.0/mlflow/runs/create"
    assert httpx.post(runs, json={"experiment_id": experiment}, auth=as_site).status_code == 403


def test_credentials_stay_in_their_file(stack: dict[str, Any]) -> None:
    """One 0600 file holds them (the MLflow auth config too is 0600 and secret-free); no
    secret appears in a log, the stack's record, the federation, a process's command line
    or a deployment's parameters, and `fedpipe doctor` checks all of it."""
    root = Path(stack["root"])
    credentials = _credentials(stack)
    for name in (CREDENTIALS_FILE, MLFLOW_AUTH_INI):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600
    texts = {str(p): p.read_text(errors="replace") for p in (root / "logs").glob("*.log")}
    texts[MLFLOW_AUTH_INI] = (root / MLFLOW_AUTH_INI).read_text()
    for name in ("stack.json", "federation.json"):
        texts[name] = (root / name).read_text()
    for process in stack["processes"]:
        cmdline = Path(f"/proc/{process['pid']}/cmdline")
        if cmdline.exists():
            texts[f"argv of {process['name']}"] = cmdline.read_bytes().decode(errors="replace")
    user, _, password = credentials.prefect_auth_string.partition(":")
    deployments = httpx.post(
        f"{stack['prefect_api_url']}/deployments/filter", json={}, auth=(user, password)
    )
    texts["deployments"] = deployments.text
    for secret in credentials.secrets():
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"a secret is written in {leaks}"
    doctor = _fedpipe("doctor", "--state-dir", str(root), timeout=180)
    for check in ("prefect auth", "mlflow auth", f"mode {CREDENTIALS_FILE}"):
        line = next(line for line in doctor.stdout.splitlines() if check in line)
        assert "ok" in line and "FAIL" not in line, doctor.stdout
