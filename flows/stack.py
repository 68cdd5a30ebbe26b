"""The local stack: ``fedpipe up`` / ``down`` / ``status`` / ``site init``.

``up`` starts, on 127.0.0.1, a Prefect server (SQLite under the state folder, or the
PostgreSQL URL given), an MLflow tracking server (store under ``mlflow/``, artifacts proxied
over HTTP), one process work pool and worker per site (each worker started with that site's
own data folder and keys, and nothing else), a coordinator pool and worker, and the
deployments of ``infra/prefect.yaml``. Every process is started in its own process group and
tagged in its environment; ``down`` stops exactly those groups and checks none is left.
This is the single-host stand-in for the multi-host deployment ``infra/README.md`` describes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from fl_components.config import FederationConfig, load_config
from fl_components.errors import FedpipeError
from fl_components.exchange import SITE_DIR_ENV, SITE_KEYS_ENV, SITE_NAME_ENV, site_pool_name
from flows.resume import CHECKPOINT_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
DEFAULT_FEDERATION = REPO / "infra" / "federation.yaml"
RESULTS_BLOCK = "fedpipe-results"
COORDINATOR_POOL = "fedpipe-coordinator"
STACK_TAG_ENV = "FEDPIPE_STACK"
# worker latency is part of every round: poll for new runs each second
# one BLAS/torch thread per flow run: a site's runs share its cores with the others here
# a heartbeat each 5 s: a dead worker reads OFFLINE after 15 s (3 missed), and its site is
# skipped instead of waited for (tasks.work_pool.pool_not_serving)
WORKER_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    "PREFECT_WORKER_PREFETCH_SECONDS": "10",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class StackError(FedpipeError):
    """The local stack could not be started, found or stopped."""


@dataclass(frozen=True)
class StackPaths:
    """Where a stack keeps its state."""

    root: Path
    mlflow_dir: Path

    @property
    def state_file(self) -> Path:
        """The record of what ``up`` started (addresses, PIDs, sites)."""
        return self.root / "stack.json"

    @property
    def logs(self) -> Path:
        """One log file per started process."""
        return self.root / "logs"

    @property
    def results(self) -> Path:
        """Shared Prefect result storage (the participants' payloads)."""
        return self.root / "results"

    @property
    def exchange(self) -> Path:
        """Shared exchange storage (the global-model files)."""
        return self.root / "exchange"

    @property
    def keys(self) -> Path:
        """Site key folders (in a real deployment each lives on its own site)."""
        return self.root / "keys"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _clean_env(root: Path) -> dict[str, str]:
    """The current environment without Prefect/MLflow/fedpipe settings, tagged."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
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


def _deployment_settings() -> dict[str, Any]:
    """The coordinator and participant entries of ``infra/prefect.yaml``."""
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    return {"coordinator": by_name["federated-training"], "participant": by_name["site-template"]}


def stack_config(config: FederationConfig, paths: StackPaths, mlflow_url: str) -> FederationConfig:
    """The federation as the stack deploys it: work-pool backend, its exchange and tracking.

    Configs travel as the fields that were set (``exclude_unset``): validated again, a
    dump of every field would read as a knob set on purpose (strategy knobs are checked
    against the strategy they belong to).
    """
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["backend"] = "work-pool"
    raw["deployment"] = {**raw.get("deployment", {}), "exchange_dir": str(paths.exchange)}
    raw["tracking"] = {**raw.get("tracking", {}), "tracking_uri": mlflow_url}
    # the one registry `enrol_keys` writes; sites and coordinator read public keys from it
    raw["secure_aggregation"] = {
        **raw.get("secure_aggregation", {}),
        "registry": str(paths.root / "registry.json"),
    }
    if config.data.source == "bundled":
        sites_dir = str(Path(config.data.sites_dir).resolve())
        raw["data"] = {**raw.get("data", {}), "sites_dir": sites_dir}
    return FederationConfig.model_validate(raw)


def enrol_keys(paths: StackPaths, site: str) -> Path | None:
    """Site keys (made once, kept) and the registry's public entry; None without secagg."""
    try:
        from fl_components.secagg import Registry, SiteKeys
    except ImportError:
        return None
    folder = paths.keys / site
    if not (folder / "ed25519.key").is_file():
        SiteKeys.generate().save(folder)
    registry_file = paths.root / "registry.json"
    entries = dict(Registry.from_json(registry_file.read_text())) if registry_file.is_file() else {}
    entries[site] = SiteKeys.load(folder).public()
    registry_file.write_text(Registry(entries).to_json() + "\n")
    return folder


def _register(config: FederationConfig, paths: StackPaths, api_url: str) -> None:
    """Result storage block, work pools and deployments on the running server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        contextlib.redirect_stdout(io.StringIO()),  # deploy() prints tables per deployment
    ):
        from prefect.filesystems import LocalFileSystem

        LocalFileSystem(basepath=str(paths.results)).save(RESULTS_BLOCK, overwrite=True)
        for pool in [COORDINATOR_POOL, *(site_pool_name(config, s) for s in config.site_names)]:
            ensure_pool(pool)
        deploy_coordinator(config)
        for site in config.site_names:
            deploy_participant(config, site)


def ensure_pool(name: str) -> None:
    """Create a process work pool unless it exists (needs PREFECT_API_URL)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )


def deploy_coordinator(config: FederationConfig) -> None:
    """The ``federated-training`` deployment: form typed by the config, cron schedule."""
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    spec = _deployment_settings()["coordinator"]
    schedules = [
        Cron(s["cron"], timezone=s.get("timezone"), active=bool(s.get("active", False)))
        for s in spec.get("schedules", [])
    ]
    source = prefect_flow.from_source(source=str(REPO), entrypoint=spec["entrypoint"])
    source.deploy(
        name=spec["name"],
        work_pool_name=COORDINATOR_POOL,
        parameters={"config": config.model_dump(mode="json", exclude_unset=True)},
        schedules=schedules,
        description=spec.get("description"),
        tags=spec.get("tags"),
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


def deploy_participant(config: FederationConfig, site: str) -> None:
    """The participant deployment ``federated-participant/<site>`` on the site's pool."""
    from prefect import flow as prefect_flow

    spec = _deployment_settings()["participant"]
    source = prefect_flow.from_source(source=str(REPO), entrypoint=spec["entrypoint"])
    source.deploy(
        name=site,
        work_pool_name=site_pool_name(config, site),
        description=f"Site {site}'s stage of a round, run by its own worker.",
        tags=[*spec.get("tags", []), f"site:{site}"],
        job_variables=spec.get("work_pool", {}).get("job_variables"),
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


def _worker_env(base: dict[str, str], api_url: str, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", os.defpath)])
    return {
        **base,
        "PATH": path,  # the job command `fedpipe-site-exec` is this environment's
        # flow runs import this checkout's code, whatever else the environment has installed
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])),
        **WORKER_ENV,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"local-file-system/{RESULTS_BLOCK}",
    }


