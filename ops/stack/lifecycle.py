"""The local stack: ``fedpipe up`` / ``down`` / ``status`` / ``site init``.

``up`` starts, on 127.0.0.1, a Prefect server (SQLite under the state folder, or the
PostgreSQL URL given), an MLflow tracking server (store under ``mlflow/``, artifacts proxied
over HTTP), one process work pool and worker per site (each worker started with that site's
own data folder and keys, and nothing else), a coordinator pool and worker, and the
deployments of ``infra/prefect.yaml``. Every process is started in its own process group and
tagged in its environment; ``down`` stops exactly those groups and checks none is left.
This is the single-host stand-in for the multi-host deployment ``infra/README.md`` describes.
"""

import json
from pathlib import Path
from typing import Any

import httpx

from fl_components.config import FederationConfig, load_config
from fl_components.exchange import site_pool_name
from fl_components.wire.signing import COORDINATOR_KEYS_DIR, COORDINATOR_KEYS_ENV
from flows.resume import CHECKPOINT_DIR_ENV
from ops.stack import postgres
from ops.stack.credentials import (
    MLFLOW_AUTH_DB,
    StackCredentials,
    ensure_credentials,
    ensure_database_password,
    load_credentials,
    mlflow_client_env,
    mlflow_server_env,
    prefect_auth,
    provision_mlflow_users,
    record_extra,
)
from ops.stack.processes import (
    _bin,
    _clean_env,
    _group_members,
    _spawn,
    _wait_http,
    _wait_pools_ready,
    _worker_env,
    down,
    free_port,
    remove_stale_sockets,
    server_environment,
    tagged_processes,
)
from ops.stack.sites import (
    _register,
    deploy_coordinator,
    deploy_participant,
    enrol_keys,
    enrol_site,
    ensure_pool,
    restart_site,
    site_init,
    site_state,
    start_site_worker,
)
from ops.stack.state import (
    COORDINATOR_POOL,
    DEFAULT_FEDERATION,
    StackError,
    StackPaths,
    _redacted,
    load_record,
    stack_config,
)

DATABASES = ("auto", "postgresql", "sqlite")

__all__ = [
    "StackError",
    "StackPaths",
    "deploy_coordinator",
    "deploy_participant",
    "down",
    "enrol_keys",
    "ensure_pool",
    "free_port",
    "load_record",
    "remove_stale_sockets",
    "repair",
    "restart_site",
    "server_environment",
    "site_init",
    "site_state",
    "stack_config",
    "start_site_worker",
    "status",
    "tagged_processes",
    "up",
]


def up(
    *,
    config_path: Path = DEFAULT_FEDERATION,
    root: Path,
    mlflow_dir: Path,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    database_url: str | None = None,
    database: str = "auto",
) -> dict[str, Any]:
    """Start the stack and return its record (also written to ``<root>/stack.json``).

    ``database`` is the Prefect server's: ``auto`` (the stack's own PostgreSQL cluster when
    PostgreSQL is on this host, else SQLite), ``postgresql`` or ``sqlite``;
    ``database_url`` (a PostgreSQL server of your own) overrides it.

    Raises
    ------
    StackError
        If a stack is already running from ``root``, a server or worker fails to start, or
        ``database`` is ``postgresql`` and PostgreSQL cannot be had here.
    """
    if database not in DATABASES:
        raise StackError(f"--database {database!r}: choose one of {', '.join(DATABASES)}")
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
    credentials = _credentials(paths, config)
    record = _new_record(paths, config, api_url, mlflow_url, database_url, credentials)
    base = _clean_env(paths.root)
    try:
        _start_servers(paths, base, record, database, database_url, credentials)
        _prepare_federation(config, paths, api_url)
        pools = _start_workers(paths, config, base, record, credentials)
        _save(paths, record)
        _wait_pools_ready(api_url, pools, timeout=180, auth=prefect_auth(paths.root))
    except BaseException:
        _save(paths, record)
        down(root=paths.root)
        raise
    _save(paths, record)
    return record


