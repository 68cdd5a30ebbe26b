"""A `fedpipe run` killed outright (SIGKILL) must not leave its temporary Prefect server behind.

The CLI starts the server (ops/servers/temporary.py) and is then killed with SIGKILL, by
its pid alone, as the OOM killer or `kill -9` would: the server must go with it. A server
left by a killed CLI (its recorded owner gone) is stopped by the next CLI that looks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVER_APP = b"prefect.server.api.server:create_app"

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}


def _children_serving(parent: int) -> list[int]:
    """Pids of ``parent``'s children that run the Prefect server app."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and SERVER_APP in cmdline:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _port_of(pid: int) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--port") + 1])


def _wait_healthy(port: int, *, timeout: float) -> None:
    from ops.servers.temporary import healthy

    deadline = time.monotonic() + timeout
    while not healthy(f"http://127.0.0.1:{port}/api/health"):
        assert time.monotonic() < deadline, f"no server answered on port {port}"
        time.sleep(0.5)


def test_a_killed_run_takes_its_temporary_server_with_it(tmp_path: Path) -> None:
    config = {
        "name": "orphan-fed",
        "rounds": 50,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(config))
    cli = subprocess.Popen(
        [sys.executable, "-m", "ops.cli.main", "run", "fed.yaml"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the test's own clean-up can reach whatever is left
    )
    try:
        deadline = time.monotonic() + 120
        while not (servers := _children_serving(cli.pid)):
            assert cli.poll() is None, f"fedpipe run exited ({cli.returncode}) before its server"
            assert time.monotonic() < deadline, "fedpipe run started no server in 120 s"
            time.sleep(0.2)
        (server,) = servers
        _wait_healthy(_port_of(server), timeout=300)

        os.kill(cli.pid, signal.SIGKILL)  # the CLI alone, as kill -9 PID does
        cli.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(server), f"the temporary server (pid {server}) outlived its run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)


def test_a_server_whose_run_is_gone_is_stopped_by_the_next_run(tmp_path: Path) -> None:
    """A real temporary server recorded as owned by a CLI that is gone (as one killed before
    this fix, or on a system without parent-death signals, leaves it): the next run's look
    (``stop_orphans``) stops it and drops its record; a live owner's server is left alone."""
    from ops.servers.temporary import RECORDS, TemporaryServer, stop_orphans

    os.environ.setdefault("PREFECT_HOME", str(tmp_path / "prefect"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_owner = int(gone.stdout)
    orphan = TemporaryServer.start(tmp_path / "server.log")
    kept = TemporaryServer.start(tmp_path / "server.log")
    records = tmp_path / RECORDS
    try:
        orphan.wait_ready(timeout=300)
        kept.wait_ready(timeout=300)
        path = records / f"{orphan.process.pid}.json"
        record = json.loads(path.read_text())
        assert record["parent"] == os.getpid()  # recorded as this process's
        path.write_text(json.dumps({**record, "parent": dead_owner}))  # its owner, killed

        said = stop_orphans(records)

        assert orphan.process.wait(timeout=20) is not None  # stopped
        assert not path.exists()
        assert said == [
            "stopped a temporary Prefect server left by a killed fedpipe run "
            f"(pid {orphan.process.pid}, port {orphan.port}, its run's pid {dead_owner})"
        ]
        assert kept.process.poll() is None  # its owner (this process) lives
        assert (records / f"{kept.process.pid}.json").is_file()
    finally:
        orphan.stop()
        kept.stop()
    assert not list(records.glob("*.json"))  # a stopped server's record goes with it
