"""The deployment end to end on PostgreSQL: a throwaway cluster on 127.0.0.1, `fedpipe up
--database-url postgresql+asyncpg://...` with 3 sites, one run from the UI's Run button.

PostgreSQL comes from Debian's `postgresql` package (installed here when missing); the test
skips, never fails, when the package cannot be had.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.postgres import PostgresUnavailable, throwaway_postgres
from tests.deploy.test_stack import (
    _api_get,
    _api_post,
    _assert_metrics_at_each_round,
    _assert_one_participant_run_per_site_and_round,
    _mlflow_run_for,
    _wait_flow_run,
    running_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway cluster (benchmarks/postgres.py); the test skips when PostgreSQL is absent."""
    try:
        with throwaway_postgres() as url:
            yield url
    except PostgresUnavailable as error:  # raised while setting up, before the yield
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def stack(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pgstack")
    with running_stack(root, name="e2e-pg", extra_args=("--database-url", postgres)) as record:
        yield record


def test_run_button_on_postgres(stack: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    server = next(p for p in stack["processes"] if p["name"] == "prefect-server")
    assert Path(f"/proc/{server['pid']}").exists()
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
    assert run["state"]["type"] == "COMPLETED", run["state"]

    _assert_one_participant_run_per_site_and_round(api, run["id"], rounds=2)

    # MLflow: per-round metrics at step = round
    client = MlflowClient(stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, "e2e-pg", run["id"])
    _assert_metrics_at_each_round(client, mlrun.info.run_id, rounds=2)
    rounds = client.get_metric_history(mlrun.info.run_id, "round_seconds")
    if rounds:
        print(f"postgres median round_seconds: {statistics.median(m.value for m in rounds):.2f}")
