"""``fedpipe doctor``: check a deployment, say what is wrong and the command that fixes it.

What is checked, each as a :class:`Check` (a row of the table ``fedpipe doctor`` prints):

- the stack's servers run (its PostgreSQL cluster, the Prefect and MLflow servers, the
  coordinator's worker);
- the Prefect API answers, and its UI is told the right API (``/ui-settings`` ``api_url``
  equal to the server's own API; unset, Prefect answers port 4200 and the UI cannot connect);
- every enrolled site's work pool has a live worker (the coordinator's own test,
  :func:`tasks.work_pool.pool_not_serving`) and, on the local stack, a warm executor (what
  ``fedpipe status`` shows);
- the MLflow server answers;
- each local site's keys load and match its public entry in the secure-aggregation registry;
- each local site's data loads as the site itself loads it (labels within ``n_classes``);
- each local site's privacy budget has something left.

The deployment is the stack ``fedpipe up`` recorded under a state folder; ``PREFECT_API_URL``,
where set, names the Prefect API to check instead (the sites then come from the state folder
when there is one, else from the server's participant deployments).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fl_components.config import FederationConfig
from fl_components.errors import FedpipeError

PARTICIPANT_FLOW = "federated-participant"


@dataclass(frozen=True)
class Check:
    """One thing checked: what, whether it is fine, what was found, and the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class SiteEntry:
    """An enrolled site as the doctor sees it; folders are None where not on this host."""

    name: str
    pool: str
    data: Path | None = None
    keys: Path | None = None


def _get(url: str) -> httpx.Response | str:
    """The response, or why there is none (one line)."""
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def check_prefect(api_url: str, *, fix: str) -> list[Check]:
    """The Prefect API's health, and the API address the UI is given by ``/ui-settings``.

    ``fix`` is the command that starts the server where it does not answer.
    """
    api_url = api_url.rstrip("/")
    health = _get(f"{api_url}/health")
    if isinstance(health, str) or health.status_code != 200:
        found = health if isinstance(health, str) else f"HTTP {health.status_code}"
        return [Check("prefect api", False, f"{api_url} does not answer ({found})", fix)]
    checks = [Check("prefect api", True, f"{api_url} answers")]
    ui_url = api_url.removesuffix("/api")
    settings = _get(f"{ui_url}/ui-settings")
    if isinstance(settings, str) or settings.status_code != 200:
        found = settings if isinstance(settings, str) else f"HTTP {settings.status_code}"
        checks.append(Check("prefect ui", False, f"{ui_url}/ui-settings: {found}", fix))
        return checks
    told = str(settings.json().get("api_url") or "").rstrip("/")
    if told != api_url:
        checks.append(
            Check(
                "prefect ui",
                False,
                f"the UI is told the API is {told or '(unset)'}, not {api_url}: it shows "
                "\"Can't connect to Server API\" or another server's runs",
                f"restart the server with PREFECT_SERVER_UI_API_URL={api_url} (`fedpipe down` "
                "then `fedpipe up` sets it)",
            )
        )
    else:
        checks.append(Check("prefect ui", True, f"/ui-settings api_url is {told}"))
    return checks


def check_stack_processes(record: Mapping[str, Any], *, fix: str) -> list[Check]:
    """Whether each recorded server (and the coordinator's worker) still runs.

    A site's worker is checked with its site (:func:`check_site_workers`).
    """
    from ops.stack.processes import _group_members

    checks = []
    for process in record.get("processes", []):
        name = str(process["name"])
        if name.startswith("worker-") and name != "worker-coordinator":
            continue
        if _group_members(int(process["pgid"])):
            checks.append(Check(name, True, f"running (pid {process['pid']})"))
        else:
            detail = f"stopped; its log: {process.get('log', '?')}"
            checks.append(Check(name, False, detail, fix))
    return checks


