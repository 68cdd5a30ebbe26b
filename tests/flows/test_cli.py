"""The CLI as a user runs it: `fedpipe run` in a fresh folder, `fedpipe validate` on a bad file.

`fedpipe run` starts its own temporary Prefect server (state under the working folder),
shows a row per round and where to look, and stops the server only once it has recorded
every task run: no traceback, no "Error flushing" from the server on the way out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FEDPIPE = str(Path(sys.executable).parent / "fedpipe")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "PREFECT_HOME": str(tmp_path / "state" / "prefect"), "COLUMNS": "120"}


@pytest.mark.slow
def test_run_shows_each_round_and_stops_prefect_cleanly(tmp_path: Path) -> None:
    config = {
        "name": "cli-fed",
        "rounds": 3,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(config))

    done = subprocess.run(
        [FEDPIPE, "run", "federation.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr

    assert done.returncode == 0, output
    rows = [line.split() for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    assert "done: final global accuracy" in done.stdout
    assert "Open the MLflow UI" in done.stdout
    assert "Traceback" not in output
    assert "Error flushing" not in output


def test_validate_names_the_bad_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"name": "x", "rounds": 0}))

    done = subprocess.run(
        [FEDPIPE, "validate", "bad.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "rounds" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
