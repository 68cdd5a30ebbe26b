"""The stack's credentials: who may talk to its Prefect and MLflow servers, and as whom.

``fedpipe up`` generates them once per state folder (``credentials.json``, mode 0600, never
printed or logged) and passes them to the processes it starts through their environment:

- Prefect's API takes one basic-auth string (``PREFECT_SERVER_API_AUTH_STRING`` on the
  server, ``PREFECT_API_AUTH_STRING`` on every client and worker); without it, 401.
- MLflow runs its ``basic-auth`` app: an ``admin`` (only ``up`` and ``doctor`` use it) creates
  the users; ``coordinator`` writes runs, registers models and moves their aliases;
  ``reader`` and one ``site-<name>`` user per site may read only (the default permission
  is READ, and each existing experiment and registered model is granted READ to them
  explicitly); anonymous requests get 401.

Everything that talks to the stack from this host (``fedpipe run`` against it, its workers,
``doctor``, the deploy tests) reads them from the state folder: :func:`load_credentials`.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from ops.stack.state import StackError

CREDENTIALS_FILE = "credentials.json"
MLFLOW_AUTH_INI = "mlflow-auth.ini"
MLFLOW_AUTH_DB = "mlflow-auth.db"
PREFECT_USER = "fedpipe"
ADMIN_USER = "admin"
COORDINATOR_USER = "coordinator"
READER_USER = "reader"


class UserCredentials(BaseModel):
    """One MLflow user's name and password."""

    model_config = ConfigDict(frozen=True)

    username: str
    password: str


class StackCredentials(BaseModel):
    """Every secret of one stack; kept only in ``<state>/credentials.json`` (0600)."""

    model_config = ConfigDict(frozen=True)

    prefect_auth_string: str
    mlflow_secret_key: str
    admin: UserCredentials
    coordinator: UserCredentials
    reader: UserCredentials
    sites: dict[str, UserCredentials]
    # the stack's own PostgreSQL cluster (ops.stack.postgres), made when first needed
    database_password: str | None = None

    def site(self, name: str) -> UserCredentials:
        """Site ``name``'s read-only MLflow user."""
        try:
            return self.sites[name]
        except KeyError:
            raise StackError(
                f"site {name!r} has no MLflow user in this stack's credentials; enrol it with "
                f"`fedpipe site init {name} --data PATH`"
            ) from None

    def secrets(self) -> list[str]:
        """Every secret value (what must appear in no log, config or parameter)."""
        users = [self.admin, self.coordinator, self.reader, *self.sites.values()]
        found = [self.prefect_auth_string, self.mlflow_secret_key, *(u.password for u in users)]
        return found + ([self.database_password] if self.database_password else [])


def _password() -> str:
    return secrets.token_urlsafe(24)


def _user(name: str) -> UserCredentials:
    return UserCredentials(username=name, password=_password())


def site_user(site: str) -> str:
    """The MLflow user name of site ``site``."""
    return f"site-{site}"


def generate_credentials(sites: Iterable[str]) -> StackCredentials:
    """Fresh random credentials for a stack with ``sites``."""
    return StackCredentials(
        prefect_auth_string=f"{PREFECT_USER}:{_password()}",
        mlflow_secret_key=secrets.token_hex(32),
        admin=_user(ADMIN_USER),
        coordinator=_user(COORDINATOR_USER),
        reader=_user(READER_USER),
        sites={site: _user(site_user(site)) for site in sites},
    )


def credentials_path(root: Path) -> Path:
    """Where a stack's credentials live."""
    return root / CREDENTIALS_FILE


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def save_credentials(root: Path, credentials: StackCredentials) -> Path:
    """Write ``credentials.json`` (0600) under ``root``."""
    path = credentials_path(root)
    write_private(path, credentials.model_dump_json(indent=2) + "\n")
    return path


