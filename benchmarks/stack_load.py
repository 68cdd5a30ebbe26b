"""The one-machine stack under load: lock errors and 5xx answers per session.

    .venv/bin/python -m benchmarks.stack_load --database sqlite --minutes 30
    .venv/bin/python -m benchmarks.stack_load --database default --minutes 30

One session: ``fedpipe up`` a fresh 3-site stack (the default federation, digits, secure
aggregation), then for ``--minutes``:

- **the UI**: a client that requests what an open Prefect UI tab polls (the runs list and
  its counts, the run history, work pools and their workers, deployments, the flow run on
  show with its task runs and logs) every ``--poll`` seconds, with no retry: a 5xx here is
  what the user sees as "Something went wrong";
- **the Run button**: one ``POST /deployments/{id}/create_flow_run`` with the deployment's
  own parameters every ``--run-every`` seconds, no retry either;
- the sites' and the coordinator's workers, with their heartbeats, serving those runs.

Counted: 5xx answers to the UI and the Run button, failed run creations, the runs' final
states, and in the stack's logs the "database is locked" errors and the 503s its own
clients retried. The figures go to ``benchmarks/results/stack_load.json`` (one entry per
database, the latest session of each), and ``benchmarks.report`` renders them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "stack_load.json"
FEDPIPE = [sys.executable, "-m", "ops.cli.main"]
# one per error: the last line of its (chained) traceback
LOCKED = re.compile(r"^sqlalchemy\.exc\.OperationalError: .*database is locked", re.MULTILINE)
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Counter:
    """Requests and their 5xx answers, by kind (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}
        self.errors: list[str] = []

    def add(self, kind: str, status: int | str) -> None:
        with self.lock:
            entry = self.counts.setdefault(kind, {"requests": 0, "5xx": 0, "other_errors": 0})
            entry["requests"] += 1
            if isinstance(status, int) and status >= 500:
                entry["5xx"] += 1
                self.errors.append(f"{kind}: HTTP {status}")
            elif not isinstance(status, int) or status >= 400:
                entry["other_errors"] += 1
                self.errors.append(f"{kind}: {status}")


def _call(
    client: httpx.Client, counter: Counter, kind: str, method: str, url: str, **kw: Any
) -> httpx.Response | None:
    try:
        response = client.request(method, url, **kw)
    except httpx.HTTPError as error:
        counter.add(kind, type(error).__name__)
        return None
    counter.add(kind, response.status_code)
    return response


def _ui_tab(api: str, auth: Any, counter: Counter, stop: threading.Event, poll: float) -> None:
    """What an open UI tab asks, each ``poll`` seconds."""
    flow_runs = {"sort": "START_TIME_DESC", "limit": 10, "offset": 0}
    with httpx.Client(auth=auth, timeout=60) as client:
        while not stop.is_set():
            shown = _call(client, counter, "ui", "POST", f"{api}/flow_runs/filter", json=flow_runs)
            for method, path, body in (
                ("POST", "/flow_runs/count", {}),
                ("POST", "/task_runs/count", {}),
                ("POST", "/ui/flow_runs/history", _history()),
                ("POST", "/work_pools/filter", {}),
                ("POST", "/deployments/filter", {"limit": 10}),
                ("POST", "/flows/filter", {"limit": 10}),
            ):
                _call(client, counter, "ui", method, api + path, json=body)
            runs = shown.json() if shown is not None and shown.status_code == 200 else []
            if runs:  # the run on show: its task runs and logs
                run = runs[0]["id"]
                task_filter = {"flow_runs": {"id": {"any_": [run]}}, "limit": 50}
                _call(client, counter, "ui", "POST", f"{api}/task_runs/filter", json=task_filter)
                log_filter = {"logs": {"flow_run_id": {"any_": [run]}}, "limit": 50}
                _call(client, counter, "ui", "POST", f"{api}/logs/filter", json=log_filter)
            stop.wait(poll)


def _history() -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "history_start": (now - dt.timedelta(hours=1)).isoformat(),
        "history_end": now.isoformat(),
        "history_interval_seconds": 300,
    }


def _federation(root: Path) -> Path:
    config = yaml.safe_load((REPO / "infra" / "federation.yaml").read_text())
    config["name"] = "load"
    config["data"]["sites_dir"] = str(root / "sites")
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _load() -> float:
    return os.getloadavg()[0]


