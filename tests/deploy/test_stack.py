"""End to end on 127.0.0.1: `fedpipe up` with 3 sites, a run from the UI's Run button,
MLflow and Prefect checked, a champion run whose coordinator never opens site data, a site
enrolled with `fedpipe site init`, `fedpipe doctor` on a healthy stack and on a dead worker
whose site drops out, `down`.

One stack serves the session (tests/deploy/conftest.py, about 35 s to start); the tests run
in file order.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.stack_harness import (
    SHARED,
    SITES,
    _api_get,
    _api_post,
    _assert_metrics_at_each_round,
    _assert_one_participant_run_per_site_and_round,
    _fedpipe,
    _mlflow_run_for,
    _wait_flow_run,
    create_deployed_run,
    job_message,
    running_stack,
    sites_serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["running_stack"]  # tests/deploy/test_stack_postgres.py imports it from here


def test_ui_settings_point_at_the_started_server(stack: dict[str, Any]) -> None:
    """The UI asks /ui-settings where the API is: the server this stack started (port 0
    picked a free one), not the default 4200."""
    settings = _api_get(f"{stack['prefect_ui_url']}/ui-settings")

    assert settings.status_code == 200, settings.text
    assert settings.json()["api_url"] == stack["prefect_api_url"]
    assert not stack["prefect_api_url"].endswith(":4200/api")


def test_status_shows_every_process_and_pool(stack: dict[str, Any]) -> None:
    from ops.stack.lifecycle import status

    # a pool reads READY once its worker's heartbeat is in: after the fault tests restarted
    # the server, that is up to a heartbeat (and a loaded machine) later
    deadline = time.monotonic() + 90
    report = status(root=Path(stack["root"]))
    while not all(v == "READY" for v in report["pools"].values()) and time.monotonic() < deadline:
        time.sleep(2)
        report = status(root=Path(stack["root"]))
    assert report["prefect_healthy"] and report["mlflow_healthy"]
    assert all(p["running"] for p in report["processes"])
    assert {f"fedpipe-{s}" for s in SITES} <= set(report["pools"])
    assert all(v == "READY" for v in report["pools"].values()), report["pools"]
    assert report["executors"] == dict.fromkeys(SITES, "warm")


def test_doctor_finds_a_healthy_stack(stack: dict[str, Any]) -> None:
    """`fedpipe doctor` on the stack just started: every check passes, exit 0."""
    from ops.doctor import diagnose

    state = Path(stack["root"])
    checks = diagnose(state_dir=state)
    assert [c for c in checks if not c.ok] == []
    names = {c.name for c in checks}
    assert {"prefect api", "prefect ui", "mlflow"} <= names
    for site in SITES:
        assert {f"site {site}: {what}" for what in ("worker", "keys", "data", "budget")} <= names

    shown = _fedpipe("doctor", "--state-dir", str(state), timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "checks passed" in shown.stdout and "Traceback" not in shown.stdout + shown.stderr


def test_run_button_trains_on_site_pools_and_tracks(stack: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    deployment = _api_get(f"{api}/deployments/name/federated-training/federated-training").json()
    assert "config" in deployment["parameter_openapi_schema"]["properties"]  # the UI form
    assert deployment["schedules"] and not deployment["schedules"][0]["active"]
    config = deployment["parameters"]["config"]
    assert config["backend"] == "work-pool"

    bad = _api_post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": {**config, "rounds": 0}}},
    )
    assert bad.status_code == 409 and "rounds" in bad.text

    started = time.perf_counter()
    created = _api_post(  # what the UI's Run button sends
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": {**config, "rounds": 2, "init_from": "fresh"}}},
    )
    assert created.status_code == 201, created.text
    run = _wait_flow_run(api, created.json()["id"], timeout=400)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    SHARED["first_seconds"] = time.perf_counter() - started

    _assert_one_participant_run_per_site_and_round(api, run["id"], rounds=2)

    # each ran in a child of the site's warm executor, none started cold
    for site in SITES:
        log = (Path(stack["root"]) / "logs" / f"worker-{site}.log").read_text()
        assert len(re.findall(r"started in child \d+", log)) >= 3, site
        assert "starting the flow run cold" not in log, site

    # MLflow: metrics at step = round, the flow run id tag, the registered model and alias
    client = MlflowClient(stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, "e2e-fed", run["id"])
    history = _assert_metrics_at_each_round(client, mlrun.info.run_id, rounds=2)
    assert mlrun.data.tags["fedpipe.backend"] == "work-pool"
    model = client.get_registered_model("e2e-fed")
    version = mlrun.data.tags["fedpipe.model_version"]
    assert model.aliases["champion"] == version
    SHARED["champion_accuracy"] = max(history, key=lambda m: m.step).value
    SHARED["champion_version"] = version


def test_a_scripted_run_with_some_fields_keeps_the_deployment(stack: dict[str, Any]) -> None:
    """A script posts a few config fields: they are merged into the deployment's config
    (work-pool backend, the stack's MLflow), never the model's defaults (backend local, a
    local SQLite store); a run asking for another backend is refused. Runs are named."""
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    partial = {  # what a script posts from a file like infra/federation.yaml, rounds changed
        "name": "e2e-fed",
        "rounds": 1,
        "init_from": "fresh",
        "sites": [{"name": s} for s in SITES],
        "tracking": {"register_model": False},
    }
    run = _wait_flow_run(api, create_deployed_run(stack, partial), timeout=900)

    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert re.fullmatch(r"e2e-fed-fedavg-\d{8}-\d{6}", run["name"]), run["name"]
    client = MlflowClient(stack["mlflow_url"])  # the stack's server, not a hidden file
    mlrun = _mlflow_run_for(client, "e2e-fed", run["id"])
    assert mlrun.data.tags["fedpipe.backend"] == "work-pool"
    assert mlrun.data.params["rounds"] == "1"
    assert mlrun.data.params["tracking.tracking_uri"] == stack["mlflow_url"]
    children = _api_post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    names = [c["name"] for c in children if job_message(c).get("run_id") == run["id"]]
    assert names and all(n.endswith(f"-{run['id'][:8]}") for n in names), names
    assert f"north-r1-train-{run['id'][:8]}" in names

    local = create_deployed_run(stack, {"backend": "local", "rounds": 1})
    refused = _wait_flow_run(api, local, timeout=600)
    assert refused["state"]["type"] == "FAILED"
    assert "this deployment runs on backend 'work-pool'" in refused["state"]["message"]


def test_champion_run_never_opens_site_data(stack: dict[str, Any]) -> None:
    """A scheduled-style run (init_from=champion) with the coordinator in this process,
    every file it opens audited: no path lies in a site's data folder, and it succeeds."""
    if "champion_accuracy" not in SHARED:
        pytest.skip(
            "needs the first run's champion (test_run_button_trains_on_site_pools_and_tracks)"
        )
    from mlflow.tracking import MlflowClient
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fl_components.config import FederationConfig
    from flows.federated_training import federated_training

    config = FederationConfig.model_validate_json(
        (Path(stack["root"]) / "federation.json").read_text()
    )
    config = FederationConfig.model_validate(
        {**config.model_dump(mode="json"), "rounds": 1, "init_from": "champion"}
    )
    site_dirs = [Path(entry["data"]).resolve() for entry in stack["sites"].values()]
    assert all((d / "train.npz").is_file() for d in site_dirs)
    opened: list[str] = []
    auditing = {"on": False}

    def audit(event: str, args: tuple[Any, ...]) -> None:
        watched = event in ("open", "os.listdir", "os.scandir")
        if auditing["on"] and watched and args and isinstance(args[0], (str, bytes, Path)):
            path = args[0]
            opened.append(path.decode() if isinstance(path, bytes) else str(path))

    sys.addaudithook(audit)
    auditing["on"] = True
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack["prefect_api_url"]}):
            try:
                summary = federated_training(config)
            finally:
                # flush this process's events and logs to the stack's server while it is up:
                # a worker left pointing at a stopped server would hang the session's teardown
                auditing["on"] = False
                EventsWorker.drain_all(timeout=30)
                APILogWorker.drain_all(timeout=30)
    finally:
        auditing["on"] = False
    assert opened, "the audit hook saw no file at all"
    leaked = [p for p in opened if any(Path(p).resolve().is_relative_to(d) for d in site_dirs)]
    assert not leaked, f"the coordinator opened site data: {leaked[:5]}"

    client = MlflowClient(stack["mlflow_url"])
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.tags["fedpipe.init_from"] == "champion"
    round0 = [
        m for m in client.get_metric_history(run.info.run_id, "global/accuracy") if m.step == 0
    ]
    assert round0[0].value == pytest.approx(SHARED["champion_accuracy"], abs=1e-9)

    # promotion follows the rule: champion only when strictly better on the same sites
    new_version = run.data.tags["fedpipe.model_version"]
    challenger = summary.final_accuracy
    champion = client.get_metric_history(run.info.run_id, "promotion/champion_accuracy")[0].value
    assert champion == pytest.approx(SHARED["champion_accuracy"], abs=1e-9)
    aliases = client.get_registered_model("e2e-fed").aliases
    if challenger > champion:
        assert aliases["champion"] == new_version
        assert run.data.tags["fedpipe.promotion"] == "champion"
    else:
        assert aliases["champion"] == SHARED["champion_version"]
        assert aliases["challenger"] == new_version
        assert "does not beat" in run.data.tags["fedpipe.promotion_reason"]


