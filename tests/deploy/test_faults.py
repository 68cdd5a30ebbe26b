"""Faults on the real local stack (the session's stack, tests/deploy/conftest.py): a site that
answers after the deadline, a site's stage delivered twice, the Prefect server restarted
mid-run. Each leaves the stack as it found it (the tests in test_stack.py follow).

What protects a round, in tasks/work_pool.py: the coordinator creates one flow run per site
and stage and awaits *that* flow run by its id, with a deadline; at the deadline it cancels the
run and the site is a ``timeout`` dropout. A result is read only from the awaited run, and its
payload must name the job's site, stage and round (fl_components/wire/site_answer.py); the
payload does not carry the coordinator's run id, so it is the flow run id that keeps another
run's answer for the same site and round out.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.stack_harness import (
    FINAL_STATES,
    SITES,
    _api_get,
    _api_post,
    _assert_one_participant_run_per_site_and_round,
    _fedpipe,
    _mlflow_run_for,
    _wait_flow_run,
    create_deployed_run,
    deployed_config,
    job_message,
    participant_runs,
    run_coordinator,
    sites_serving,
    wait_dispatched,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _quiet_config(stack: dict[str, Any], name: str, **changes: Any) -> Any:
    """One round, no secure aggregation, no model registered, every site selected."""
    settings: dict[str, Any] = {
        "init_from": "fresh",
        "rounds": 1,
        "participation": {"fraction": 1.0, "min_participants": 2},
        "secure_aggregation": {"enabled": False},
        "tracking": {"register_model": False},
    }
    return deployed_config(stack, name=name, **{**settings, **changes})


def _runs_of(api: str, federation: str, site: str, round_num: int, stage: str) -> list[Any]:
    """Participant flow runs of ``federation`` for one site, round and stage."""
    runs = _api_post(
        f"{api}/flow_runs/filter",
        json={
            "flows": {"name": {"any_": ["federated-participant"]}},
            "flow_runs": {"name": {"like_": f"{site}-r{round_num}-{stage}-"}},
            "limit": 50,
        },
    ).json()
    return [
        r
        for r in runs
        if job_message(r).get("federation", {}).get("name") == federation
        and job_message(r).get("site") == site
        and job_message(r).get("round") == round_num
    ]


@contextmanager
def _in_background(action: Callable[[threading.Event], None]) -> Iterator[dict[str, Any]]:
    """Run ``action(stop)`` on a thread beside the block; its exception is re-raised after."""
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            action(stop)
        except BaseException as error:  # surfaced by the test, after the run
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        stop.set()
        thread.join(timeout=60)
    if "error" in outcome:
        raise outcome["error"]


def _executor_pid(stack: dict[str, Any], site: str) -> int:
    """The pid of the site's warm executor (`ops.site_executor serve`, in its worker's group)."""
    record = json.loads((Path(stack["root"]) / "stack.json").read_text())
    worker = next(p for p in record["processes"] if p["name"] == f"worker-{site}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        pgid = int(stat[stat.rindex(")") + 2 :].split()[2])
        if pgid == worker["pgid"] and b"ops.site_executor" in cmdline and b"serve" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no warm executor found for site {site}")


def _thaw_once_final(
    api: str, name: str, site: str, executor: int, seen: dict[str, Any]
) -> Callable[[threading.Event], None]:
    """A background action: once ``site``'s round-1 training run is final (the coordinator
    gave up on it), note its state in ``seen`` and thaw its frozen executor (SIGCONT)."""

    def thaw(stop: threading.Event) -> None:
        try:
            while not stop.wait(0.5):
                runs = _runs_of(api, name, site, 1, "train")
                if runs and runs[0]["state_type"] in FINAL_STATES:
                    seen["state_at_deadline"] = runs[0]["state_type"]
                    seen["message"] = runs[0]["state"]["message"]
                    seen["at"] = time.monotonic()
                    return
        finally:
            os.kill(executor, signal.SIGCONT)

    return thaw


@pytest.fixture()
def serve(stack: dict[str, Any]) -> Iterator[Callable[..., None]]:
    """``serve(name, rounds=R)``: the sites serve federation ``name`` until the test ends."""
    with contextlib.ExitStack() as held:
        yield lambda name, rounds=1: held.enter_context(sites_serving(stack, name, rounds=rounds))


def test_a_late_answer_is_left_out_and_the_round_completes(stack: dict[str, Any]) -> None:
    """Site east's executor is frozen (SIGSTOP): its worker stays live, so its round-1 run is
    handed over but cannot answer. At the deadline the coordinator cancels that run, east is a
    ``timeout`` dropout and round 1 completes on the other two. Thawed (SIGCONT) after the
    cancellation, east's late run cannot add to round 1 (it is not awaited any more), and east
    answers the final evaluation as usual."""
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    late, name, deadline = "east", "e2e-late", 40
    config = _quiet_config(stack, name, deployment={"timeout_seconds": deadline})
    executor = _executor_pid(stack, late)
    seen: dict[str, Any] = {}

    os.kill(executor, signal.SIGSTOP)
    started = time.monotonic()
    with _in_background(_thaw_once_final(api, name, late, executor, seen)):
        summary = run_coordinator(stack, config)
    elapsed = time.monotonic() - started

    assert [row["participants"] for row in summary.history] == [2]
    assert [row["dropouts"] for row in summary.history] == [1]
    assert elapsed >= deadline  # it waited for the deadline, not longer than the run needs
    assert seen["state_at_deadline"] == "CANCELLED"
    assert seen["message"] == f"no result within {deadline}s"

    artifact = _api_get(f"{api}/artifacts/{name}-round/latest")
    assert artifact.status_code == 200, artifact.text
    row = next(line for line in artifact.json()["data"].splitlines() if f"| {late} |" in line)
    assert "dropped: timeout: " in row
    assert f"site '{late}' timed out: no result within {deadline}s" in row

    client = MlflowClient(stack["mlflow_url"])
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    (participants,) = client.get_metric_history(run.info.run_id, "participants")
    assert (participants.step, participants.value) == (1, 2.0)
    # east is alive again: it scored round 1's model in the final evaluation
    steps = {m.step for m in client.get_metric_history(run.info.run_id, f"site/{late}/accuracy")}
    assert 1 in steps

    # what became of the late run once thawed (whatever it did, round 1 was closed without it)
    (late_run,) = _runs_of(api, name, late, 1, "train")
    final = _wait_flow_run(api, late_run["id"], timeout=120)
    print(f"late run after thawing: {final['state_type']} {final['state']['message']!r}")


def test_over_selection_closes_the_round_without_the_straggler(stack: dict[str, Any]) -> None:
    """2 of the 3 sites are needed (fraction 0.5) and 1 more is over-selected: with east's
    executor frozen, round 1 closes once north and south have answered, long before the
    deadline; east's run is cancelled and east is a ``surplus`` dropout."""
    api = stack["prefect_api_url"]
    late, name, deadline = "east", "e2e-overselect", 150
    config = _quiet_config(
        stack,
        name,
        deployment={"timeout_seconds": deadline},
        participation={"fraction": 0.5, "min_participants": 2, "over_select": 1},
    )
    executor = _executor_pid(stack, late)
    seen: dict[str, Any] = {}

    os.kill(executor, signal.SIGSTOP)
    started = time.monotonic()
    with _in_background(_thaw_once_final(api, name, late, executor, seen)):
        summary = run_coordinator(stack, config)

    assert [row["participants"] for row in summary.history] == [2]
    # east's run was cancelled once the others answered, long before its deadline
    assert seen["state_at_deadline"] == "CANCELLED", seen
    assert seen["at"] - started < deadline / 2, seen["at"] - started
    artifact = _api_get(f"{api}/artifacts/{name}-round/latest")
    row = next(line for line in artifact.json()["data"].splitlines() if f"| {late} |" in line)
    assert "dropped: surplus: " in row and "participation.over_select" in row
    _let_a_thawed_run_finish(api, name, late)


