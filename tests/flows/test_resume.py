"""Kill a coordinator mid-run, resume it: each round is in the same MLflow run exactly once.

The CLI runs the local backend in its own process group (its temporary Prefect server
included); SIGKILL after round 2's row stops it without any clean-up, as a crash would.
`fedpipe run --resume <MLflow run id>` then goes on from the last checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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
        [sys.executable, "-m", "flows.cli", "run", "fed.yaml"],
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
        [sys.executable, "-m", "flows.cli", "run", "fed.yaml", "--resume", run_id],
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
