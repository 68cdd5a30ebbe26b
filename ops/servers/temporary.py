"""The embedded run's temporary Prefect server: started first, stopped cleanly and in time.

Left to itself, Prefect starts its temporary server only when the flow first calls the API,
after fedpipe, torch and MLflow are imported and the sites are written, so the run waits for
both in turn; the server's output goes to the user's terminal, and stopping it at exit
cancels its task-run recorder mid-write (a ``CancelledError`` traceback). Here the CLI
starts the same server (Prefect's own command: uvicorn on ``create_app``, no UI, ephemeral
services) before it imports anything heavy, its output in ``server.log`` under
``PREFECT_HOME``; the flow runs against it (``PREFECT_API_URL``); at the end the CLI waits,
bounded, for the server to record every task run, then stops it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fl_components.errors import FedpipeError

PORT_IN_USE = 3  # uvicorn's exit code when its port is taken


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
        return cls(port, _launch(port, log), log_path, log)

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
                self.port = _free_port()
                self.process = _launch(self.port, self.log)
            elif code is not None:
                raise FedpipeError(
                    f"the temporary Prefect server exited with code {code}; see {self.log_path}"
                )
            if healthy(f"{self.api_url}/health"):
                return
            time.sleep(0.1)
        raise FedpipeError(
            f"the temporary Prefect server did not answer within {timeout:.0f}s "
            f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {self.log_path}"
        )

    def serving(self) -> contextlib.AbstractContextManager[None]:
        """Point Prefect (this process and any worker it starts) at this server."""
        return serving_at(self.api_url)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Ask the server to shut down (SIGTERM), kill it after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@contextlib.contextmanager
def serving_at(api_url: str) -> Iterator[None]:
    """Point Prefect (this process, and Ray/Dask workers it starts) at ``api_url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url  # Ray/Dask workers inherit it
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


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
        command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )


def wait_recorded(flow_run_id: str, *, timeout: float, poll: float = 0.25) -> bool:
    """Wait until the server has recorded the flow run's task runs, all in a final state.

    Task runs reach a Prefect 3 server as events that its task-run recorder writes in
    batches; done when two polls in a row count the same number of task runs, all final.
    Returns False if ``timeout`` passed first (the caller stops the server regardless).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
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
