"""What a user does in the Prefect UI, through the API path the UI itself calls.

The Custom run form posts every field it shows, pre-filled from the deployment's stored
parameters, and a Run Name (pre-filled with a random one); the schedule switch updates the
deployment's schedule. Runs on the session's stack (tests/deploy/conftest.py).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.stack_harness import (
    _api_get,
    _api_post,
    _fedpipe,
    _mlflow_run_for,
    _wait_flow_run,
    deployed_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENT = "federated-training/federated-training"


def _deployment(api: str) -> dict[str, Any]:
    response = _api_get(f"{api}/deployments/name/{DEPLOYMENT}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _create_run(api: str, deployment_id: str, body: dict[str, Any]) -> dict[str, Any]:
    created = _api_post(f"{api}/deployments/{deployment_id}/create_flow_run", json=body)
    assert created.status_code == 201, created.text
    run = _wait_flow_run(api, created.json()["id"], timeout=600)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return run


def test_the_form_with_the_strategy_switched_trains_the_new_rules_step(
    stack: dict[str, Any],
) -> None:
    """Issue 23.1: fedavg's η was frozen into the deployment, and the form carried it into
    fedadam (η 1.0 instead of 0.1). The run is named from the merged config (23.3)."""
    from mlflow.tracking import MlflowClient

    from fl_components.config import config_from_dict

    api = stack["prefect_api_url"]
    deployment = _deployment(api)
    stored = deployment["parameters"]["config"]
    form = config_from_dict(stored).model_dump(mode="json")  # every field, as the form shows
    form["strategy"]["name"] = "fedadam"  # the one choice the user changes ...
    form.update(rounds=1, init_from="fresh")  # ... and a short run
    form["tracking"]["register_model"] = False
    run = _create_run(
        api,
        deployment["id"],
        # the UI pre-fills Run Name with a random name; left as is, it is not a choice
        {"name": "alpha3-andromedae-nebula", "parameters": {"config": form}},
    )

    mlrun = _mlflow_run_for(MlflowClient(stack["mlflow_url"]), "e2e-fed", run["id"])
    assert mlrun.data.params["strategy.effective.rule"] == "fedadam"
    assert mlrun.data.params["strategy.effective.server_lr"] == "0.1"  # the η it trained with
    assert re.fullmatch(r"e2e-fed-fedadam-\d{8}-\d{6}", run["name"]), run["name"]
    assert mlrun.info.run_name == run["name"]
    # the η is stored unset in the deployment, resolved from the rule when a run starts
    assert "server_lr" in stored["strategy"] and stored["strategy"]["server_lr"] is None
    # issue 23.5: the run's summary says what it changed and leads to MLflow's classic view
    found = _api_post(
        f"{api}/artifacts/filter",
        json={
            "artifacts": {
                "flow_run_id": {"any_": [run["id"]]},
                "key": {"any_": ["e2e-fed-summary"]},
            }
        },
    )
    assert found.status_code == 200, found.text
    (summary,) = found.json()
    assert "`strategy.name`: fedavg -> fedadam" in summary["data"]
    assert f"/runs/{mlrun.info.run_id}?workflowType=machine_learning" in summary["data"]
    assert "model version: none registered" in summary["data"]
    assert mlrun.data.tags["mlflow.note.content"].startswith(summary["data"])


def test_a_partial_config_is_named_from_the_merge_and_a_given_name_is_kept(
    stack: dict[str, Any],
) -> None:
    """Issue 23.3: a name the user typed into Run Name is the run's, in Prefect and MLflow."""
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    deployment = _deployment(api)
    partial = {"rounds": 1, "init_from": "fresh", "tracking": {"register_model": False}}
    run = _create_run(
        api, deployment["id"], {"name": "baseline-one-round", "parameters": {"config": partial}}
    )

    assert run["name"] == "baseline-one-round"
    mlrun = _mlflow_run_for(MlflowClient(stack["mlflow_url"]), "e2e-fed", run["id"])
    assert mlrun.info.run_name == "baseline-one-round"
    assert mlrun.data.params["strategy.effective.server_lr"] == "1.0"


def test_a_schedule_switched_on_stays_on_after_a_redeploy(stack: dict[str, Any]) -> None:
    """Issue 23.2: `fedpipe up` redeployed with infra/prefect.yaml's `active: false`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ops.stack.sites import deploy_coordinator

    api, state = stack["prefect_api_url"], stack["root"]
    assert not any(s["active"] for s in _deployment(api)["schedules"])

    switched = _fedpipe("schedule", "on", "--state-dir", state, timeout=120)
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert re.search(r"'0 2 \* \* 0' \(UTC\) on$", switched.stdout.strip()), switched.stdout
    assert all(s["active"] for s in _deployment(api)["schedules"])

    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            deploy_coordinator(deployed_config(stack))  # what `fedpipe up` does again
        assert all(s["active"] for s in _deployment(api)["schedules"])
        shown = _fedpipe("schedule", "show", "--state-dir", state, timeout=120)
        assert shown.returncode == 0 and shown.stdout.strip().endswith(" on"), shown.stdout
    finally:
        off = _fedpipe("schedule", "off", "--state-dir", state, timeout=120)
    assert off.returncode == 0, off.stdout + off.stderr
    with temporary_settings(updates={PREFECT_API_URL: api}):
        deploy_coordinator(deployed_config(stack))
    assert not any(s["active"] for s in _deployment(api)["schedules"])