def _let_a_thawed_run_finish(api: str, name: str, site: str, *, limit: float = 60) -> None:
    """A run cancelled while its executor was frozen may still run once thawed (see the
    late-answer test): wait for it, so the next test finds the site idle."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        (run,) = _runs_of(api, name, site, 1, "train")
        if run["state_type"] in FINAL_STATES - {"CANCELLED"}:
            return
        time.sleep(1)


def test_a_stage_delivered_twice_counts_once(stack: dict[str, Any]) -> None:
    """A second flow run of the same site, round and stage (a re-delivery: the participant
    deployment run again with the same parameters) is the same signed job again: the site
    runs it once and refuses the other delivery as a replay before it reads any data (its
    audit log says so, with the job's nonce), whichever of the two reached it first. The
    coordinator reads only the run it created: east counts once (or, when the re-delivery
    ran first, is a `replayed` dropout), never twice. What either left in result storage is
    sealed, like every answer."""
    from mlflow.tracking import MlflowClient

    from fl_components.site.audit import AuditKind, AuditLog
    from tasks.work_pool import read_json_result

    api = stack["prefect_api_url"]
    twice = "east"
    deployment = _api_get(f"{api}/deployments/name/federated-participant/{twice}").json()
    client = MlflowClient(stack["mlflow_url"])
    for attempt in (1, 2):  # a site's own run refused by a busy SQLite server (503): again
        name = f"e2e-twice-{attempt}"
        duplicate: dict[str, Any] = {}

        def redeliver(
            stop: threading.Event, name: str = name, into: dict[str, Any] = duplicate
        ) -> None:
            while not stop.wait(0.5):
                runs = _runs_of(api, name, twice, 1, "train")
                if runs:
                    again = {
                        "parameters": runs[0]["parameters"],
                        "name": runs[0]["name"] + "-again",
                    }
                    created = _api_post(
                        f"{api}/deployments/{deployment['id']}/create_flow_run", json=again
                    )
                    assert created.status_code == 201, created.text
                    into.update(created.json())
                    return

        with _in_background(redeliver):
            summary = run_coordinator(stack, _quiet_config(stack, name))
        run = client.get_run(summary.mlflow_run_id)
        flow_run_id = run.data.tags["prefect.flow_run_id"]
        mine = [
            c
            for c in participant_runs(api, flow_run_id)
            if (job_message(c)["site"], job_message(c)["stage"]) == (twice, "train")
        ]
        own = [c for c in mine if c["id"] != duplicate.get("id")]
        if duplicate and own and own[0]["state_type"] == "COMPLETED":
            break
    # both deliveries ran to the end; the coordinator read one
    assert len(mine) == 2 and len(own) == 1, mine
    assert _wait_flow_run(api, duplicate["id"], timeout=300)["state_type"] == "COMPLETED"
    answered = 3 - summary.history[0]["dropouts"]  # another site may have hit a 503 as well
    assert [row["participants"] for row in summary.history] == [answered]
    (participants,) = client.get_metric_history(run.info.run_id, "participants")
    assert participants.value == answered
    artifact = _api_get(f"{api}/artifacts/{name}-round/latest").json()["data"]
    row = next(line for line in artifact.splitlines() if f"| {twice} |" in line)
    # east's one answer counted, or its own run came second and was refused as a replay
    assert "dropped" not in row or "replayed" in row, row

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: api}),
        get_client(sync_client=True) as prefect,
    ):
        payload = read_json_result(prefect.read_flow_run(duplicate["id"]))
    assert set(payload) == {"sealed"}, sorted(payload)  # ciphertext only
    nonce = duplicate["parameters"]["job"]["nonce"]
    refusals = [
        e.details
        for e in AuditLog.in_folder(Path(stack["sites"][twice]["data"])).entries()
        if e.kind is AuditKind.REFUSED and e.details.get("nonce") == nonce
    ]
    assert [r["reason"] for r in refusals] == ["replayed"], refusals


def _restart_prefect_server(
    stack: dict[str, Any], *, kill: signal.Signals = signal.SIGTERM, down_for: float = 0.0
) -> float:
    """Stop the stack's Prefect server (``kill``; SIGKILL after 10 s), leave it down for
    ``down_for`` seconds and start it again on the same port and database, as `fedpipe up`
    started it; the seconds its API was away."""
    from ops.stack.processes import (
        _bin,
        _clean_env,
        _group_members,
        _spawn,
        _wait_http,
        server_environment,
    )
    from ops.stack.state import StackPaths

    root = Path(stack["root"])
    record = json.loads((root / "stack.json").read_text())
    index, server = next(
        (i, p) for i, p in enumerate(record["processes"]) if p["name"] == "prefect-server"
    )
    api = record["prefect_api_url"]
    port = api.rsplit(":", 1)[1].split("/")[0]
    started = time.monotonic()
    os.killpg(server["pgid"], kill)
    while _group_members(server["pgid"]) and time.monotonic() - started < 10:
        time.sleep(0.2)
    if _group_members(server["pgid"]):
        os.killpg(server["pgid"], signal.SIGKILL)
    time.sleep(max(0.0, started + down_for - time.monotonic()))
    paths = StackPaths(root, root)
    env = server_environment(_clean_env(root), paths, api_url=api, database_url=None)
    command = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", port]
    process = _spawn("prefect-server", command, env, paths.logs)
    record["processes"][index] = process  # `fedpipe down` stops the new one
    (root / "stack.json").write_text(json.dumps(record, indent=2) + "\n")
    _wait_http(f"{api}/health", process=process, timeout=300, what="Prefect server")
    return time.monotonic() - started


def test_the_prefect_server_restarted_mid_run(stack: dict[str, Any], serve: Any) -> None:
    """A run from the deployment (coordinator on its own worker), the Prefect server stopped
    and started again while round 1's site runs are out: Prefect's clients retry a refused
    connection once they have connected (5 times, backoff 2-32 s), so the coordinator, the
    workers and the site runs wait the restart out and the run completes, every round logged
    once."""
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    serve("e2e-restart", rounds=2)
    partial = {
        "name": "e2e-restart",
        "rounds": 2,
        "init_from": "fresh",
        "sites": [{"name": s} for s in SITES],
        "tracking": {"register_model": False},
    }
    run_id = create_deployed_run(stack, partial)
    wait_dispatched(api, run_id)  # round 1 is out at the sites
    away = _restart_prefect_server(stack)

    run = _wait_flow_run(api, run_id, timeout=900)
    seen = sorted(
        (job_message(c)["site"], job_message(c)["round"], job_message(c)["stage"],
         c["state_type"], c["created"], (c["state"] or {}).get("message"))
        for c in participant_runs(api, run_id)
    )  # fmt: skip
    client = MlflowClient(stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, "e2e-restart", run_id)
    dropouts = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "dropouts")]
    print(f"server away {away:.1f}s; run {run['state']}; dropouts {dropouts}")
    for row in seen:
        print("  ", row)
    assert run["state"]["type"] == "COMPLETED", (away, run["state"])
    assert mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "global/accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]  # every round logged, once
    # a site run out during the restart may crash (its own retries spent while the server
    # was away): that site drops out of round 1, and the evaluation of step 0 its run
    # carried is missing; nothing else is
    crashed = {(row[0], row[1]) for row in seen if row[3] == "CRASHED"}
    assert all(round_num == 1 for _, round_num in crashed), seen
    for site in SITES:
        steps = [
            m.step for m in client.get_metric_history(mlrun.info.run_id, f"site/{site}/accuracy")
        ]
        assert len(steps) == len(set(steps)), site  # never twice at one step
        missing = {0, 1, 2} - set(steps)
        assert missing <= {r - 1 for s, r in crashed if s == site}, (site, missing, seen)
    _assert_one_participant_run_per_site_and_round(api, run_id, rounds=2, crashed=crashed)


def test_a_run_cancelled_after_a_server_outage_stops_and_registers_nothing(
    stack: dict[str, Any], serve: Any
) -> None:
    """A deployed run, its Prefect server killed (SIGKILL) for 30 s and started again, then
    cancelled as `prefect flow-run cancel` does (state CANCELLING). After the outage its
    worker's cancellation observer may have given up ("Flow run cancellation disabled"), so
    nothing kills the coordinator: it must see its own state between rounds and stop there,
    its flow run CANCELLED, its MLflow run KILLED, no model registered, no alias moved."""
    from mlflow.tracking import MlflowClient

    api, name, rounds = stack["prefect_api_url"], "e2e-cancel", 5
    serve(name, rounds=rounds)
    partial = {
        "name": name,
        "rounds": rounds,
        "init_from": "fresh",
        "sites": [{"name": s} for s in SITES],
        "secure_aggregation": {"enabled": False},
        "tracking": {"register_model": True},
    }
    run_id = create_deployed_run(stack, partial)
    wait_dispatched(api, run_id)  # round 1 is out at the sites
    away = _restart_prefect_server(stack, kill=signal.SIGKILL, down_for=30)
    cancelled_at = time.monotonic()
    cancel = _api_post(
        f"{api}/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CANCELLING", "message": "cancelled by the fault test"}},
    )
    assert cancel.status_code in (200, 201), cancel.text
    assert cancel.json()["status"] == "ACCEPT", cancel.json()

    run = _wait_flow_run(api, run_id, timeout=900)
    stopped_after = time.monotonic() - cancelled_at
    client = MlflowClient(stack["mlflow_url"], registry_uri=stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, name, run_id)
    logged = sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "participants"))
    print(f"server away {away:.1f}s; {run['state_type']} {stopped_after:.0f}s after the cancel")
    print(f"rounds logged {logged}; state message {run['state']['message']!r}")
    assert client.search_model_versions(f"name = '{name}'") == []  # nothing registered
    assert run["state_type"] == "CANCELLED", run["state"]
    assert mlrun.info.status == "KILLED"
    assert len(logged) < rounds  # it stopped between rounds, not at the end
    # stopped at the next round boundary: a round here takes well under 2 minutes
    assert stopped_after < 240, stopped_after


def test_a_dead_prefect_server_is_named_by_doctor_and_repaired(stack: dict[str, Any]) -> None:
    """The stack's Prefect server killed (SIGKILL, its whole group): `fedpipe doctor` names
    the fix, `fedpipe up --repair` (not `fedpipe up`, which refuses a running stack) starts
    it again on its port and database, and `fedpipe status` says so."""
    from ops.stack.processes import _group_members

    state = stack["root"]
    record = json.loads((Path(state) / "stack.json").read_text())
    (server,) = [p for p in record["processes"] if p["name"] == "prefect-server"]
    os.killpg(server["pgid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _group_members(server["pgid"]) and time.monotonic() < deadline:
        time.sleep(0.2)

    doctor = _fedpipe("doctor", "--state-dir", state, timeout=300)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert f"fedpipe up --repair --state-dir {state}" in doctor.stdout.replace("\n", "")
    repaired = _fedpipe("up", "--repair", "--state-dir", state, timeout=600)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "prefect-server: restarted" in repaired.stdout, repaired.stdout

    status = _fedpipe("status", "--state-dir", state, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy=True" in status.stdout.splitlines()[0], status.stdout
    line = next(x for x in status.stdout.splitlines() if "prefect-server" in x)
    assert "running" in line, status.stdout
    deployment = _api_get(f"{stack['prefect_api_url']}/deployments/name/federated-training/"
                          "federated-training")  # fmt: skip
    assert deployment.status_code == 200  # the same database: the deployments are there
    again = _fedpipe("up", "--repair", "--state-dir", state, timeout=300)
    assert "nothing had stopped" in again.stdout, again.stdout
