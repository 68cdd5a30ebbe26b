"""`fedpipe server start`: runs reuse one local Prefect server, and stay in its UI."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from ops.stack.processes import free_port
from tests.ops.test_cli import _fedpipe


@pytest.mark.slow
def test_runs_reuse_the_local_server_and_stay_in_its_ui(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "name": "reuse-fed",
        "rounds": 2,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(config))
    code, output = _fedpipe(tmp_path, "server", "status")
    assert code == 1 and "no local Prefect server" in output, output
    try:
        code, output = _fedpipe(tmp_path, "server", "start", "--port", str(port), timeout=300)
        assert code == 0, output
        assert f"UI http://127.0.0.1:{port}" in output
        settings = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings"))
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"  # the UI on its own port

        code, output = _fedpipe(tmp_path, "run", "federation.yaml", timeout=600)

        assert code == 0, output
        assert f"Prefect: the local server at http://127.0.0.1:{port}/api" in output
        assert "starting Prefect" not in output and "Traceback" not in output
        assert f"Prefect UI:   http://127.0.0.1:{port}/runs" in output
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/flow_runs/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        runs = json.load(urllib.request.urlopen(request))
        assert [r["state_type"] for r in runs] == ["COMPLETED"]  # still there after the run
        code, output = _fedpipe(tmp_path, "server", "status")
        assert code == 0 and f"API http://127.0.0.1:{port}/api" in output, output
    finally:
        code, output = _fedpipe(tmp_path, "server", "stop")
    assert code == 0 and "Prefect server stopped" in output, output
    code, output = _fedpipe(tmp_path, "server", "status")
    assert code == 1, output