def test_site_init_enrolls_a_site(stack: dict[str, Any], tmp_path: Path) -> None:
    """`fedpipe site init` on the running stack: keys (0600), public registry entry, work
    pool, participant deployment, the worker's command; a second run changes nothing."""
    from ops.stack.lifecycle import StackError, site_init

    state = Path(stack["root"])
    api = stack["prefect_api_url"]
    data = tmp_path / "west-data"
    data.mkdir()
    args = ("site", "init", "west", "--data", str(data), "--state-dir", str(state))

    first = _fedpipe(*args, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fedpipe site worker --pool fedpipe-west" in first.stdout
    assert f"PREFECT_API_URL={api}" in first.stdout
    assert f"FEDPIPE_SITE_DIR={data.resolve()}" in first.stdout

    keys = state / "keys" / "west"
    private = {name: (keys / name).read_bytes() for name in ("x25519.key", "ed25519.key")}
    for name in private:
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
    assert keys.stat().st_mode & 0o077 == 0
    registry_text = (state / "registry.json").read_text()
    registry = json.loads(registry_text)
    assert {"north", "south", "east", "west"} <= set(registry)
    assert registry["west"] == json.loads((keys / "public.json").read_text())
    assert set(registry["west"]) == {"x25519", "ed25519"}
    for raw in private.values():  # public keys only: no private key, in any encoding
        assert base64.b64encode(raw).decode() not in registry_text
        assert raw.hex() not in registry_text

    pool = _api_get(f"{api}/work_pools/fedpipe-west")
    assert pool.status_code == 200 and pool.json()["type"] == "process"
    deployment = _api_get(f"{api}/deployments/name/federated-participant/west")
    assert deployment.status_code == 200, deployment.text
    assert deployment.json()["work_pool_name"] == "fedpipe-west"
    assert "site:west" in deployment.json()["tags"]
    record = json.loads((state / "stack.json").read_text())
    assert record["sites"]["west"]["pool"] == "fedpipe-west"
    assert record["processes"], "site init must keep the stack's process record"

    again = _fedpipe(*args, timeout=120)  # idempotent: same keys, same registry
    assert again.returncode == 0, again.stdout + again.stderr
    assert {name: (keys / name).read_bytes() for name in private} == private
    assert (state / "registry.json").read_text() == registry_text
    assert (
        _api_get(f"{api}/deployments/name/federated-participant/west").json()["id"]
        == (deployment.json()["id"])
    )

    # a bad name or a missing folder: a clear error, and nothing written
    for bad in ("../evil", "West", "-x", "a" * 64):
        with pytest.raises(StackError, match=r"site name .*lowercase letters, digits"):
            site_init(name=bad, data=data, root=state)
    assert not (state / "evil").exists() and not (state / "keys" / "West").exists()
    with pytest.raises(StackError, match=r"--data .*no such folder.*train/test"):
        site_init(name="nowhere", data=tmp_path / "missing", root=state)
    assert not (state / "keys" / "nowhere").exists()
    assert "nowhere" not in json.loads((state / "registry.json").read_text())


def test_dead_worker_is_skipped_fast_and_restarted(stack: dict[str, Any]) -> None:
    """Kill one site's worker: the site drops out as soon as its pool shows no live worker
    (not at the deadline), with a reason that gives the command that works, and each round
    completes with the other two (min_participants 2); `fedpipe status` says the worker is
    down and `fedpipe site restart` brings it back with its data, keys and executor.

    Runs last.
    """
    from mlflow.tracking import MlflowClient
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fl_components.config import FederationConfig
    from flows.federated_training import federated_training
    from ops.stack.lifecycle import status
    from ops.stack.processes import _group_members

    state = Path(stack["root"])
    api = stack["prefect_api_url"]
    dead = "east"
    record = json.loads((state / "stack.json").read_text())
    worker = next(p for p in record["processes"] if p["name"] == f"worker-{dead}")
    os.killpg(worker["pgid"], signal.SIGKILL)
    SHARED["killed_worker"] = worker["name"]
    deadline = time.monotonic() + 10
    while _group_members(worker["pgid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_members(worker["pgid"])

    raw = json.loads((state / "federation.json").read_text())
    raw.update(
        name="e2e-dropout",
        init_from="fresh",
        sites=[s for s in raw["sites"] if s["name"] in SITES],  # not a site enrolled later
        participation={**raw["participation"], "fraction": 1.0, "min_participants": 2},
        deployment={**raw["deployment"], "timeout_seconds": 120},
        secure_aggregation={**raw["secure_aggregation"], "enabled": False},
        tracking={**raw["tracking"], "register_model": False},
        rounds=2,
    )
    config = FederationConfig.model_validate(raw)
    with (
        temporary_settings(updates={PREFECT_API_URL: api}),
        sites_serving(stack, config.name, rounds=config.rounds),
    ):
        try:
            summary = federated_training(config)
        finally:  # flush events and logs while the server is up (see the champion test)
            EventsWorker.drain_all(timeout=30)
            APILogWorker.drain_all(timeout=30)

    assert [row["participants"] for row in summary.history] == [2, 2]
    assert [row["dropouts"] for row in summary.history] == [1, 1]
    # skipped once its pool showed no live worker, not after the 120 s deadline: the reasons
    # below say "skipped" (a timeout would say "timed out"); round seconds depend on the host

    client = MlflowClient(stack["mlflow_url"])
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    dropouts = client.get_metric_history(run.info.run_id, "dropouts")
    assert sorted((m.step, m.value) for m in dropouts) == [(1, 1.0), (2, 1.0)]
    for site in SITES:
        steps = {
            m.step for m in client.get_metric_history(run.info.run_id, f"site/{site}/accuracy")
        }
        assert steps == (set() if site == dead else {0, 1, 2}), site

    # Prefect: the live sites trained; the dead site's one run (round 1, dispatched before
    # its worker's heartbeats stopped counting) was cancelled; round 2 created none for it
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    children = _api_post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    train = [
        (job_message(c)["site"], job_message(c)["round"], c["state_type"])
        for c in children
        if job_message(c).get("run_id") == flow_run_id and job_message(c)["stage"] == "train"
    ]
    assert [(r, state) for site, r, state in train if site == dead] in ([], [(1, "CANCELLED")])
    assert sorted((site, r) for site, r, _ in train if site != dead) == [
        ("north", 1), ("north", 2), ("south", 1), ("south", 2)
    ]  # fmt: skip

    # the reason, in the round's table: the site, its pool, and the command that works
    artifact = _api_get(f"{api}/artifacts/e2e-dropout-round/latest")
    assert artifact.status_code == 200, artifact.text
    markdown = artifact.json()["data"]
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {dead} |"))
    assert "site 'east' skipped before dispatch" in row  # round 2: no run, no wait
    assert "timed out" not in row
    assert "work pool 'fedpipe-east' has no live worker" in row
    assert "`fedpipe site restart east`" in row and "`prefect worker start" not in row
    assert "| north | " in markdown and "| south | " in markdown

    # `fedpipe status` says the worker is down and how to restart it; restart brings it back
    shown = _fedpipe("status", "--state-dir", str(state), timeout=60)
    assert "worker down" in shown.stdout and "fedpipe site restart east" in shown.stdout
    # `fedpipe doctor` says so too, with the command that fixes it, and exits 1
    doctor = _fedpipe("doctor", "--state-dir", str(state), timeout=120)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    summary = doctor.stdout.strip().splitlines()[-1]  # one line, never wrapped
    assert f"site {dead}: worker: fedpipe site restart {dead} --state-dir {state}" in summary
    assert "Traceback" not in doctor.stdout + doctor.stderr
    restarted = _fedpipe("site", "restart", dead, "--state-dir", str(state), timeout=150)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "worker restarted" in restarted.stdout
    SHARED.pop("killed_worker")
    report = status(root=state)
    assert report["executors"][dead] == "warm"
    assert report["pools"][f"fedpipe-{dead}"] == "READY"
    worker_env = json.loads((state / "stack.json").read_text())["sites"][dead]
    assert worker_env["data"].endswith(dead) and worker_env["executor"]

    # doctor: east is well again; what is left is west (enrolled by `site init` above, with
    # an empty data folder and no worker), whose worker runs on its own host
    from ops.doctor import diagnose

    failed = {c.name: c for c in diagnose(state_dir=state) if not c.ok}
    assert set(failed) == {"site west: worker", "site west: data"}, failed
    assert "fedpipe site worker --pool fedpipe-west" in failed["site west: worker"].fix
    assert "no train file" in failed["site west: data"].detail
