"""A long-lived local Prefect server that every ``fedpipe run`` on this machine reuses.

Without one, each embedded run boots a temporary server (7-15 s on 2 cores, the largest
fixed cost of a short run) and stops it at the end, so the Prefect UI is gone when the run
is. ``fedpipe server start`` runs Prefect's own background server (``prefect server start
--background``: its PID file in ``PREFECT_HOME``, stopped by ``prefect server stop``) on
127.0.0.1 with the UI pointed at its own API, and records the port beside the PID file;
``fedpipe run`` finds it (:func:`running_api_url`) and runs against it, so its runs stay in
the UI after they end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fl_components.errors import FedpipeError
from ops.servers import schema
from ops.servers.temporary import LOCAL_PORT, healthy

RECORD = "fedpipe-server.json"
PID_FILE = "server.pid"  # prefect.cli._server_utils.SERVER_PID_FILE_NAME


@dataclass(frozen=True)
class LocalServer:
    """Where the background server listens, and its process id."""

    port: int
    pid: int

    @property
    def api_url(self) -> str:
        """The API's base URL (what ``PREFECT_API_URL`` is set to)."""
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        """The Prefect UI's address."""
        return f"http://127.0.0.1:{self.port}"


def _home() -> Path:
    return Path(os.environ["PREFECT_HOME"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours
        return False
    return True


def _healthy(api_url: str) -> bool:
    return healthy(f"{api_url}/health")


def recorded() -> LocalServer | None:
    """The server ``fedpipe server start`` recorded under ``PREFECT_HOME``, if its process lives."""
    record, pid_file = _home() / RECORD, _home() / PID_FILE
    if not record.is_file() or not pid_file.is_file():
        return None
    try:
        port = int(json.loads(record.read_text())["port"])
        pid = int(pid_file.read_text().strip())
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return LocalServer(port, pid) if _alive(pid) else None


def running_api_url() -> str | None:
    """The API URL of a recorded local server that answers now, else None."""
    server = recorded()
    return server.api_url if server is not None and _healthy(server.api_url) else None


def _prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "prefect", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def start(*, port: int = LOCAL_PORT, timeout: float = 120.0) -> LocalServer:
    """Start the background server on 127.0.0.1:``port`` (or return the one running).

    Raises
    ------
    FedpipeError
        If Prefect refuses (the port is taken) or the server does not answer in time.
    """
    current = recorded()
    if current is not None and _healthy(current.api_url):
        return current
    env = {
        **os.environ,
        "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{port}/api",  # the UI on any port
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    (_home() / PID_FILE).unlink(missing_ok=True)  # a stale file from a killed server
    schema.seed(_home())  # a fresh folder: Prefect's migrations done already
    done = _prefect(
        "server", "start", "--background", "--host", "127.0.0.1", "--port", str(port), env=env
    )
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        raise FedpipeError(
            f"Prefect did not start a server on 127.0.0.1:{port}: "
            f"{said[-1] if said else 'no reason given'}; pick another port with --port"
        )
    (_home() / RECORD).write_text(json.dumps({"port": port}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = recorded()
        if server is not None and _healthy(server.api_url):
            return server
        time.sleep(0.25)
    raise FedpipeError(
        f"the local Prefect server did not answer on port {port} within {timeout:.0f}s; "
        f"see `prefect server start` output, or run `fedpipe server stop` and try again"
    )


def stop() -> bool:
    """Stop the background server (``prefect server stop``); False if none was running."""
    server = recorded()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if server is not None:
        _prefect("server", "stop", env=env)
    (_home() / RECORD).unlink(missing_ok=True)
    return server is not None
