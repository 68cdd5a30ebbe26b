"""A user's task package, outside the repository, trained through `fedpipe run` (embedded).

The package (:mod:`tests.task.user_package`) is written under a temporary folder and put on
``PYTHONPATH``, as a site that installed it would have it; the config names it as
``task: clinic_fl.fl:task``. Every strategy's local hook, record-level DP (Opacus) and
secure aggregation wrap its step. One temporary Prefect server serves every run here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.task.user_package import write_package, write_site

REPO = Path(__file__).resolve().parents[2]
FEDPIPE = [sys.executable, "-m", "ops.cli.main"]

CASES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"strategy": {"name": "fedprox", "proximal_mu": 0.1}},
    "scaffold": {"strategy": {"name": "scaffold"}, "training": {"optimizer": "sgd", "momentum": 0}},
    "dp-sgd": {"privacy": {"mode": "record", "noise_multiplier": 0.8, "max_grad_norm": 1.0}},
    "secure-aggregation": {"secure_aggregation": {"enabled": True}},
}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One temporary Prefect server for every run of this module."""
    from ops.servers.temporary import TemporaryServer

    server = TemporaryServer.start(tmp_path_factory.mktemp("prefect") / "server.log")
    try:
        server.wait_ready(timeout=300)
        yield server.api_url
    finally:
        server.stop()


def _env(tmp_path: Path, api_url: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "state" / "prefect"),
        "PREFECT_API_URL": api_url,
        "COLUMNS": "120",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "user")]),
    }


def _config(tmp_path: Path, case: str) -> dict[str, Any]:
    sites = []
    for i in range(3):
        folder = tmp_path / "sites" / f"clinic-{i}"
        write_site(folder, seed=i)
        sites.append({"name": f"clinic-{i}", "data_path": str(folder)})
    base: dict[str, Any] = {
        "name": f"user-{case}",
        "rounds": 2,
        "sites": sites,
        "task": "clinic_fl.fl:task",
        "training": {"epochs": 1, "batch_size": 16},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            # registered once (fedavg: the logged model's signature from the task's example)
            "register_model": case == "fedavg",
        },
    }
    for section, values in CASES[case].items():
        base[section] = {**base.get(section, {}), **values}
    return base


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_users_task_trains_through_fedpipe_run(
    tmp_path: Path, prefect_api: str, case: str
) -> None:
    write_package(tmp_path / "user")
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(_config(tmp_path, case)))

    done = subprocess.run(
        [*FEDPIPE, "run", "fed.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path, prefect_api),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr

    assert done.returncode == 0, output
    rows = [line.split() for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2], output
    assert all(int(row[1]) == 3 for row in rows), output  # every site trained every round
    assert re.search(r"^done: .*accuracy .* after 2 rounds", done.stdout, re.M), output
    assert "Traceback" not in output
    if case == "fedavg":  # the code that touched the data, named in MLflow
        _assert_identity_logged(tmp_path)


def _assert_identity_logged(tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id.split())
    params = run.data.params
    assert params["task.identity.spec"] == "clinic_fl.fl:task"
    assert params["task.identity.package"] == "clinic_fl"
    assert len(params["task.identity.sha256"]) == 64
    assert run.data.tags["fedpipe.task_sha256"] == params["task.identity.sha256"]