def _wait_pools_ready(api_url: str, pools: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(pools)
    while waiting and time.monotonic() < deadline:
        for pool in sorted(waiting):
            response = httpx.get(f"{api_url}/work_pools/{pool}", timeout=5)
            if response.status_code == 200 and response.json().get("status") == "READY":
                waiting.discard(pool)
        time.sleep(0.3)
    if waiting:
        raise StackError(f"no worker came online for pool(s) {sorted(waiting)} in {timeout:.0f}s")


def server_environment(
    base: dict[str, str], paths: StackPaths, *, api_url: str, database_url: str | None
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
    """
    env = {
        **base,
        "PREFECT_HOME": str(paths.root / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url
        or f"sqlite+aiosqlite:///{paths.root / 'prefect' / 'prefect.db'}",
        "PREFECT_SERVER_UI_API_URL": api_url,
    }
    if database_url is None:
        env["PREFECT_SERVER_DATABASE_TIMEOUT"] = "60"
        env["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE"] = "200"
    return env


def _redacted(url: str) -> str:
    """The database URL without its password: the state file is not a secret store."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def up(
    *,
    config_path: Path = DEFAULT_FEDERATION,
    root: Path,
    mlflow_dir: Path,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Start the stack and return its record (also written to ``<root>/stack.json``).

    Raises
    ------
    StackError
        If a stack is already running from ``root``, or a server or worker fails to start.
    """
    paths = StackPaths(root.resolve(), mlflow_dir.resolve())
    if paths.state_file.is_file() and tagged_processes(paths.root):
        raise StackError(f"a stack is already running from {paths.root}; `fedpipe down` first")
    for folder in (paths.root, paths.results, paths.exchange, paths.mlflow_dir / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    prefect_port = prefect_port or free_port()
    mlflow_port = mlflow_port or free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    config = stack_config(load_config(config_path), paths, mlflow_url)
    record: dict[str, Any] = {
        "root": str(paths.root),
        "prefect_api_url": api_url,
        "prefect_ui_url": f"http://127.0.0.1:{prefect_port}",
        "mlflow_url": mlflow_url,
        "database": _redacted(database_url) if database_url else "sqlite",
        "federation": config.name,
        "processes": [],
        "sites": {},
    }
    base = _clean_env(paths.root)
    processes: list[dict[str, Any]] = record["processes"]

    def save() -> None:
        paths.state_file.write_text(json.dumps(record, indent=2) + "\n")

    try:
        server_env = server_environment(base, paths, api_url=api_url, database_url=database_url)
        (paths.root / "prefect").mkdir(exist_ok=True)
        server_cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1"]
        processes.append(
            _spawn(
                "prefect-server", [*server_cmd, "--port", str(prefect_port)], server_env, paths.logs
            )
        )
        mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow_cmd = [
            _bin("mlflow"), "server", "--workers", "1",
            "--backend-store-uri", f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(paths.mlflow_dir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(mlflow_port),
        ]  # fmt: skip
        processes.append(_spawn("mlflow-server", mlflow_cmd, mlflow_env, paths.logs))
        save()
        _wait_http(f"{api_url}/health", process=processes[0], timeout=300, what="Prefect server")
        _wait_http(f"{mlflow_url}/health", process=processes[1], timeout=300, what="MLflow server")

        if config.data.source == "bundled":  # stand-in for data the sites already hold
            from fl_components.federation import materialize_sites

            materialize_sites(config)
        _register(config, paths, api_url)
        (paths.root / "federation.json").write_text(
            config.model_dump_json(indent=2, exclude_unset=True) + "\n"
        )

        from fl_components.federation import site_folder

        coordinator_env = _worker_env(base, api_url, paths.root / "workers" / "coordinator")
        coordinator_env["MLFLOW_TRACKING_URI"] = mlflow_url
        coordinator_env[CHECKPOINT_DIR_ENV] = str(paths.root / "checkpoints")  # flows.resume
        worker_cmd = [_bin("prefect"), "worker", "start", "--type", "process", "--pool"]
        processes.append(
            _spawn(
                "worker-coordinator", [*worker_cmd, COORDINATOR_POOL], coordinator_env, paths.logs
            )
        )
        pools = [COORDINATOR_POOL]
        for site in config.site_names:
            keys = enrol_keys(paths, site)
            process, entry = start_site_worker(
                paths,
                base,
                api_url=api_url,
                site=site,
                pool=site_pool_name(config, site),
                data=site_folder(config, site).resolve(),
                keys=keys,
            )
            processes.append(process)
            record["sites"][site] = entry
            pools.append(entry["pool"])
        save()
        _wait_pools_ready(api_url, pools, timeout=180)
    except BaseException:
        save()
        down(root=paths.root)
        raise
    save()
    return record


def start_site_worker(
    paths: StackPaths,
    base: dict[str, str],
    *,
    api_url: str,
    site: str,
    pool: str,
    data: Path,
    keys: Path | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start one site's worker (warm executor + process worker) with only its own settings.

    Returns
    -------
    tuple[dict[str, Any], dict[str, Any]]
        The started process (name, pid, pgid, log) and the site's entry of the record.
    """
    from flows.site_executor import default_socket

    home = paths.root / "workers" / site
    env = _worker_env(base, api_url, home)
    env[SITE_NAME_ENV] = site
    env[SITE_DIR_ENV] = str(data)
    if keys is not None:
        env[SITE_KEYS_ENV] = str(keys)
    executor = default_socket(home)
    # the site's worker runs its flow runs through a warm executor (flows.site_executor)
    command = [sys.executable, "-m", "flows.site_executor", "worker", "--pool", pool]
    command += ["--socket", str(executor)]
    process = _spawn(f"worker-{site}", command, env, paths.logs)
    entry = {
        "pool": pool,
        "data": str(data),
        "keys": str(keys) if keys is not None else None,
        "executor": str(executor),
    }
    return process, entry


def load_record(root: Path) -> dict[str, Any]:
    """The record ``up`` wrote; a clear error when there is none."""
    state_file = root.resolve() / "stack.json"
    if not state_file.is_file():
        raise StackError(f"no stack recorded under {root} (no stack.json); start one: `fedpipe up`")
    return dict(json.loads(state_file.read_text()))


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
            os.killpg(process["pgid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
    time.sleep(1.0)
    for process in groups:  # a Prefect worker ignores its first SIGTERM: send a second
        with contextlib.suppress(ProcessLookupError):
            if _group_members(process["pgid"]):
                os.killpg(process["pgid"], signal.SIGTERM)
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


def remove_stale_sockets(record: dict[str, Any]) -> list[str]:
    """Remove the executor sockets a killed worker left behind (a stopped one removes its own)."""
    lines = []
    for site, entry in record["sites"].items():
        path = Path(entry["executor"]) if entry.get("executor") else None
        if path is not None and path.is_socket():
            path.unlink(missing_ok=True)
            lines.append(f"site {site}: removed stale executor socket {path}")
    return lines


def _worker_process(record: dict[str, Any], site: str) -> dict[str, Any] | None:
    return next((p for p in record["processes"] if p["name"] == f"worker-{site}"), None)


def site_state(record: dict[str, Any], site: str) -> str:
    """One site's worker as ``status`` shows it: warm, cold, or down with the fix."""
    from flows.site_executor import executor_answers

    process = _worker_process(record, site)
    if process is None or not _group_members(process["pgid"]):
        return f"worker down: no flow run can start; restart it: `fedpipe site restart {site}`"
    executor = record["sites"][site].get("executor")
    if executor and executor_answers(executor):
        return "warm"
    return "executor not answering (the worker runs flow runs cold)"


def status(*, root: Path) -> dict[str, Any]:
    """What runs: each recorded process, the servers' health and each pool's status."""
    record = load_record(root)
    report: dict[str, Any] = {
        "prefect_ui_url": record["prefect_ui_url"],
        "mlflow_url": record["mlflow_url"],
        "processes": [
            {**p, "running": bool(_group_members(p["pgid"]))} for p in record["processes"]
        ],
        "pools": {},
    }
    for name, url in (
        ("prefect", f"{record['prefect_api_url']}/health"),
        ("mlflow", f"{record['mlflow_url']}/health"),
    ):
        try:
            report[f"{name}_healthy"] = httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            report[f"{name}_healthy"] = False
    report["executors"] = {
        site: site_state(record, site)
        for site, entry in record["sites"].items()
        if entry.get("executor")
    }
    if report["prefect_healthy"]:
        pools = [COORDINATOR_POOL, *(s["pool"] for s in record["sites"].values())]
        for pool in pools:
            response = httpx.get(f"{record['prefect_api_url']}/work_pools/{pool}", timeout=5)
            ok = response.status_code == 200
            report["pools"][pool] = response.json().get("status") if ok else "MISSING"
    return report


def site_init(*, name: str, data: Path, root: Path) -> dict[str, Any]:
    """Onboard a site: keys and registry entry, and (stack running) its pool and deployment.

    Returns
    -------
    dict[str, Any]
        The site's pool, data folder, keys folder and the command its worker runs.
    """
    from pydantic import ValidationError

    from fl_components.config import SiteConfig

    try:
        SiteConfig(name=name)
    except ValidationError:
        raise StackError(
            f"site name {name!r}: must be 1-63 lowercase letters, digits, '-' or '_', starting "
            "with a letter or digit (e.g. 'west' or 'site-2'); it names the site's work pool "
            "and key folder"
        ) from None
    if not data.is_dir():
        raise StackError(f"--data {data}: no such folder; it must hold the site's train/test files")
    paths = StackPaths(root.resolve(), Path("mlflow").resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    keys = enrol_keys(paths, name)
    pool = f"fedpipe-{name}"
    entry: dict[str, Any] = {"pool": pool, "data": str(data.resolve()), "keys": str(keys)}
    state_file = paths.state_file
    record = json.loads(state_file.read_text()) if state_file.is_file() else None
    if record is not None and record.get("processes"):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        config_file = paths.root / "federation.json"
        config = FederationConfig.model_validate_json(config_file.read_text())
        if name not in config.site_names:
            raw = config.model_dump(mode="json", exclude_unset=True)
            raw["sites"].append({"name": name, "data_path": str(data.resolve()), "work_pool": pool})
            config = FederationConfig.model_validate(raw)
        with temporary_settings(updates={PREFECT_API_URL: record["prefect_api_url"]}):
            ensure_pool(pool)
            deploy_participant(config, name)
        config_file.write_text(config.model_dump_json(indent=2, exclude_unset=True) + "\n")
        record["sites"][name] = entry
        state_file.write_text(json.dumps(record, indent=2) + "\n")
        api_url = record["prefect_api_url"]
    else:
        api_url = "http://<coordinator-host>:4200/api"
    entry["worker_command"] = (
        f"PREFECT_API_URL={api_url} {SITE_NAME_ENV}={name} {SITE_DIR_ENV}={data.resolve()} "
        f"{SITE_KEYS_ENV}={keys} PREFECT_RESULTS_PERSIST_BY_DEFAULT=true "
        f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=local-file-system/{RESULTS_BLOCK} "
        f"PREFECT_WORKER_QUERY_SECONDS=1 fedpipe site worker --pool {pool}"
    )
    return entry


def restart_site(*, name: str, root: Path, timeout: float = 90.0) -> dict[str, Any]:
    """Stop site ``name``'s worker if it still runs and start it again, as ``up`` did.

    The new worker gets the site's own data folder, keys and warm executor (a bare
    ``prefect worker start`` would have none of them).

    Returns
    -------
    dict[str, Any]
        The started process (name, pid, pgid, log).

    Raises
    ------
    StackError
        If no stack runs from ``root``, the site is not one of its sites, or the worker's
        pool has no live worker after ``timeout`` seconds.
    """
    paths_root = root.resolve()
    record = load_record(paths_root)
    if not record.get("processes"):
        raise StackError(f"no stack is running from {root}; start one: `fedpipe up`")
    entry = record["sites"].get(name)
    if entry is None or not entry.get("executor"):
        known = ", ".join(sorted(record["sites"])) or "none"
        raise StackError(
            f"site {name!r} has no worker in this stack (its sites: {known}); onboard a new "
            f"site with `fedpipe site init {name} --data PATH`"
        )
    old = _worker_process(record, name)
    if old is not None:
        with contextlib.suppress(ProcessLookupError):
            if _group_members(old["pgid"]):
                os.killpg(old["pgid"], signal.SIGKILL)
        record["processes"].remove(old)
    remove_stale_sockets({"sites": {name: entry}})
    paths = StackPaths(paths_root, paths_root)
    keys = Path(entry["keys"]) if entry.get("keys") else None
    process, _ = start_site_worker(
        paths,
        _clean_env(paths_root),
        api_url=record["prefect_api_url"],
        site=name,
        pool=entry["pool"],
        data=Path(entry["data"]),
        keys=keys,
    )
    record["processes"].append(process)
    paths.state_file.write_text(json.dumps(record, indent=2) + "\n")
    _wait_pools_ready(record["prefect_api_url"], [entry["pool"]], timeout=timeout)
    return process