def check_mlflow(tracking_uri: str | None, *, fix: str) -> Check:
    """The MLflow server answers ``/health`` (a local store is only named)."""
    if not tracking_uri:
        return Check("mlflow", False, "no MLflow tracking URI known", fix)
    if not tracking_uri.startswith(("http://", "https://")):
        return Check("mlflow", True, f"local store {tracking_uri} (no server to check)")
    health = _get(f"{tracking_uri.rstrip('/')}/health")
    if isinstance(health, str) or health.status_code != 200:
        found = health if isinstance(health, str) else f"HTTP {health.status_code}"
        return Check("mlflow", False, f"{tracking_uri} does not answer ({found})", fix)
    return Check("mlflow", True, f"{tracking_uri} answers")


def check_auth(record: Mapping[str, Any], state_dir: Path) -> list[Check]:
    """The stack's servers refuse anonymous requests and take its credentials.

    And the files holding secrets are readable by their owner only (0600).
    """
    import stat

    from ops.stack.credentials import (
        CREDENTIALS_FILE,
        MLFLOW_AUTH_INI,
        load_credentials,
    )

    fix_modes = f"chmod 600 {state_dir / CREDENTIALS_FILE} {state_dir / MLFLOW_AUTH_INI}"
    checks: list[Check] = []
    for name in (CREDENTIALS_FILE, MLFLOW_AUTH_INI):
        path = state_dir / name
        if not path.is_file():
            checks.append(Check(f"mode {name}", False, f"{path} is missing", "fedpipe down; up"))
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        checks.append(
            Check(
                f"mode {name}",
                mode == 0o600,
                f"{path}: {mode:04o}",
                "" if mode == 0o600 else fix_modes,
            )
        )
    try:
        credentials = load_credentials(state_dir)
    except FedpipeError as error:
        return [*checks, Check("credentials", False, str(error), fix_modes)]
    if credentials is None:
        return checks
    api = str(record["prefect_api_url"]).rstrip("/")
    mlflow = str(record["mlflow_url"]).rstrip("/")
    user, _, password = credentials.prefect_auth_string.partition(":")
    coordinator = (credentials.coordinator.username, credentials.coordinator.password)
    probes = [
        ("prefect auth", f"{api}/admin/version", (user, password)),
        ("mlflow auth", f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", coordinator),
    ]
    restart = f"fedpipe down --state-dir {state_dir}; fedpipe up --state-dir {state_dir}"
    for name, url, auth in probes:
        try:
            anonymous = httpx.get(url, timeout=5).status_code
            known = httpx.get(url, timeout=5, auth=auth).status_code
        except httpx.HTTPError as error:
            checks.append(Check(name, False, f"{url}: {type(error).__name__}", restart))
            continue
        ok = anonymous == 401 and known == 200
        detail = f"anonymous: HTTP {anonymous} (401 wanted); the stack's credentials: HTTP {known}"
        checks.append(Check(name, ok, detail, "" if ok else restart))
    return checks


def check_site_workers(
    client: Any,
    sites: Iterable[SiteEntry],
    *,
    record: Mapping[str, Any] | None,
    state_dir: Path | None,
) -> list[Check]:
    """Each site's pool has a live worker; on the local stack, its executor is warm.

    ``client`` is a sync Prefect client (``read_work_pool``, ``read_workers_for_work_pool``).
    """
    from ops.stack.sites import site_state
    from tasks.work_pool import pool_not_serving

    checks = []
    for site in sites:
        # a site whose worker this stack started (it has an executor) restarts here; any
        # other runs its worker on its own host, with the command `site init` printed
        entry = (record or {}).get("sites", {}).get(site.name) or {}
        local = bool(entry.get("executor"))
        restart = _restart_command(site.name, state_dir) if local else (
            f"on the site's host, run the worker command `fedpipe site init {site.name}` "
            f"printed (`fedpipe site worker --pool {site.pool}` with its FEDPIPE_SITE_* "
            "settings)"
        )  # fmt: skip
        why = pool_not_serving(client, site.pool)
        if why is not None:
            checks.append(Check(f"site {site.name}: worker", False, why, restart))
            continue
        if record is None or not local:
            checks.append(Check(f"site {site.name}: worker", True, f"pool {site.pool} served"))
            continue
        state = site_state(dict(record), site.name)
        if state == "warm":
            detail = f"pool {site.pool} has a live worker, executor warm"
            checks.append(Check(f"site {site.name}: worker", True, detail))
        else:
            checks.append(Check(f"site {site.name}: worker", False, state, restart))
    return checks


def _restart_command(site: str, state_dir: Path | None) -> str:
    extra = f" --state-dir {state_dir}" if state_dir is not None and _non_default(state_dir) else ""
    return f"fedpipe site restart {site}{extra}"


def _non_default(state_dir: Path) -> bool:
    from ops.stack.state import DEFAULT_STACK_DIR

    return state_dir.resolve() != DEFAULT_STACK_DIR.resolve()


def _init_command(site: SiteEntry, state_dir: Path | None) -> str:
    data = f" --data {site.data}" if site.data is not None else " --data PATH"
    extra = f" --state-dir {state_dir}" if state_dir is not None and _non_default(state_dir) else ""
    return f"fedpipe site init {site.name}{data}{extra}"


def check_keys(
    registry_file: Path, sites: Iterable[SiteEntry], *, state_dir: Path | None
) -> list[Check]:
    """Each local site's keys load (0600) and their public half is the registry's entry."""
    from fl_components.secure_aggregation.protocol import Registry, SiteKeys
    from fl_components.secure_aggregation.protocol.errors import ProtocolError

    sites = list(sites)
    if not registry_file.is_file():
        fix = "; ".join(_init_command(s, state_dir) for s in sites) or "fedpipe site init NAME"
        return [Check("registry", False, f"{registry_file} does not exist", fix)]
    try:
        registry = Registry.from_json(registry_file.read_text())
    except (ProtocolError, ValueError, KeyError) as error:
        return [Check("registry", False, f"{registry_file}: {error}", "re-enrol every site")]
    checks = []
    for site in sites:
        name = f"site {site.name}: keys"
        if site.keys is None:
            listed = "listed" if site.name in registry else "NOT listed"
            ok = site.name in registry
            detail = f"{listed} in the registry (its keys live on its own host)"
            checks.append(Check(name, ok, detail, "" if ok else _init_command(site, state_dir)))
            continue
        try:
            public = SiteKeys.load(site.keys).public()
        except ProtocolError as error:  # missing file, wrong size, readable by others
            checks.append(Check(name, False, str(error), _init_command(site, state_dir)))
            continue
        if site.name not in registry:
            detail = f"no entry in {registry_file}"
            checks.append(Check(name, False, detail, _init_command(site, state_dir)))
        elif registry[site.name] != public:
            detail = (
                f"{site.keys} does not match its entry in {registry_file}: the other sites "
                "would reject its signed messages"
            )
            checks.append(Check(name, False, detail, _init_command(site, state_dir)))
        else:
            checks.append(Check(name, True, f"{site.keys} match the registry"))
    return checks


def check_site_data(config: FederationConfig, sites: Iterable[SiteEntry]) -> list[Check]:
    """Each local site's data loads as the site loads it; labels lie in ``[0, n_classes)``."""
    from fl_components.federation import Site, dataset_info

    try:
        info = dataset_info(config)
    except FedpipeError as error:
        return [Check("site data", False, str(error), "fix the federation config's data section")]
    checks = []
    for site in sites:
        name = f"site {site.name}: data"
        if site.data is None:
            checks.append(Check(name, True, "not on this host (not checked)"))
            continue
        try:  # through the task, as the site loads it (the built-in one: the data contract)
            data = Site(name=site.name, folder=site.data, config=config, info=info)
            loaded = data.load_task_data()
        except FedpipeError as error:
            fix = f"fix the files named, then `fedpipe doctor` again (folder {site.data})"
            checks.append(Check(name, False, str(error), fix))
            continue
        except Exception as error:  # the user's task's load_data failed
            fix = f"fix the task's load_data or the files in {site.data}"
            checks.append(Check(name, False, f"{type(error).__name__}: {error}", fix))
            continue
        train, test = len(loaded.train), len(loaded.test)  # type: ignore[arg-type]
        detail = f"{train} train / {test} test rows in {site.data}"
        checks.append(Check(name, True, detail))
    return checks


def check_budgets(config: FederationConfig, sites: Iterable[SiteEntry]) -> list[Check]:
    """Each local site's privacy budget left (its ledger, as ``fedpipe budget`` reads it)."""
    from fl_components.errors import ConfigError
    from fl_components.privacy.ledger import LEDGER_FILE, PrivacyLedger

    checks = []
    for site in sites:
        name = f"site {site.name}: budget"
        if site.data is None:
            continue
        path = site.data / LEDGER_FILE
        limit = config.privacy.max_epsilon
        if not path.is_file():
            if not config.privacy.record_level:
                checks.append(Check(name, True, "no ledger: record-level DP is off"))
                continue
            allowance = "unlimited" if limit is None else f"{limit:g} left (max_epsilon)"
            checks.append(Check(name, True, f"no DP round yet; {allowance}"))
            continue
        try:
            ledger = PrivacyLedger.load(path)
        except (ConfigError, ValueError, KeyError) as error:
            checks.append(Check(name, False, f"{path}: {error}", f"fedpipe budget {site.data}"))
            continue
        delta = ledger.delta or config.privacy.delta or 1e-5
        spent_eps = ledger.epsilon(delta)
        left = ledger.remaining(delta)
        detail = f"epsilon {spent_eps:.3f} spent at delta {delta:g}"
        if left is None:
            checks.append(Check(name, True, f"{detail}; no limit"))
        elif left <= 0:
            fix = (
                f"the site's budget is spent (`fedpipe budget {site.data}`): it declines every "
                "DP round; leave it out of the federation, or the site raises its max_epsilon"
            )
            checks.append(Check(name, False, f"{detail} of {ledger.max_epsilon:g}: none left", fix))
        else:
            checks.append(Check(name, True, f"{detail}; {left:.3f} of {ledger.max_epsilon:g} left"))
    return checks


def _sites_from_record(record: Mapping[str, Any]) -> list[SiteEntry]:
    entries = []
    for name, entry in record.get("sites", {}).items():
        entries.append(
            SiteEntry(
                name=name,
                pool=entry["pool"],
                data=Path(entry["data"]) if entry.get("data") else None,
                keys=Path(entry["keys"]) if entry.get("keys") not in (None, "None") else None,
            )
        )
    return entries


def _sites_from_server(client: Any) -> list[SiteEntry]:
    """Sites as the server knows them: the participant deployments and their pools."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deployments = client.read_deployments(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[PARTICIPANT_FLOW]))
    )
    return sorted(
        (SiteEntry(name=d.name, pool=d.work_pool_name or "") for d in deployments),
        key=lambda s: s.name,
    )


def _coordinator_config(client: Any) -> FederationConfig | None:
    """The federation the ``federated-training`` deployment runs, if the server has one."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name("federated-training/federated-training")
    except ObjectNotFound:
        return None
    raw = (deployment.parameters or {}).get("config")
    return FederationConfig.model_validate(raw) if raw else None


def diagnose(*, state_dir: Path, api_url: str | None = None) -> list[Check]:
    """Every check of the deployment at ``state_dir`` (or at ``api_url``), in table order.

    ``api_url`` (``PREFECT_API_URL``) overrides the state file's Prefect API.
    """
    import json

    state_file = state_dir / "stack.json"
    record = json.loads(state_file.read_text()) if state_file.is_file() else None
    running = record is not None and bool(record.get("processes"))
    if api_url is None and not running:
        where = (
            f"the stack recorded under {state_dir} is stopped"
            if record is not None
            else f"no stack is recorded under {state_dir}"
        )
        return [
            Check(
                "deployment",
                False,
                f"{where}, and PREFECT_API_URL is not set",
                "fedpipe up (or set PREFECT_API_URL to your Prefect server's API)",
            )
        ]
    api = (api_url or (record or {})["prefect_api_url"]).rstrip("/")
    # a recorded stack whose server died: `fedpipe up` refuses while the stack runs
    start = (
        f"fedpipe up --repair --state-dir {state_dir}"
        if api_url is None
        else f"start the Prefect server behind {api}"
    )
    checks = check_stack_processes(record, fix=start) if running and record else []
    checks += check_prefect(api, fix=start)
    config = _record_config(state_dir) if running else None
    sites = _sites_from_record(record) if running and record is not None else []
    serving = ("postgres", "prefect-server", "prefect api")  # what the questions below need
    if all(check.ok for check in checks if check.name in serving):
        ours = running and api == str((record or {}).get("prefect_api_url", "")).rstrip("/")
        sites, config, found = _server_checks(
            state_dir,
            api,
            ours=ours,
            record=record if running else None,
            sites=sites,
            config=config,
        )
        checks += found
    mlflow = (record or {}).get("mlflow_url") if running else None
    mlflow = mlflow or os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow is None and config is not None:
        mlflow = config.tracking.tracking_uri
    repair = f"fedpipe up --repair --state-dir {state_dir}"
    checks.append(check_mlflow(mlflow, fix=repair if running else "start the MLflow server"))
    if running and record is not None and record.get("auth"):
        checks += check_auth(record, state_dir)
    local = [s for s in sites if s.data is not None or s.keys is not None]
    if config is not None and local:
        checks += _local_site_checks(config, local, state_dir)
    return checks


def _server_checks(
    state_dir: Path,
    api: str,
    *,
    ours: bool,
    record: dict[str, Any] | None,
    sites: list[SiteEntry],
    config: FederationConfig | None,
) -> tuple[list[SiteEntry], FederationConfig | None, list[Check]]:
    """Ask the Prefect server for the sites and config not known yet; check each site's worker.

    The stack's credentials go to the stack's own server only (``ours``).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ops.stack.credentials import prefect_settings

    checks: list[Check] = []
    updates = prefect_settings(state_dir, api) if ours else {PREFECT_API_URL: api}
    try:
        with temporary_settings(updates=updates), get_client(sync_client=True) as client:
            return _ask_server(client, record, sites, config, state_dir)
    except (PrefectHTTPStatusError, httpx.HTTPError) as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        found = f"HTTP {status}" if status else type(error).__name__
        fix = f"look at the Prefect server's log; fedpipe up --repair --state-dir {state_dir}"
        why = f"{api} answers its health probe but not a request ({found}): its database?"
        checks.append(Check("prefect requests", False, why, fix))
        return sites, config, checks


def _ask_server(
    client: Any,
    record: dict[str, Any] | None,
    sites: list[SiteEntry],
    config: FederationConfig | None,
    state_dir: Path,
) -> tuple[list[SiteEntry], FederationConfig | None, list[Check]]:
    """The sites and config the server knows, and each site's worker."""
    checks: list[Check] = []
    if not sites:
        sites = _sites_from_server(client)
    if config is None:
        config = _coordinator_config(client)
    if not sites:
        checks.append(
            Check("sites", False, "no site is enrolled", "fedpipe site init NAME --data PATH")
        )
    checks += check_site_workers(client, sites, record=record, state_dir=state_dir)
    return sites, config, checks


def _local_site_checks(
    config: FederationConfig, local: list[SiteEntry], state_dir: Path
) -> list[Check]:
    """What can be checked of the sites on this host: keys, data, privacy budgets."""
    from fl_components.secure_aggregation.site_stages import registry_path

    checks: list[Check] = []
    if config.secure_aggregation.enabled or registry_path(config).is_file():
        checks += check_keys(registry_path(config), local, state_dir=state_dir)
    checks += check_site_data(config, local)
    checks += check_budgets(config, local)
    return checks


def _record_config(state_dir: Path) -> FederationConfig | None:
    path = state_dir / "federation.json"
    if not path.is_file():
        return None
    return FederationConfig.model_validate_json(path.read_text())
