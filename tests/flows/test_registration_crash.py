"""A coordinator killed (SIGKILL) while it logs or registers its final model, then resumed.

`fedpipe run` runs the local backend in its own process group; the test watches the MLflow
store and kills the group at the moment named, then `fedpipe run --resume <run id>` finishes
the run. Killed after "Created version N", the resume must keep version N (no N+1 for the
same run); killed mid-`log_model`, the resume must leave no PENDING logged model and no
staging folder of the killed attempt behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NAME = "register-crash"

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "state" / "prefect"),
        "TMPDIR": str(tmp_path / "tmp"),  # where MLflow stages a model it logs
        "COLUMNS": "120",
        "PYTHONPATH": str(REPO),
    }


def _fedpipe(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli.main", "run", "fed.yaml", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _kill_when(tmp_path: Path, moment: Callable[[Any, str], bool]) -> str:
    """Start `fedpipe run`; SIGKILL its process group once ``moment(client, run_id)``."""
    from mlflow.tracking import MlflowClient

    out = (tmp_path / "run.out").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli.main", "run", "fed.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # not the registry an earlier test set
    run_id, deadline = "", time.monotonic() + 900
    try:
        while True:
            assert process.poll() is None, (tmp_path / "run.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "run.out").read_text()
            if not run_id:
                found = re.search(r"MLflow run ([0-9a-f]{32})", (tmp_path / "run.out").read_text())
                run_id = found.group(1) if found else ""
            elif moment(client, run_id):
                return run_id
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        out.close()


def _versions_of(client: Any, run_id: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")
                  if v.run_id == run_id)  # fmt: skip


def _logged_models(client: Any, run_id: str) -> list[Any]:
    experiment = client.get_experiment_by_name(NAME).experiment_id
    return list(
        client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    )


def _staged_models(tmp_path: Path) -> list[Path]:
    """Model folders MLflow staged under the runs' TMPDIR (an MLmodel file in each)."""
    return list((tmp_path / "tmp").rglob("MLmodel"))


def test_a_run_killed_at_registration_resumes_without_a_second_version(
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    config = {
        "name": NAME,
        "rounds": 1,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "seed": 5,
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(config))
    uri = config["tracking"]["tracking_uri"]
    client = MlflowClient(uri, registry_uri=uri)  # not the registry an earlier test set
    first = _fedpipe(tmp_path)  # version 1, the champion: the next runs score it, slowly
    assert first.returncode == 0, first.stdout + first.stderr

    # killed mid-log_model: the model staged locally, its logged model still PENDING
    run_id = _kill_when(tmp_path, lambda client, run_id: bool(_staged_models(tmp_path)))
    pending = [m.model_id for m in _logged_models(client, run_id) if str(m.status) == "PENDING"]
    assert pending, "killed too late: log_model had finished"
    resumed = _fedpipe(tmp_path, "--resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    statuses = {m.model_id: str(m.status) for m in _logged_models(client, run_id)}
    assert "PENDING" not in statuses.values(), statuses  # old code: PENDING for ever
    assert _versions_of(client, run_id) == ["2"]
    assert _staged_models(tmp_path) == []  # old code: the killed attempt's folder stays
    assert client.get_run(run_id).info.status == "FINISHED"

    # killed just after "Created version 3", before the champion is scored and an alias moves
    def registered(client: Any, run_id: str) -> bool:
        return bool(_versions_of(client, run_id))

    run_id = _kill_when(tmp_path, registered)
    assert _versions_of(client, run_id) == ["3"]
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert "3" not in aliases.values(), f"killed too late: promoted already ({aliases})"
    resumed = _fedpipe(tmp_path, "--resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    assert _versions_of(client, run_id) == ["3"]  # old code: ["3", "4"]
    # resumed after its last round, no round row comes: the bar still ends full (old: 0/1)
    assert re.search(r"rounds .*1/1", resumed.stdout), resumed.stdout
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")) == [
        "1",
        "2",
        "3",
    ]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedpipe.model_version"] == "3"
    # the run's temporary server is gone: its link is the local server's (same database)
    assert run.data.tags["prefect.flow_run_url"].startswith("http://127.0.0.1:4200/flow-runs/")
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert "3" in aliases.values(), aliases  # promoted, or the challenger
    weights = {a.path for a in client.list_artifacts(run_id, "model_weights")}
    assert weights == {"model_weights/parameters.safetensors"}
