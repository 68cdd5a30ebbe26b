"""The local stack's processes: spawn, watch and stop them, each in its own process group.

Every process ``fedpipe up`` starts is tagged in its environment (``FEDPIPE_STACK``) and
recorded in ``stack.json``; :func:`down` stops exactly those groups and checks none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ops.stack.credentials import StackCredentials, load_credentials, prefect_client_env
from ops.stack.state import (
    REPO,
    RESULTS_BLOCK,
    STACK_TAG_ENV,
    WORKER_ENV,
    StackError,
    StackPaths,
    load_record,
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# the host's own size settings, handed to every process the stack starts (the one-machine
# stack's operator is every site's operator too): a model above ~60M parameters needs both
PASSED_SETTINGS = ("FEDPIPE_MAX_PAYLOAD_BYTES", "FEDPIPE_ANSWER_FILE_BYTES")


def _clean_env(root: Path) -> dict[str, str]:
    """The current environment without Prefect/MLflow/fedpipe settings, tagged.

    Of fedpipe's settings only :data:`PASSED_SETTINGS` pass.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k in PASSED_SETTINGS or not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    env[STACK_TAG_ENV] = str(root)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["GIT_PYTHON_REFRESH"] = "quiet"
    return env


def _spawn(name: str, command: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a group by `down`
        )
    return {"name": name, "pid": process.pid, "pgid": process.pid, "log": str(log_path)}


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_http(url: str, *, process: dict[str, Any], timeout: float, what: str) -> None:
    """Wait until ``url`` answers 200 (a health probe: answered without credentials)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_members(process["pgid"]):
            raise StackError(
                f"{what} exited during start; its log {process['log']} ends:\n"
                f"{_tail(process['log'])}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise StackError(f"{what} not ready at {url} after {timeout:.0f}s; see {process['log']}")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a live process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _proc_stat(int(entry.name))
            if info is not None and info[1] == pgid and info[0] != "Z":
                members.append(int(entry.name))
    return members


def tagged_processes(root: Path) -> list[int]:
    """Live processes whose environment carries this stack's tag."""
    tag = f"{STACK_TAG_ENV}={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        info = _proc_stat(int(entry.name))
        if tag in environ.split(b"\0") and info is not None and info[0] != "Z":
            found.append(int(entry.name))
    return found


def _worker_env(
    base: dict[str, str],
    api_url: str,
    home: Path,
    credentials: StackCredentials | None = None,
) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", os.defpath)])
    return {
        **base,
        "PATH": path,  # the job command `fedpipe-site-exec` is this environment's
        # flow runs import this checkout's code, whatever else the environment has installed
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])),
        **WORKER_ENV,
        "PREFECT_API_URL": api_url,
        **prefect_client_env(credentials),  # the API's auth string: environment only
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"local-file-system/{RESULTS_BLOCK}",
    }


def _wait_pools_ready(
    api_url: str, pools: list[str], timeout: float, auth: httpx.Auth | None = None
) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(pools)
    while waiting and time.monotonic() < deadline:
        for pool in sorted(waiting):
            response = httpx.get(f"{api_url}/work_pools/{pool}", timeout=5, auth=auth)
            if response.status_code == 200 and response.json().get("status") == "READY":
                waiting.discard(pool)
        time.sleep(0.3)
    if waiting:
        raise StackError(f"no worker came online for pool(s) {sorted(waiting)} in {timeout:.0f}s")


def server_environment(
    base: dict[str, str],
    paths: StackPaths,
    *,
    api_url: str,
    database_url: str | None,
) -> dict[str, str]:
    """The Prefect server's environment: its database, and the API address its UI uses.

    The UI asks ``/ui-settings`` where the API is; unset, the server answers with port
    4200 whatever port it serves, and the UI then shows "Can't connect to Server API" (or
    another server's runs).

    SQLite takes one writer at a time: the server's API and its services (a second
    process) queue on its lock. Prefect already sets WAL and a 60 s busy timeout; what is
    set here is a longer statement timeout (10 s by default) and event batches ten times
    larger (20 by default), so that fewer, longer write transactions compete for the lock.
    Clients retry a 503 (five times, with backoff); PostgreSQL (``database_url``) has no
    such lock.

    With the stack's credentials (``credentials.json`` under its state folder), the API
    asks every request but its health probe for the stack's basic-auth string, given here
    through the environment only.
    """
    credentials = load_credentials(paths.root)
    env = {
        **base,
        "PREFECT_HOME": str(paths.root / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url
        or f"sqlite+aiosqlite:///{paths.root / 'prefect' / 'prefect.db'}",
        "PREFECT_SERVER_UI_API_URL": api_url,
    }
    if credentials is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = credentials.prefect_auth_string
        env.update(prefect_client_env(credentials))  # the server's own services' client
    if database_url is None:
        env["PREFECT_SERVER_DATABASE_TIMEOUT"] = "60"
        env["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE"] = "200"
    return env


def down(*, root: Path, grace: float = 10.0) -> list[str]:
    """Stop exactly the process groups ``up`` recorded; verify none (and no tagged one) is left.

    Returns
    -------
    list[str]
        One line per stopped process group.

    Raises
    ------
    StackError
        If a process survives SIGKILL.
    """
    root = root.resolve()
    record = load_record(root)
    lines = []
    groups = [p for p in record["processes"] if _group_members(p["pgid"])]
    for process in groups:  # workers first, servers last: reverse start order
        try:
            os.killpg(process["pgid"], _stop_signal(process))
        except ProcessLookupError:
            continue
    time.sleep(1.0)
    for process in groups:  # a Prefect worker ignores its first SIGTERM: send a second
        with contextlib.suppress(ProcessLookupError):
            if _group_members(process["pgid"]):
                os.killpg(process["pgid"], _stop_signal(process))
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_members(p["pgid"]) for p in groups):
        time.sleep(0.2)
    for process in groups:
        if _group_members(process["pgid"]):
            with contextlib.suppress(ProcessLookupError):  # it may exit just now
                os.killpg(process["pgid"], signal.SIGKILL)
            lines.append(f"{process['name']}: killed (pgid {process['pgid']}, ignored SIGTERM)")
        else:
            lines.append(f"{process['name']}: stopped (pgid {process['pgid']})")
    for process in record["processes"]:  # e.g. a worker that crashed or was killed
        if process not in groups:
            lines.append(f"{process['name']}: already stopped (pgid {process['pgid']})")
    for pid in tagged_processes(root):  # anything that left its group
        try:
            os.kill(pid, signal.SIGKILL)
            lines.append(f"stray process {pid}: killed")
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    left = [p for p in record["processes"] if _group_members(p["pgid"])] or tagged_processes(root)
    if left:
        raise StackError(f"processes still running after down: {left}")
    lines += remove_stale_sockets(record)
    record["processes"] = []
    (root / "stack.json").write_text(json.dumps(record, indent=2) + "\n")
    return lines


def _stop_signal(process: dict[str, Any]) -> signal.Signals:
    """How a recorded process is asked to stop: SIGTERM unless its record names another.

    PostgreSQL's fast shutdown is SIGINT; its SIGTERM waits for every client to leave.
    """
    return signal.Signals[process.get("stop_signal", "SIGTERM")]


def remove_stale_sockets(record: dict[str, Any]) -> list[str]:
    """Remove the executor sockets a killed worker left behind (a stopped one removes its own)."""
    lines = []
    for site, entry in record["sites"].items():
        path = Path(entry["executor"]) if entry.get("executor") else None
        if path is not None and path.is_socket():
            path.unlink(missing_ok=True)
            lines.append(f"site {site}: removed stale executor socket {path}")
    return lines
