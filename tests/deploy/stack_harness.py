"""The real local stack for the deploy tests: `fedpipe up` / `down` of a 3-site stack on
127.0.0.1 (free ports, a temporary folder), and the Prefect and MLflow look-ups the tests share.

One stack serves the whole session (``tests/deploy/conftest.py``): tests/deploy/test_faults.py
and tests/deploy/test_stack.py run on it in that order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
# this checkout's CLI, run from it (an installed `fedpipe` script may be another checkout's)
FEDPIPE = [sys.executable, "-m", "ops.cli.main"]
SITES = ("north", "south", "east")
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SHARED: dict[str, Any] = {}
# the stack the session's tests talk to: its Prefect API's basic auth (set by running_stack)
_AUTH: dict[str, httpx.BasicAuth] = {}
# what a CLI command must find on its own (in the state folder), not inherit from the tests
_CREDENTIAL_ENV = (
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def _api(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One Prefect REST call, retried on 502/503/504 as Prefect's own client does: an
    SQLite-backed server under load answers 503 when its database is briefly locked."""
    kwargs.setdefault("auth", _AUTH.get("prefect"))
    for delay in (1, 2, 4, 8):
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code not in (502, 503, 504):
            return response
        time.sleep(delay)
    return httpx.request(method, url, timeout=30, **kwargs)


def _api_get(url: str, **kwargs: Any) -> httpx.Response:
    return _api("GET", url, **kwargs)


def _api_post(url: str, **kwargs: Any) -> httpx.Response:
    return _api("POST", url, **kwargs)