def load_credentials(root: Path) -> StackCredentials | None:
    """The credentials of the stack at ``root``; None for a stack started without them.

    Raises
    ------
    StackError
        If the file is readable by others than its owner, or is not a credentials file.
    """
    path = credentials_path(root.resolve())
    if not path.is_file():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StackError(
            f"{path}: mode {mode:04o} lets others read the stack's credentials; make it the "
            f"owner's only: `chmod 600 {path}` (and consider `fedpipe down`/`up` to rotate them)"
        )
    try:
        return StackCredentials.model_validate_json(path.read_text())
    except ValueError:
        raise StackError(
            f"{path} is not a fedpipe credentials file; remove it and run `fedpipe up` again "
            "(new credentials are generated)"
        ) from None


def ensure_credentials(root: Path, sites: Iterable[str]) -> StackCredentials:
    """The stack's credentials: those saved under ``root`` (plus any new site), else new ones."""
    sites = list(sites)
    current = load_credentials(root)
    if current is None:
        current = generate_credentials(sites)
    missing = [s for s in sites if s not in current.sites]
    if missing or not credentials_path(root).is_file():
        extra = {s: _user(site_user(s)) for s in missing}
        current = current.model_copy(update={"sites": {**current.sites, **extra}})
        save_credentials(root, current)
    return current


def ensure_database_password(root: Path) -> str:
    """The password of the stack's PostgreSQL cluster: made once, kept with its credentials.

    Raises
    ------
    StackError
        If the stack has no credentials yet (``fedpipe up`` makes them first).
    """
    current = load_credentials(root)
    if current is None:
        raise StackError(f"no credentials under {root}; start the stack with `fedpipe up`")
    password = current.database_password
    if password is None:
        password = _password()
        save_credentials(root, current.model_copy(update={"database_password": password}))
    return password


def prefect_client_env(credentials: StackCredentials | None) -> dict[str, str]:
    """What a Prefect client or worker of the stack needs in its environment."""
    if credentials is None:
        return {}
    return {"PREFECT_API_AUTH_STRING": credentials.prefect_auth_string}


def mlflow_client_env(user: UserCredentials | None) -> dict[str, str]:
    """What an MLflow client acting as ``user`` needs in its environment."""
    if user is None:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": user.username, "MLFLOW_TRACKING_PASSWORD": user.password}


def client_env(credentials: StackCredentials | None) -> dict[str, str]:
    """The environment of a client acting as the coordinator (Prefect and MLflow)."""
    if credentials is None:
        return {}
    return {**prefect_client_env(credentials), **mlflow_client_env(credentials.coordinator)}


@contextmanager
def stack_client_env(root: Path) -> Iterator[StackCredentials | None]:
    """The coordinator's client credentials of the stack at ``root``, in ``os.environ``.

    Set for the block and restored after; Prefect settings made in it pick them up.
    """
    credentials = load_credentials(root)
    env = client_env(credentials)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield credentials
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def prefect_settings(root: Path, api_url: str) -> dict[Any, str]:
    """``temporary_settings`` updates for a Prefect client of the stack at ``root``."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    updates: dict[Any, str] = {PREFECT_API_URL: api_url}
    credentials = load_credentials(root)
    if credentials is not None:
        updates[PREFECT_API_AUTH_STRING] = credentials.prefect_auth_string
    return updates


def prefect_auth(root: Path) -> httpx.BasicAuth | None:
    """Basic auth for a raw HTTP call to the stack's Prefect API (None: no auth)."""
    credentials = load_credentials(root)
    if credentials is None:
        return None
    user, _, password = credentials.prefect_auth_string.partition(":")
    return httpx.BasicAuth(user, password)


def mlflow_server_env(root: Path, credentials: StackCredentials) -> dict[str, str]:
    """The MLflow server's auth settings.

    The app's config (no secret in it) and, through the environment, the admin's password
    and the session signing key.
    """
    ini = root / MLFLOW_AUTH_INI
    write_private(
        ini,
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / MLFLOW_AUTH_DB}\n"
        f"admin_username = {credentials.admin.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = true\n",
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.mlflow_secret_key,
    }


