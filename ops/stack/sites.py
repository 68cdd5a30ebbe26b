"""The local stack's sites and deployments: keys, work pools, workers, enrolment, restart.

Each site's worker is started with only that site's data folder (``FEDPIPE_SITE_DIR``),
keys (``FEDPIPE_SITE_KEYS``) and warm executor; ``fedpipe site init`` onboards a new site
and ``fedpipe site restart`` brings a dead worker back the way ``up`` started it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from fl_components.config import FederationConfig
from fl_components.exchange import SITE_DIR_ENV, SITE_KEYS_ENV, SITE_NAME_ENV, site_pool_name
from ops.stack.credentials import (
    StackCredentials,
    credentials_path,
    ensure_credentials,
    load_credentials,
    mlflow_client_env,
    prefect_auth,
    prefect_settings,
    provision_mlflow_users,
)
from ops.stack.processes import (
    _clean_env,
    _group_members,
    _spawn,
    _wait_pools_ready,
    _worker_env,
    remove_stale_sockets,
)
from ops.stack.schedules import kept_states, read_schedules
from ops.stack.state import (
    COORDINATOR_POOL,
    PREFECT_FILE,
    REPO,
    RESULTS_BLOCK,
    StackError,
    StackPaths,
    load_record,
)


def _deployment_settings() -> dict[str, Any]:
    """The coordinator and participant entries of ``infra/prefect.yaml``."""
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    return {"coordinator": by_name["federated-training"], "participant": by_name["site-template"]}


def enrol_keys(paths: StackPaths, site: str) -> Path | None:
    """Site keys (made once, kept) and the registry's public entry; None without secagg."""
    try:
        from fl_components.secure_aggregation.protocol import Registry, SiteKeys
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


def coordinator_identity(paths: StackPaths) -> Any:
    """The federation's coordinator identity under the stack's state (made on first use).

    Its private keys stay in ``<state>/coordinator-keys`` (0600), read only by the
    coordinator's worker (``FEDPIPE_COORDINATOR_KEYS``); sites pin its public half.
    """
    from fl_components.wire.signing import COORDINATOR_KEYS_DIR, CoordinatorIdentity

    return CoordinatorIdentity.load_or_create(paths.root / COORDINATOR_KEYS_DIR)


def enrol_site(paths: StackPaths, config: FederationConfig, site: str, folder: Path) -> None:
    """Enrol ``site`` at ``folder``: the coordinator key pinned, the exchange and registry.

    Also writes the site's policy from the federation's settings if it has none (an
    existing policy is the site steward's and is never overwritten).
    """
    from fl_components.site.enrolment import enrol
    from fl_components.site.policy import policy_from_federation, policy_path

    identity = coordinator_identity(paths)
    enrol(
        folder,
        federation=config.name,
        site=site,
        coordinator=identity.public,
        exchange_dir=paths.exchange,
        registry=paths.root / "registry.json",
    )
    if not policy_path(folder).is_file():
        policy = policy_from_federation(config, coordinator_key_id=identity.key_id)
        policy.save(policy_path(folder))


