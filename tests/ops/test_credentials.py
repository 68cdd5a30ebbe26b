"""The stack's credentials file: generated secrets, 0600 from the first byte, refused when
others may read it (unit tests; tests/deploy/test_auth.py plays the attacker on a stack)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fl_components.errors import FedpipeError
from ops.stack.credentials import (
    client_env,
    credentials_path,
    ensure_credentials,
    load_credentials,
    mlflow_server_env,
)


def test_generated_once_private_and_extended_for_new_sites(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path, ["north", "south"])
    path = credentials_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = ensure_credentials(tmp_path, ["north", "south", "east"])
    assert again.prefect_auth_string == first.prefect_auth_string
    assert again.sites["north"] == first.sites["north"]
    assert again.sites["east"].username == "site-east"
    assert len(set(again.secrets())) == len(again.secrets())  # all distinct
    assert all(len(secret) >= 32 for secret in again.secrets())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_readable_credentials_file_is_refused(tmp_path: Path) -> None:
    ensure_credentials(tmp_path, ["north"])
    os.chmod(credentials_path(tmp_path), 0o644)
    with pytest.raises(FedpipeError, match="chmod 600"):
        load_credentials(tmp_path)


def test_secrets_go_by_environment_not_config(tmp_path: Path) -> None:
    credentials = ensure_credentials(tmp_path, ["north"])
    env = mlflow_server_env(tmp_path, credentials)
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert not any(secret in ini.read_text() for secret in credentials.secrets())
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == credentials.admin.password
    assert client_env(credentials)["MLFLOW_TRACKING_USERNAME"] == "coordinator"
    assert client_env(None) == {}