def _admin_call(
    mlflow_url: str, credentials: StackCredentials, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    auth = (credentials.admin.username, credentials.admin.password)
    return httpx.request(method, f"{mlflow_url}{path}", auth=auth, timeout=30, **kwargs)


def provision_mlflow_users(mlflow_url: str, credentials: StackCredentials) -> None:
    """Create (or update) the coordinator, reader and site users on the MLflow server.

    It grants them what they may do on the experiments and registered models that exist now:
    MANAGE for the coordinator, READ for the others (new ones default to READ; the
    coordinator manages what it creates).

    Raises
    ------
    StackError
        If the server refuses the admin or a user cannot be made.
    """
    users = [credentials.coordinator, credentials.reader, *credentials.sites.values()]
    for user in users:
        _ensure_user(mlflow_url, credentials, user)
    for resource_type, resource_id in _existing_resources(mlflow_url, credentials):
        for user in users:
            permission = "MANAGE" if user == credentials.coordinator else "READ"
            _admin_call(
                mlflow_url,
                credentials,
                "POST",
                "/api/3.0/mlflow/users/permissions/grant",
                json={
                    "username": user.username,
                    "resource_type": resource_type,
                    "resource_id": str(resource_id),
                    "permission": permission,
                },
            )


def _ensure_user(mlflow_url: str, credentials: StackCredentials, user: UserCredentials) -> None:
    """Create the MLflow user, or set its password if it exists (a stack restarted)."""
    body = {"username": user.username, "password": user.password}
    made = _admin_call(mlflow_url, credentials, "POST", "/api/2.0/mlflow/users/create", json=body)
    if made.status_code == 200:
        return
    updated = _admin_call(
        mlflow_url, credentials, "PATCH", "/api/2.0/mlflow/users/update-password", json=body
    )
    if updated.status_code != 200:
        raise StackError(
            f"the MLflow server at {mlflow_url} did not create user {user.username!r} "
            f"(HTTP {made.status_code}, then {updated.status_code} updating it); see its log "
            "under the stack's logs/mlflow-server.log"
        )


def _existing_resources(mlflow_url: str, credentials: StackCredentials) -> list[tuple[str, str]]:
    """The experiments and registered models on the server now, as permission targets."""
    found: list[tuple[str, str]] = []
    for path, key, resource_type, field in (
        ("experiments/search", "experiments", "experiment", "experiment_id"),
        ("registered-models/search", "registered_models", "registered_model", "name"),
    ):
        listed = _admin_call(
            mlflow_url,
            credentials,
            "GET",
            f"/api/2.0/mlflow/{path}",
            params={"max_results": 1000},
        ).json()
        found += [(resource_type, str(item[field])) for item in listed.get(key, [])]
    return found


def record_extra(credentials: StackCredentials) -> dict[str, Any]:
    """What ``stack.json`` says about auth (names and where, never a secret)."""
    return {
        "auth": {
            "credentials": CREDENTIALS_FILE,
            "prefect": "basic auth string",
            "mlflow_users": sorted(
                [credentials.coordinator.username, credentials.reader.username]
                + [u.username for u in credentials.sites.values()]
            ),
        }
    }


STACK_DIR_ENV = "FEDPIPE_STACK_DIR"


def adopt_stack_credentials(api_url: str) -> Path | None:
    """Give this process the client credentials of the stack serving ``api_url``.

    For ``fedpipe run`` against a stack: the coordinator's, unless the environment has
    some already. The stack is looked for in ``$FEDPIPE_STACK_DIR``, else ``state/stack``;
    returns its state folder, or None when no recorded stack serves ``api_url`` or it has
    no credentials.
    Set before Prefect is imported: its settings read the environment then.
    """
    from ops.stack.state import DEFAULT_STACK_DIR

    root = Path(os.environ.get(STACK_DIR_ENV) or DEFAULT_STACK_DIR).resolve()
    state_file = root / "stack.json"
    if not state_file.is_file():
        return None
    try:
        recorded = json.loads(state_file.read_text()).get("prefect_api_url", "")
    except ValueError:
        return None
    if str(recorded).rstrip("/") != api_url.rstrip("/"):
        return None
    credentials = load_credentials(root)
    if credentials is None:
        return None
    for key, value in client_env(credentials).items():
        os.environ.setdefault(key, value)
    return root