def _save(paths: StackPaths, record: dict[str, Any]) -> None:
    paths.state_file.write_text(json.dumps(record, indent=2) + "\n")


def _start_servers(
    paths: StackPaths,
    base: dict[str, str],
    record: dict[str, Any],
    database: str,
    database_url: str | None,
    credentials: StackCredentials,
) -> None:
    """Start the database, then the Prefect and MLflow servers, and wait until they answer.

    The database is the stack's own PostgreSQL unless SQLite or a URL is chosen; MLflow's
    users are made once it answers.
    """
    api_url, mlflow_url = record["prefect_api_url"], record["mlflow_url"]
    if database_url is None and database != "sqlite":
        database_url = _start_postgres(paths, base, record, required=database == "postgresql")
        _save(paths, record)
    prefect = _start_prefect_server(paths, base, api_url, database_url)
    mlflow = _start_mlflow_server(paths, base, mlflow_url, credentials)
    record["processes"] += [prefect, mlflow]
    _save(paths, record)
    _wait_http(f"{api_url}/health", process=prefect, timeout=300, what="Prefect server")
    _wait_http(f"{mlflow_url}/health", process=mlflow, timeout=300, what="MLflow server")
    provision_mlflow_users(mlflow_url, credentials)


def _start_workers(
    paths: StackPaths,
    config: FederationConfig,
    base: dict[str, str],
    record: dict[str, Any],
    credentials: StackCredentials,
) -> list[str]:
    """The coordinator's worker and each site's; the pools they serve."""
    api_url, mlflow_url = record["prefect_api_url"], record["mlflow_url"]
    processes = record["processes"]
    processes.append(_start_coordinator_worker(paths, base, api_url, mlflow_url, credentials))
    pools = [COORDINATOR_POOL]
    for site in config.site_names:
        process, entry = _start_site(paths, config, base, api_url, site, credentials)
        processes.append(process)
        record["sites"][site] = entry
        pools.append(entry["pool"])
    return pools


def _start_postgres(
    paths: StackPaths,
    base: dict[str, str],
    record: dict[str, Any],
    *,
    required: bool,
    port: int | None = None,
    started: list[dict[str, Any]] | None = None,
) -> str | None:
    """Start the stack's PostgreSQL cluster (made the first time); the Prefect server's URL.

    Without PostgreSQL here, None (SQLite) and the reason in ``record["database_note"]``,
    unless it is ``required``. Its process goes into ``started`` (the record's processes
    unless given), at once: ``down`` stops it if it then fails.

    Raises
    ------
    StackError
        If PostgreSQL is required and cannot be had, or does not start.
    """
    try:
        cluster = postgres.cluster_for(paths.root)
        password = ensure_database_password(paths.root)
        postgres.initialise(cluster, password)
    except postgres.PostgresUnusable as error:
        if required:
            raise
        record["database_note"] = f"SQLite, because {error}"
        return None
    port = port or free_port()
    process = _spawn("postgres", cluster.server_command(port), base, paths.logs)
    process["stop_signal"] = "SIGINT"  # fast shutdown: do not wait for clients to leave
    (record["processes"] if started is None else started).append(process)
    record["database"] = f"postgresql (the stack's own, {cluster.data}, 127.0.0.1:{port})"
    record["postgres"] = {"port": port, "data": str(cluster.data)}
    postgres.wait_ready(cluster, port, alive=lambda: bool(_group_members(process["pgid"])))
    postgres.ensure_database(cluster, port, password)
    return cluster.url(port, password)


def _credentials(paths: StackPaths, config: FederationConfig) -> StackCredentials:
    """The stack's credentials: generated once per state folder (0600), passed by environment."""
    fresh = load_credentials(paths.root) is None
    credentials = ensure_credentials(paths.root, config.site_names)
    if fresh:  # an old auth store knows another admin password: MLflow would refuse it
        (paths.root / MLFLOW_AUTH_DB).unlink(missing_ok=True)
    return credentials


