"""The embedded run's temporary Prefect server: started first, stopped cleanly and in time.

Left to itself, Prefect starts its temporary server only when the flow first calls the API,
after fedpipe, torch and MLflow are imported and the sites are written, so the run waits for
both in turn; the server's output goes to the user's terminal, and stopping it at exit
cancels its task-run recorder mid-write (a ``CancelledError`` traceback). Here the CLI
starts the same server (Prefect's own command: uvicorn on ``create_app``, no UI, ephemeral
services) before it imports anything heavy, its output in ``server.log`` under
``PREFECT_HOME``; the flow runs against it (``PREFECT_API_URL``); at the end the CLI waits,
bounded, for the server to record every task run, then stops it.

A CLI killed outright (SIGKILL, the OOM killer) stops nothing: on Linux the kernel sends
the server SIGTERM when the CLI dies (a parent-death signal armed before the server's
command runs), and everywhere the server is recorded in ``temporary-servers/<pid>.json``
beside its log, naming the CLI that owns it; the next CLI to start one stops any whose
owner is gone (:func:`stop_orphans`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

from fl_components.errors import FedpipeError
from ops.servers import schema

PORT_IN_USE = 3  # uvicorn's exit code when its port is taken
LOCAL_PORT = 4200  # `fedpipe server start`'s default port (ops.servers.local)
LOCAL_UI_URL = f"http://127.0.0.1:{LOCAL_PORT}"
RECORDS = "temporary-servers"  # beside server.log: <server pid>.json, naming its owner
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SERVER_APP = "prefect.server.api.server:create_app"


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _site_packages() -> str:
    spec = importlib.util.find_spec("prefect")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise FedpipeError("prefect is not installed in this environment; run `make` first")
    return str(Path(spec.origin).parent.parent)


@dataclass
class TemporaryServer:
    """A Prefect API server on 127.0.0.1 that lives as long as one CLI command."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log: TextIO
    # its database is new and empty (neither seeded from the template nor used before): kept
    # as the template for the next fresh folder (ops.servers.schema) once the server is up
    keep_as_template: bool = False

    @property
    def api_url(self) -> str:
        """The API's base URL (what ``PREFECT_API_URL`` is set to)."""
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls, log_path: Path) -> TemporaryServer:
        """Launch the server process and return at once (see :meth:`wait_ready`)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("a")
        port = _free_port()
        home = schema.prefect_home()
        new = schema.uses_default_database() and not (home / schema.DATABASE).exists()
        seeded = schema.seed(home)  # a fresh folder: its migrations are done already
        server = cls(port, _launch(port, log), log_path, log, new and not seeded)
        server._record()
        return server

    @property
    def _record_path(self) -> Path:
        return self.log_path.parent / RECORDS / f"{self.process.pid}.json"

    def _record(self) -> None:
        """Name this CLI as the server's owner (what :func:`stop_orphans` checks)."""
        self._record_path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": self.process.pid,
            "port": self.port,
            "parent": os.getpid(),
            "parent_started": _started(os.getpid()),
        }
        self._record_path.write_text(json.dumps(record) + "\n")

    def wait_ready(self, *, timeout: float) -> None:
        """Block until the API answers ``/health``.

        Raises
        ------
        FedpipeError
            If the server exits or does not answer within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:  # lost the race for the port: take another
                self._record_path.unlink(missing_ok=True)
                self.port = _free_port()
                self.process = _launch(self.port, self.log)
                self._record()
            elif code is not None:
                raise FedpipeError(
                    f"the temporary Prefect server exited with code {code}; see {self.log_path}"
                )
            if healthy(f"{self.api_url}/health"):
                if self.keep_as_template:  # before any run writes to it
                    schema.snapshot(schema.prefect_home() / schema.DATABASE)
                return
            time.sleep(0.1)
        raise FedpipeError(
            f"the temporary Prefect server did not answer within {timeout:.0f}s "
            f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {self.log_path}"
        )

    def serving(self) -> contextlib.AbstractContextManager[None]:
        """Point Prefect (this process and any worker it starts) at this server.

        Run links (the MLflow run's ``prefect.flow_run_url``) point at the UI of the local
        server, which reads the same database once started (``fedpipe server start``, the
        CLI says so at the end): this server has no UI, and its port is gone after the run.
        """
        return serving_at(self.api_url, ui_url=LOCAL_UI_URL)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Ask the server to shut down (SIGTERM), kill it after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._record_path.unlink(missing_ok=True)
        self.log.close()


@contextlib.contextmanager
def serving_at(api_url: str, *, ui_url: str | None = None) -> Iterator[None]:
    """Point Prefect (this process, and Ray/Dask workers it starts) at ``api_url``.

    ``ui_url``: where run links point (None: the API's own server).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url  # Ray/Dask workers inherit it
    updates: dict[Any, str] = {PREFECT_API_URL: api_url}
    if ui_url is not None:
        updates[PREFECT_UI_URL] = ui_url
    _rebind_event_workers()
    try:
        with temporary_settings(updates=updates):
            yield
    finally:
        _rebind_event_workers()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def _rebind_event_workers() -> None:
    """Flush Prefect's events and log workers and stop them.

    Prefect keeps one events worker per process, bound to the API URL it first saw: after a
    switch of server, the task runs of a later flow in this process would go to the old,
    perhaps stopped, server and never show. Stopped, the next ones start for the server
    Prefect points at now.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=10)
    APILogWorker.drain_all(timeout=10)


@dataclass
class ReusedServer:
    """A server that outlives the run (``fedpipe server start``): nothing to wait for or stop."""

    api_url: str

    def wait_ready(self, *, timeout: float) -> None:
        """It answered already (:func:`ops.servers.local.running_api_url`)."""

    def serving(self) -> contextlib.AbstractContextManager[None]:
        """Point Prefect at it for the run."""
        return serving_at(self.api_url)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Left running for the next run."""


def healthy(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _launch(port: int, log: TextIO) -> subprocess.Popen[bytes]:
    """Prefect's own temporary-server command, its output into ``log``."""
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    command = [
        sys.executable,
        *("-m", "uvicorn", "--app-dir", _site_packages()),
        *("--factory", "prefect.server.api.server:create_app"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--log-level", "error", "--lifespan", "on"),
    ]
    return subprocess.Popen(
        command,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent(os.getpid()),
    )


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that has the kernel SIGTERM the server when ``parent`` dies.

    The signal follows the *thread* that started the server: the CLI starts it from its main
    thread, which lives as long as the CLI. libc is loaded before the fork, so the child
    only calls ``prctl``; a parent gone before the signal was armed is checked after it.
    """
    if not sys.platform.startswith("linux"):
        return None  # elsewhere only stop_orphans covers a killed CLI
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (None: no /proc, or no such pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot; None: no /proc, or no such pid).

    With the pid it names one process: a pid reused by another process starts later.
    """
    fields = _stat(pid)
    return None if fields is None else fields[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` runs (not a zombie) and, if given, started at ``started``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    fields = _stat(pid)
    if fields is None:  # no /proc: os.kill is all there is
        return True
    return fields[0] != "Z" and (started is None or fields[19] == started)


def _is_temporary_server(pid: int, port: int) -> bool:
    """Whether ``pid`` runs this module's server command on ``port`` (not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return _alive(pid, None)  # no /proc: trust the record
    return _SERVER_APP in argv and str(port) in argv


def stop_orphans(records: Path, *, timeout: float = 10.0) -> list[str]:
    """Stop the temporary servers recorded in ``records`` whose owning CLI is gone.

    A record whose server is gone too is removed. Returns one line per server stopped.
    """
    stopped: list[str] = []
    for path in sorted(records.glob("*.json")) if records.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            pid, port, parent = int(record["pid"]), int(record["port"]), int(record["parent"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: a record cut short by a crash
            continue
        if _alive(parent, record.get("parent_started")):
            continue  # its CLI runs: its server is in use
        if _alive(pid, None) and _is_temporary_server(pid, port):
            _terminate(pid, timeout=timeout)
            stopped.append(
                f"stopped a temporary Prefect server left by a killed fedpipe run "
                f"(pid {pid}, port {port}, its run's pid {parent})"
            )
        path.unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, *, timeout: float) -> None:
    """SIGTERM ``pid``, SIGKILL after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid, None):
            with contextlib.suppress(ChildProcessError):  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        if _alive(pid, None):
            os.kill(pid, signal.SIGKILL)


def wait_recorded(flow_run_id: str, *, timeout: float, poll: float = 0.25) -> bool:
    """Wait until the server has recorded the flow run's task runs, all in a final state.

    Task runs reach a Prefect 3 server as events that its task-run recorder writes in
    batches; done when two polls in a row count the same number of task runs, all final.
    Returns False if ``timeout`` passed first (the caller stops the server regardless).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    deadline = time.monotonic() + timeout
    seen = -1
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            task_runs: list[Any] = []
            while True:  # the API returns at most 200 a page
                page = client.read_task_runs(flow_run_filter=runs, limit=200, offset=len(task_runs))
                task_runs += page
                if len(page) < 200:
                    break
            done = all(t.state is not None and t.state.is_final() for t in task_runs)
            if done and len(task_runs) == seen:
                return True
            seen = len(task_runs) if done else -1
            time.sleep(poll)
    return False


def flush_and_wait(flow_run_id: str, *, timeout: float) -> bool:
    """Send this process's last events and logs, then :func:`wait_recorded` (bounded)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    deadline = time.monotonic() + timeout
    EventsWorker.drain_all(timeout=timeout / 3)
    APILogWorker.drain_all(timeout=timeout / 3)
    if not flow_run_id:
        return False
    return wait_recorded(flow_run_id, timeout=max(1.0, deadline - time.monotonic()))
