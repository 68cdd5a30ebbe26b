"""The deployment end to end on PostgreSQL: a throwaway cluster on 127.0.0.1, `fedpipe up
--database-url postgresql+asyncpg://...` with 3 sites, one run from the UI's Run button.

PostgreSQL comes from Debian's `postgresql` package (installed here when missing); the test
skips, never fails, when the package cannot be had.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_stack import (
    SITES,
    _api_get,
    _api_post,
    _mlflow_run_for,
    _wait_flow_run,
    running_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PG_USER = "fedpipe"
PG_DB = "prefect"


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    found = [b for b in found if (b / "initdb").is_file() and (b / "pg_ctl").is_file()]
    return found[-1] if found else None


def _ensure_postgresql() -> Path:
    """The newest PostgreSQL bin folder; installs Debian's package when there is none."""
    if (bindir := _pg_bindir()) is not None:
        return bindir
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("PostgreSQL is not installed and apt-get (as root) is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
    errors = []
    for before in ([], [["apt-get", "update"]]):
        try:
            for command in [*before, install]:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=300, env=env, check=False
                )
                if done.returncode != 0:
                    errors.append(f"{' '.join(command)}: {done.stderr.strip()[-300:]}")
                    break
        except subprocess.TimeoutExpired as exc:
            errors.append(f"{' '.join(exc.cmd)}: timed out")
        if (bindir := _pg_bindir()) is not None:
            return bindir
    pytest.skip(f"could not install PostgreSQL: {'; '.join(errors)}")


def _as_postgres(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a server command as the `postgres` user (initdb and postgres refuse root)."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway cluster on a free 127.0.0.1 port; yields its asyncpg URL."""
    from flows.stack import free_port

    bindir = _ensure_postgresql()
    base = Path(tempfile.mkdtemp(prefix="fedpipe-pg-"))  # not under pytest's 0700 root tmp
    data, sockets, log = base / "data", base / "sockets", base / "postgres.log"
    sockets.mkdir()
    password = secrets.token_hex(16)
    (base / "pwfile").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        for path in (sockets, base / "pwfile"):
            shutil.chown(path, "postgres", "postgres")
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
    started = False
    try:
        init = _as_postgres(
            [
                str(bindir / "initdb"), "-D", str(data), "-U", PG_USER,
                "--pwfile", str(base / "pwfile"), "--auth-local", "trust",
                "--auth-host", "scram-sha-256", "--encoding", "UTF8", "--no-sync",
            ],
            timeout=120,
        )  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        port = free_port()
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = _as_postgres([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "60", "start"])
        started = start.returncode == 0
        assert started, start.stdout + start.stderr + (log.read_text() if log.exists() else "")
        created = _as_postgres(
            [str(bindir / "createdb"), "-h", str(sockets), "-p", str(port), "-U", PG_USER, PG_DB],
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        yield f"postgresql+asyncpg://{PG_USER}:{password}@127.0.0.1:{port}/{PG_DB}"
    finally:
        if started:
            stop = _as_postgres([*pg_ctl, "-m", "fast", "-w", "stop"], timeout=60)
            assert stop.returncode == 0, stop.stdout + stop.stderr
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pgstack")
    with running_stack(root, name="e2e-pg", extra_args=("--database-url", postgres)) as record:
        yield record


def test_run_button_on_postgres(stack: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    api = stack["prefect_api_url"]
    server = next(p for p in stack["processes"] if p["name"] == "prefect-server")
    assert Path(f"/proc/{server['pid']}").exists()
    assert not (Path(stack["root"]) / "prefect" / "prefect.db").exists()  # not SQLite

    deployment = _api_get(f"{api}/deployments/name/federated-training/federated-training").json()
    config = deployment["parameters"]["config"]
    assert config["backend"] == "work-pool"
    created = _api_post(  # what the UI's Run button sends
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"config": {**config, "rounds": 2, "init_from": "fresh"}}},
    )
    assert created.status_code == 201, created.text
    run = _wait_flow_run(api, created.json()["id"], timeout=400)
    assert run["state"]["type"] == "COMPLETED", run["state"]

    # Prefect: one participant run per site per round and stage, each on its own pool
    children = _api_post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["federated-participant"]}}, "limit": 200},
    ).json()
    seen: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for child in children:
        params = child["parameters"]
        if params.get("run_id") == run["id"]:
            key = (params["site"], params["round_num"], params["stage"])
            seen.setdefault(key, []).append(child)
    expected = {(s, r, st) for s in SITES for r in (1, 2) for st in ("train", "evaluate")}
    expected |= {(s, 0, "evaluate") for s in SITES}  # the initial model's evaluation
    assert set(seen) == expected
    for (site, _, _), match in seen.items():
        assert len(match) == 1
        assert match[0]["work_pool_name"] == f"fedpipe-{site}"
        assert match[0]["state_type"] == "COMPLETED"

    # MLflow: per-round metrics at step = round
    client = MlflowClient(stack["mlflow_url"])
    mlrun = _mlflow_run_for(client, "e2e-pg", run["id"])
    history = client.get_metric_history(mlrun.info.run_id, "global/accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    for site in SITES:
        steps = {
            m.step for m in client.get_metric_history(mlrun.info.run_id, f"site/{site}/accuracy")
        }
        assert steps == {0, 1, 2}
    rounds = client.get_metric_history(mlrun.info.run_id, "round_seconds")
    if rounds:
        print(f"postgres median round_seconds: {statistics.median(m.value for m in rounds):.2f}")