def _register(config: FederationConfig, paths: StackPaths, api_url: str) -> None:
    """Result storage block, work pools and deployments on the running server."""
    from prefect.settings import temporary_settings

    with (
        temporary_settings(updates=prefect_settings(paths.root, api_url)),
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
    declared = spec.get("schedules", [])
    # a schedule the server already holds keeps its on/off state (switched in the UI or
    # with `fedpipe schedule`); infra/prefect.yaml's `active:` only starts a new one
    states = kept_states(declared, read_schedules(f"federated-training/{spec['name']}"))
    schedules = [
        Cron(s["cron"], timezone=s.get("timezone"), active=active)
        for s, active in zip(declared, states, strict=True)
    ]
    parameters = config.model_dump(mode="json", exclude_unset=True)
    # η depends on the rule: stored unset (null), resolved when the run starts, so the form,
    # which posts every field back, cannot carry one rule's default into another
    strategy = parameters.setdefault("strategy", {})
    strategy.setdefault("server_lr", None)
    source = prefect_flow.from_source(source=str(REPO), entrypoint=spec["entrypoint"])
    # prefect's async_dispatch types from_source as Flow | Coroutine; sync callers get the Flow
    source.deploy(  # type: ignore[union-attr]
        name=spec["name"],
        work_pool_name=COORDINATOR_POOL,
        parameters={"config": parameters},
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
    # prefect's async_dispatch types from_source as Flow | Coroutine; sync callers get the Flow
    source.deploy(  # type: ignore[union-attr]
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


def start_site_worker(
    paths: StackPaths,
    base: dict[str, str],
    *,
    api_url: str,
    site: str,
    pool: str,
    data: Path,
    keys: Path | None,
    credentials: StackCredentials | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start one site's worker (warm executor + process worker) with only its own settings.

    Returns
    -------
    tuple[dict[str, Any], dict[str, Any]]
        The started process (name, pid, pgid, log) and the site's entry of the record.
    """
    from ops.site_executor import default_socket

    home = paths.root / "workers" / site
    env = _worker_env(base, api_url, home, credentials)
    if credentials is not None:  # the site's own MLflow user: it may read, not write
        env.update(mlflow_client_env(credentials.site(site)))
    env[SITE_NAME_ENV] = site
    env[SITE_DIR_ENV] = str(data)
    if keys is not None:
        env[SITE_KEYS_ENV] = str(keys)
    executor = default_socket(home)
    # the site's worker runs its flow runs through a warm executor (ops.site_executor)
    command = [sys.executable, "-m", "ops.site_executor", "worker", "--pool", pool]
    command += ["--socket", str(executor)]
    process = _spawn(f"worker-{site}", command, env, paths.logs)
    entry = {
        "pool": pool,
        "data": str(data),
        "keys": str(keys) if keys is not None else None,
        "executor": str(executor),
    }
    return process, entry


def _worker_process(record: dict[str, Any], site: str) -> dict[str, Any] | None:
    return next((p for p in record["processes"] if p["name"] == f"worker-{site}"), None)


def site_state(record: dict[str, Any], site: str) -> str:
    """One site's worker as ``status`` shows it: warm, cold, or down with the fix."""
    from ops.site_executor import executor_answers

    process = _worker_process(record, site)
    if process is None or not _group_members(process["pgid"]):
        return f"worker down: no flow run can start; restart it: `fedpipe site restart {site}`"
    executor = record["sites"][site].get("executor")
    if executor and executor_answers(executor):
        return "warm"
    return "executor not answering (the worker runs flow runs cold)"


def _join_running_stack(
    paths: StackPaths, record: dict[str, Any], *, name: str, data: Path, pool: str
) -> None:
    """Add a site to the running stack: its MLflow user, pool, deployment and enrolment."""
    from prefect.settings import temporary_settings

    if load_credentials(paths.root) is not None:  # the new site's own MLflow user
        credentials = ensure_credentials(paths.root, [name])
        provision_mlflow_users(record["mlflow_url"], credentials)
    config_file = paths.root / "federation.json"
    config = FederationConfig.model_validate_json(config_file.read_text())
    if name not in config.site_names:
        raw = config.model_dump(mode="json", exclude_unset=True)
        raw["sites"].append({"name": name, "data_path": str(data.resolve()), "work_pool": pool})
        config = FederationConfig.model_validate(raw)
    with temporary_settings(updates=prefect_settings(paths.root, record["prefect_api_url"])):
        ensure_pool(pool)
        deploy_participant(config, name)
    config_file.write_text(config.model_dump_json(indent=2, exclude_unset=True) + "\n")
    enrol_site(paths, config, name, data.resolve())


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
        _join_running_stack(paths, record, name=name, data=data, pool=pool)
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
    if credentials_path(paths.root).is_file():  # never the secret itself on a command line
        entry["worker_command"] = (
            f"PREFECT_API_AUTH_STRING=<prefect_auth_string in {credentials_path(paths.root)}> "
            + entry["worker_command"]
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
        credentials=load_credentials(paths_root),
    )
    record["processes"].append(process)
    paths.state_file.write_text(json.dumps(record, indent=2) + "\n")
    auth = prefect_auth(paths_root)
    _wait_pools_ready(record["prefect_api_url"], [entry["pool"]], timeout=timeout, auth=auth)
    return process