def _prepare_federation(config: FederationConfig, paths: StackPaths, api_url: str) -> None:
    """The sites' stand-in data (bundled sets), the deployments, and the federation's file."""
    if config.data.source == "bundled":  # stand-in for data the sites already hold
        from fl_components.federation import materialize_sites

        materialize_sites(config)
    _register(config, paths, api_url)
    (paths.root / "federation.json").write_text(
        config.model_dump_json(indent=2, exclude_unset=True) + "\n"
    )


def _new_record(
    paths: StackPaths,
    config: FederationConfig,
    api_url: str,
    mlflow_url: str,
    database_url: str | None,
    credentials: StackCredentials,
) -> dict[str, Any]:
    """The stack's record (``stack.json``) before anything starts: where it serves, no secret."""
    return {
        "root": str(paths.root),
        "prefect_api_url": api_url,
        "prefect_ui_url": api_url.removesuffix("/api"),
        "mlflow_url": mlflow_url,
        "database": _redacted(database_url) if database_url else "sqlite",
        "mlflow_dir": str(paths.mlflow_dir),
        "federation": config.name,
        "processes": [],
        "sites": {},
        **record_extra(credentials),
    }


def _start_site(
    paths: StackPaths,
    config: FederationConfig,
    base: dict[str, str],
    api_url: str,
    site: str,
    credentials: StackCredentials,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Enrol one site (its keys, policy and registry entry) and start its worker."""
    from fl_components.federation import site_folder

    keys = enrol_keys(paths, site)
    folder = site_folder(config, site).resolve()
    enrol_site(paths, config, site, folder)
    return start_site_worker(
        paths,
        base,
        api_url=api_url,
        site=site,
        pool=site_pool_name(config, site),
        data=folder,
        keys=keys,
        credentials=credentials,
    )


def _port(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]


def _start_prefect_server(
    paths: StackPaths, base: dict[str, str], api_url: str, database_url: str | None
) -> dict[str, Any]:
    server_env = server_environment(base, paths, api_url=api_url, database_url=database_url)
    (paths.root / "prefect").mkdir(exist_ok=True)
    command = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", _port(api_url)]
    return _spawn("prefect-server", command, server_env, paths.logs)


def _start_mlflow_server(
    paths: StackPaths, base: dict[str, str], mlflow_url: str, credentials: StackCredentials | None
) -> dict[str, Any]:
    mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    auth: list[str] = []
    if credentials is not None:  # its basic-auth app: users, passwords and grants
        mlflow_env.update(mlflow_server_env(paths.root, credentials))
        auth = ["--app-name", "basic-auth"]
    mlflow_cmd = [
        _bin("mlflow"), "server", *auth, "--workers", "1",
        "--backend-store-uri", f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination", str(paths.mlflow_dir / "artifacts"),
        "--host", "127.0.0.1", "--port", _port(mlflow_url),
    ]  # fmt: skip
    return _spawn("mlflow-server", mlflow_cmd, mlflow_env, paths.logs)


def _start_coordinator_worker(
    paths: StackPaths,
    base: dict[str, str],
    api_url: str,
    mlflow_url: str,
    credentials: StackCredentials | None,
) -> dict[str, Any]:
    home = paths.root / "workers" / "coordinator"
    coordinator_env = _worker_env(base, api_url, home, credentials)
    coordinator_env["MLFLOW_TRACKING_URI"] = mlflow_url
    # the one MLflow user that writes runs and moves aliases
    coordinator_env.update(mlflow_client_env(credentials.coordinator if credentials else None))
    coordinator_env[CHECKPOINT_DIR_ENV] = str(paths.root / "checkpoints")  # flows.resume
    # the coordinator's signing key: its worker alone is told where it is
    coordinator_env[COORDINATOR_KEYS_ENV] = str(paths.root / COORDINATOR_KEYS_DIR)
    worker_cmd = [_bin("prefect"), "worker", "start", "--type", "process", "--pool"]
    return _spawn(
        "worker-coordinator", [*worker_cmd, COORDINATOR_POOL], coordinator_env, paths.logs
    )


def _own_database_url(root: Path, record: dict[str, Any]) -> str:
    cluster = postgres.cluster_for(root)
    return cluster.url(int(record["postgres"]["port"]), ensure_database_password(root))


def repair(*, root: Path, database_url: str | None = None) -> list[str]:
    """Start again, as ``up`` did, each process of the running stack that has stopped.

    The Prefect server, the MLflow server, the coordinator's worker, a site's worker (with
    its data, keys and warm executor): each comes back on its address, database and pool,
    and the record says so (``fedpipe status``). Returns one line per process started.

    Raises
    ------
    StackError
        If no stack runs from ``root``, a PostgreSQL-backed server is to be started without
        ``database_url``, or a server does not answer after its start.
    """
    paths_root = root.resolve()
    record = load_record(paths_root)
    if not record.get("processes"):
        raise StackError(f"no stack is running from {root}; start one: `fedpipe up`")
    paths = StackPaths(paths_root, Path(record.get("mlflow_dir") or paths_root / "mlflow"))
    base = _clean_env(paths_root)
    credentials = load_credentials(paths_root)
    lines: list[str] = []
    for name in [p["name"] for p in record["processes"]]:
        index, process = next(
            (i, p) for i, p in enumerate(record["processes"]) if p["name"] == name
        )
        if _group_members(process["pgid"]):
            continue
        if name.startswith("worker-") and name != "worker-coordinator":
            site = name.removeprefix("worker-")
            started = restart_site(name=site, root=paths_root)  # it saves the record itself
            record = load_record(paths_root)
            lines.append(f"{name}: restarted (pid {started['pid']}, log {started['log']})")
            continue
        restarted = _restart_server(name, paths, base, record, database_url, credentials)
        if restarted is None:
            continue
        started, health = restarted
        record["processes"][index] = started
        _save(paths, record)
        if health:
            _wait_http(health, process=started, timeout=300, what=name)
        lines.append(f"{name}: restarted (pid {started['pid']}, log {started['log']})")
    return lines


def _restart_server(
    name: str,
    paths: StackPaths,
    base: dict[str, str],
    record: dict[str, Any],
    database_url: str | None,
    credentials: StackCredentials | None,
) -> tuple[dict[str, Any], str] | None:
    """Start recorded process ``name`` (not a site's worker) again.

    Returns its process and the URL that answers once it is up ("" where there is none);
    None for a name not known here.
    """
    api_url, mlflow_url = record["prefect_api_url"], record["mlflow_url"]
    if name == "postgres":  # back on its port, with its data; ready when this returns
        spawned: list[dict[str, Any]] = []
        port = int(record["postgres"]["port"])
        _start_postgres(paths, base, record, required=True, port=port, started=spawned)
        return spawned[0], ""
    if name == "prefect-server":
        if "postgres" in record:  # the stack's own cluster: its password is in credentials
            database_url = _own_database_url(paths.root, record)
        elif record.get("database", "sqlite") != "sqlite" and database_url is None:
            raise StackError(
                f"the Prefect server's database is {record['database']}: give its URL "
                "again, `fedpipe up --repair --database-url postgresql+asyncpg://...`"
            )
        return _start_prefect_server(paths, base, api_url, database_url), f"{api_url}/health"
    if name == "mlflow-server":
        started = _start_mlflow_server(paths, base, mlflow_url, credentials)
        return started, f"{mlflow_url}/health"
    if name == "worker-coordinator":
        return _start_coordinator_worker(paths, base, api_url, mlflow_url, credentials), ""
    return None


def status(*, root: Path) -> dict[str, Any]:
    """What runs: each recorded process, the servers' health and each pool's status."""
    record = load_record(root)
    report: dict[str, Any] = {
        "prefect_ui_url": record["prefect_ui_url"],
        "mlflow_url": record["mlflow_url"],
        "database": record.get("database", "sqlite"),
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
        auth = prefect_auth(root)
        for pool in pools:
            url = f"{record['prefect_api_url']}/work_pools/{pool}"
            response = httpx.get(url, timeout=5, auth=auth)
            ok = response.status_code == 200
            report["pools"][pool] = response.json().get("status") if ok else "MISSING"
    return report