def _fedpipe(
    *args: str, timeout: float, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run this checkout's CLI; it finds the stack's credentials in its state folder."""
    env = {k: v for k, v in os.environ.items() if k not in _CREDENTIAL_ENV}
    env.update(env_extra or {})
    return subprocess.run(
        [*FEDPIPE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@contextmanager
def running_stack(
    root: Path,
    *,
    name: str,
    extra_args: tuple[str, ...] = ("--database", "sqlite"),
    shared: dict[str, Any] | None = None,
    federation_update: dict[str, Any] | None = None,
    env_extra: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """`fedpipe up` a 3-site stack under ``root`` and yield its record; on exit `fedpipe
    down` and check that nothing it started is left (a worker a test killed, named in
    ``shared["killed_worker"]``, must be reported as already stopped). SQLite unless
    ``extra_args`` say otherwise: the session's stack is the same as root or as a user."""
    from ops.stack.lifecycle import tagged_processes

    federation = {
        "name": name,
        "rounds": 2,
        "sites": [{"name": s} for s in SITES],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"dataset": "digits", "sites_dir": str(root / "sites")},
        "model": {"kind": "mlp", "hidden": [16]},
        "training": {"epochs": 1, "batch_size": 64},
        "deployment": {"timeout_seconds": 120, "poll_interval": 0.3},
        "seed": 3,
    }
    federation.update(federation_update or {})
    federation = {key: value for key, value in federation.items() if value is not None}
    config_file = root / "federation.yaml"
    config_file.write_text(yaml.safe_dump(federation))
    state = root / "state"
    args = ["--state-dir", str(state), "--mlflow-dir", str(root / "mlflow")]
    result = _fedpipe(
        "up", "--config", str(config_file), *args, "--prefect-port", "0", "--mlflow-port", "0",
        *extra_args,
        timeout=900, env_extra=env_extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((state / "stack.json").read_text())
    from ops.stack.credentials import prefect_auth, stack_client_env

    # this process talks to the stack as its coordinator: credentials from the state folder;
    # a stack started inside another's session (the PostgreSQL one) gives the outer one's
    # back when it stops
    outer = _AUTH.get("prefect")
    auth = prefect_auth(state)
    if auth is not None:
        _AUTH["prefect"] = auth
    try:
        with stack_client_env(state):
            yield record
    finally:
        if outer is not None:
            _AUTH["prefect"] = outer
        else:
            _AUTH.pop("prefect", None)
        down = _fedpipe("down", "--state-dir", str(state), timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "no process left" in down.stdout
        if shared and "killed_worker" in shared:
            assert f"{shared['killed_worker']}: already stopped" in down.stdout
        assert not tagged_processes(state.resolve())
        for process in record["processes"]:
            assert not Path(f"/proc/{process['pid']}").exists() or (
                Path(f"/proc/{process['pid']}/stat").read_text().split(") ")[1][0] == "Z"
            )


def _wait_flow_run(api: str, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api_get(f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in FINAL_STATES:
            return dict(run)
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout}s")


def _assert_one_participant_run_per_site_and_round(
    api: str, run_id: str, *, rounds: int, crashed: Collection[tuple[str, int]] = ()
) -> None:
    """Prefect: one participant run per site per round, each on its own pool, completed.

    A round's ``train`` run also evaluates the model it receives (the previous round's,
    parameter ``evaluate_round``); one ``evaluate`` run per site follows the last round.
    ``crashed``: the (site, round) train runs a fault test let crash (and only those).
    """
    children = _api_post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    seen: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for child in children:
        params = job_message(child)
        if params.get("run_id") == run_id:
            seen.setdefault((params["site"], params["round"], params["stage"]), []).append(child)
    stages = [(r, "train", r - 1) for r in range(1, rounds + 1)] + [(rounds, "evaluate", None)]
    assert set(seen) == {(site, r, stage) for site in SITES for r, stage, _ in stages}
    for site in SITES:
        for r, stage, evaluates in stages:
            (match,) = seen[(site, r, stage)]
            assert job_message(match).get("evaluate_round") == evaluates
            assert match["work_pool_name"] == f"fedpipe-{site}"
            allowed = "CRASHED" if (site, r) in crashed and stage == "train" else "COMPLETED"
            assert match["state_type"] == allowed, (site, r, stage, match["state_type"])


def _assert_every_site_served_every_round(api: str, run_id: str, *, rounds: int) -> None:
    """Prefect: each site ran each round's stages (whatever they are: secure aggregation
    adds its own) on its own pool, and every such run completed."""
    children = _api_post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    ours = [child for child in children if job_message(child).get("run_id") == run_id]
    served = {(job_message(c)["site"], job_message(c)["round"]) for c in ours}
    assert served >= {(site, r) for site in SITES for r in range(1, rounds + 1)}, served
    for child in ours:
        assert child["work_pool_name"] == f"fedpipe-{job_message(child)['site']}"
        assert child["state_type"] == "COMPLETED", child["name"]


def _assert_metrics_at_each_round(client: Any, run_id: str, *, rounds: int) -> list[Any]:
    """MLflow: global and per-site accuracy at step = round (0: the initial model).

    Returns the ``global/accuracy`` history.
    """
    history = client.get_metric_history(run_id, "global/accuracy")
    assert sorted(m.step for m in history) == list(range(rounds + 1))
    for site in SITES:
        steps = {m.step for m in client.get_metric_history(run_id, f"site/{site}/accuracy")}
        assert steps == set(range(rounds + 1)), site
    return list(history)


def _mlflow_run_for(client: Any, experiment: str, flow_run_id: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert len(runs) == 1
    return runs[0]


def deployed_config(stack: dict[str, Any], **changes: Any) -> Any:
    """The stack's deployed federation (its first 3 sites), with ``changes`` applied."""
    from fl_components.config import FederationConfig

    raw = json.loads((Path(stack["root"]) / "federation.json").read_text())
    raw["sites"] = [s for s in raw["sites"] if s["name"] in SITES]  # not a site enrolled later
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return FederationConfig.model_validate(raw)


@contextmanager
def sites_serving(stack: dict[str, Any], federation: str, *, rounds: int = 1) -> Iterator[None]:
    """The stack's sites serve ``federation`` (runs of up to ``rounds`` rounds) while the
    block runs; restored afterwards.

    A site serves the one federation its enrolment and policy name, and runs no longer than
    its policy's rounds.max_per_run (a job asking for more is refused); a test that runs
    under a federation name of its own (its own MLflow experiment) has each site's steward
    enrol the site in it for the test, as `site init` for that federation would.
    """
    from fl_components.site.enrolment import enrolment_path
    from fl_components.site.policy import policy_path

    saved: dict[Path, str] = {}
    for site in SITES:
        folder = Path(stack["sites"][site]["data"])
        enrolment, policy = enrolment_path(folder), policy_path(folder)
        saved[enrolment], saved[policy] = enrolment.read_text(), policy.read_text()
        record = json.loads(saved[enrolment])
        enrolment.write_text(json.dumps({**record, "federation": federation}, indent=2) + "\n")
        rules = yaml.safe_load(saved[policy])
        limits = rules.get("rounds") or {}
        limits["max_per_run"] = max(int(limits.get("max_per_run", 1)), rounds)
        rules.update(federation=federation, rounds=limits)
        policy.write_text(yaml.safe_dump(rules, sort_keys=False))
    try:
        yield
    finally:
        for path, text in saved.items():
            path.write_text(text)


def run_coordinator(stack: dict[str, Any], config: Any) -> Any:
    """Run the coordinator flow in this process against the stack's server; its summary."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.federated_training import federated_training

    with (
        temporary_settings(updates={PREFECT_API_URL: stack["prefect_api_url"]}),
        sites_serving(stack, config.name, rounds=config.rounds),
    ):
        try:
            return federated_training(config)
        finally:
            # flush this process's events and logs to the stack's server while it is up: a
            # worker left pointing at a stopped server would hang the session's teardown
            EventsWorker.drain_all(timeout=30)
            APILogWorker.drain_all(timeout=30)


def participant_runs(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    """The participant flow runs a coordinator flow run created (and any with its run id)."""
    children = _api_post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    return [c for c in children if job_message(c).get("run_id") == flow_run_id]


def job_message(flow_run: dict[str, Any]) -> dict[str, Any]:
    """The site job a participant flow run was given (the message inside the signed job)."""
    job = flow_run["parameters"].get("job") or {}
    return dict(job.get("message") or {})


def create_deployed_run(stack: dict[str, Any], partial: dict[str, Any]) -> str:
    """Post ``partial`` to the federated-training deployment, as a script or the UI's Run
    button does; return the new flow run's id."""
    api = stack["prefect_api_url"]
    deployment = _api_get(f"{api}/deployments/name/federated-training/federated-training").json()
    created = _api_post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": partial}},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def wait_dispatched(api: str, run_id: str, *, timeout: float = 600) -> None:
    """Wait until the run's first round is out at the sites (a participant run exists)."""
    deadline = time.monotonic() + timeout
    while not participant_runs(api, run_id):
        assert time.monotonic() < deadline, f"the run dispatched nothing in {timeout:.0f} s"
        time.sleep(0.5)