def session(database: str, minutes: float, run_every: float, poll: float) -> dict[str, Any]:
    """One stack, ``minutes`` of UI polling and Run-button presses; its figures."""
    from ops.stack.credentials import prefect_auth

    root = Path(tempfile.mkdtemp(prefix=f"fedpipe-load-{database}-"))
    root.chmod(0o711)  # run as root, PostgreSQL runs as `postgres`: it must enter the folder
    state = root / "state"
    args = ["--state-dir", str(state), "--mlflow-dir", str(root / "mlflow")]
    args += ["--prefect-port", "0", "--mlflow-port", "0", "--config", str(_federation(root))]
    if database != "default":
        args += ["--database", database]
    started = time.monotonic()
    up = subprocess.run([*FEDPIPE, "up", *args], capture_output=True, text=True, check=False)
    if up.returncode != 0:
        raise SystemExit(f"fedpipe up failed:\n{up.stdout}{up.stderr}")
    up_seconds = time.monotonic() - started
    record = json.loads((state / "stack.json").read_text())
    api = record["prefect_api_url"]
    auth = prefect_auth(state)
    counter, stop = Counter(), threading.Event()
    created: list[str] = []
    loads: list[float] = []
    tab = threading.Thread(target=_ui_tab, args=(api, auth, counter, stop, poll), daemon=True)
    try:
        with httpx.Client(auth=auth, timeout=60) as client:
            deployment = client.get(f"{api}/deployments/name/federated-training/federated-training")
            deployment.raise_for_status()
            deployment_id = deployment.json()["id"]
            tab.start()
            end = time.monotonic() + minutes * 60
            next_run = time.monotonic()
            while time.monotonic() < end:
                if time.monotonic() >= next_run:
                    response = _call(
                        client, counter, "run_button", "POST",
                        f"{api}/deployments/{deployment_id}/create_flow_run", json={},
                    )  # fmt: skip
                    if response is not None and response.status_code == 201:
                        created.append(response.json()["id"])
                    next_run += run_every
                    print(
                        f"[{database}] {(time.monotonic() - started) / 60:5.1f} min: "
                        f"{len(created)} run(s), load {_load():.1f}, {counter.counts}",
                        flush=True,
                    )
                loads.append(_load())
                time.sleep(5)
            stop.set()
            tab.join(timeout=120)
            states = _final_states(client, api, created)
    finally:
        stop.set()
        subprocess.run(
            [*FEDPIPE, "down", "--state-dir", str(state)], capture_output=True, check=False
        )
    logs = _log_counts(state / "logs")
    return {
        "database": record.get("database", "sqlite"),
        "minutes": minutes,
        "sites": len(record["sites"]),
        "up_seconds": round(up_seconds, 1),
        "ui_requests": counter.counts.get("ui", {}).get("requests", 0),
        "ui_5xx": counter.counts.get("ui", {}).get("5xx", 0),
        "runs_created": len(created),
        "run_button_presses": counter.counts.get("run_button", {}).get("requests", 0),
        "run_button_5xx": counter.counts.get("run_button", {}).get("5xx", 0),
        "runs_completed": states.count("COMPLETED"),
        "runs_not_completed": len(states) - states.count("COMPLETED"),
        "database_locked_in_logs": logs["locked"],
        "retried_503_in_logs": logs["retried_503"],
        "load_mean": round(sum(loads) / max(len(loads), 1), 2),
        "load_max": round(max(loads, default=0.0), 2),
        "first_errors": counter.errors[:5],
    }


def _final_states(client: httpx.Client, api: str, runs: list[str]) -> list[str]:
    """Each created run's state, after waiting up to 10 minutes for the last ones to end."""
    deadline = time.monotonic() + 600
    while True:
        states = []
        for run in runs:
            response = client.get(f"{api}/flow_runs/{run}")
            states.append(response.json()["state"]["type"] if response.status_code == 200 else "?")
        if all(s in FINAL for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(10)


def _log_counts(logs: Path) -> dict[str, int]:
    locked = retried = 0
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        locked += len(LOCKED.findall(text))
        retried += sum(1 for line in text.splitlines() if "retry" in line.lower() and "503" in line)
    return {"locked": locked, "retried_503": retried}


def _stop_on_term(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # runs the session's `fedpipe down`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", default="default", help="sqlite, postgresql or default")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--run-every", type=float, default=180.0, help="seconds between runs")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between UI polls")
    parser.add_argument("--label", help="the row's name (default: the database and how chosen)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop_on_term)
    figures = session(options.database, options.minutes, options.run_every, options.poll)
    print(json.dumps(figures, indent=2))
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    sessions = {row["label"]: row for row in old.get("sessions", [])}
    label = options.label or (
        f"{figures['database']} ({'default' if options.database == 'default' else 'chosen'})"
    )
    sessions[label] = {"label": label, **figures}
    import prefect

    RESULTS.write_text(
        json.dumps(
            {
                "title": "The one-machine stack under load: lock errors and 5xx in 30 minutes",
                "command": "python -m benchmarks.stack_load --database {sqlite,default} "
                f"--minutes {options.minutes:g} --run-every {options.run_every:g} "
                f"--poll {options.poll:g}",
                "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
                "versions": {
                    "python": sys.version.split()[0],
                    "prefect": prefect.__version__,
                    "platform": platform.platform(),
                },
                "date": dt.date.today().isoformat(),
                "notes": [
                    "One session per database: `fedpipe up` of the default 3-site federation, "
                    "an emulated open UI tab polling every --poll seconds and a Run-button "
                    "press every --run-every seconds, neither retrying; the workers' "
                    "heartbeats every 5 s.",
                    "ui_5xx and run_button_5xx are what a user sees as 'Something went "
                    "wrong'; database_locked_in_logs counts SQLite lock errors in the stack's "
                    "logs; retried_503_in_logs the 503s the stack's own clients retried.",
                ],
                "sessions": list(sessions.values()),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
