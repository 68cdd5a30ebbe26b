"""End to end on 127.0.0.1: `fedpipe up` with 3 sites, a run from the UI's Run button,
MLflow and Prefect checked, a champion run whose coordinator never opens site data, `down`.

One stack serves the module (about 35 s to start); the tests run in file order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FEDPIPE = str(Path(sys.executable).parent / "fedpipe")
SITES = ("north", "south", "east")
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SHARED: dict[str, Any] = {}


def _fedpipe(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDPIPE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from flows.stack import tagged_processes

    root = tmp_path_factory.mktemp("stack")
    federation = {
        "name": "e2e-fed",
        "rounds": 2,
        "sites": [{"name": s} for s in SITES],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"dataset": "digits", "sites_dir": str(root / "sites")},
        "model": {"kind": "mlp", "hidden": [16]},
        "training": {"epochs": 1, "batch_size": 64},
        "deployment": {"timeout_seconds": 120, "poll_interval": 0.3},
        "seed": 3,
    }
    config_file = root / "federation.yaml"
    config_file.write_text(yaml.safe_dump(federation))
    state = root / "state"
    args = ["--state-dir", str(state), "--mlflow-dir", str(root / "mlflow")]
    result = _fedpipe(
        "up", "--config", str(config_file), *args, "--prefect-port", "0", "--mlflow-port", "0",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((state / "stack.json").read_text())
    try:
        yield record
    finally:
        down = _fedpipe("down", "--state-dir", str(state), timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "no process left" in down.stdout
        assert not tagged_processes(state.resolve())
        for process in record["processes"]:
            assert not Path(f"/proc/{process['pid']}").exists() or (
                Path(f"/proc/{process['pid']}/stat").read_text().split(") ")[1][0] == "Z"
            )


def _wait_flow_run(api: str, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in FINAL_STATES:
            return dict(run)
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout}s")


def _mlflow_run_for(client: Any, experiment: str, flow_run_id: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert len(runs) == 1
    return runs[0]


def test_status_shows_every_process_and_pool(stack: dict[str, Any]) -> None:
    from flows.stack import status

    report = status(root=Path(stack["root"]))
    assert report["prefect_healthy"] and report["mlflow_healthy"]
    assert all(p["running"] for p in report["processes"])
    assert {f"fedpipe-{s}" for s in SITES} <= set(report["pools"])
    assert all(v == "READY" for v in report["pools"].values())


def test_run_button_trains_on_site_pools_and_tracks(stack: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    deployment = httpx.get(f"{api}/deployments/name/federated-training/federated-training").json()
    assert "config" in deployment["parameter_openapi_schema"]["properties"]  # the UI form
    assert deployment["schedules"] and not deployment["schedules"][0]["active"]
    config = deployment["parameters"]["config"]
    assert config["backend"] == "work-pool"

    bad = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": {**config, "rounds": 0}}},
    )
    assert bad.status_code == 409 and "rounds" in bad.text

    started = time.perf_counter()
    created = httpx.post(  # what the UI's Run button sends
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": {**config, "rounds": 2, "init_from": "fresh"}}},
    )
    assert created.status_code == 201, created.text
    run = _wait_flow_run(api, created.json()["id"], timeout=400)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    SHARED["first_seconds"] = time.perf_counter() - started

    # Prefect: one participant run per site per round and stage, each on its own pool
    children = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    mine = [c for c in children if c["parameters"].get("run_id") == run["id"]]
    for round_num in (1, 2):
        for stage in ("train", "evaluate"):
            for site in SITES:
                match = [
                    c
                    for c in mine
                    if (
                        c["parameters"]["site"],
                        c["parameters"]["round_num"],
                        c["parameters"]["stage"],
                    )
                    == (site, round_num, stage)
                ]
                assert len(match) == 1, (site, round_num, stage)
                assert match[0]["work_pool_name"] == f"fedpipe-{site}"
                assert match[0]["state_type"] == "COMPLETED"

    # MLflow: metrics at step = round, the flow run id tag, the registered model and alias
    client = MlflowClient(stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, "e2e-fed", run["id"])
    history = client.get_metric_history(mlrun.info.run_id, "global/accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    for site in SITES:
        steps = {
            m.step for m in client.get_metric_history(mlrun.info.run_id, f"site/{site}/accuracy")
        }
        assert steps == {0, 1, 2}
    assert mlrun.data.tags["fedpipe.backend"] == "work-pool"
    model = client.get_registered_model("e2e-fed")
    version = mlrun.data.tags["fedpipe.model_version"]
    assert model.aliases["champion"] == version
    SHARED["champion_accuracy"] = max(history, key=lambda m: m.step).value
    SHARED["champion_version"] = version


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
