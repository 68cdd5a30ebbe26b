"""MLflow's own INFO lines do not reach the user's terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
from fl_components.config import FederationConfig, TrackingConfig
from fl_components.tracking import RunTracker

store = TrackingConfig(tracking_uri="sqlite:///m.db", artifact_root="artifacts")
tracker = RunTracker(FederationConfig(name="quiet", tracking=store))
tracker.start(run_name="x", tags={})
tracker.end()
"""


def test_a_fresh_store_is_created_without_mlflow_info_lines(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    # before: "INFO mlflow.store.db.utils: Creating initial MLflow database tables..."
    assert "INFO" not in done.stdout + done.stderr
