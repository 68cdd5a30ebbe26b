"""The stack's own PostgreSQL cluster (ops/stack/postgres.py), without a whole stack.

Without PostgreSQL, ``auto`` falls back to SQLite and says why, ``postgresql`` refuses with
the fix; run as root, a state folder the ``postgres`` user cannot enter is refused before
anything is made. A real cluster (where PostgreSQL is installed) listens on 127.0.0.1 only,
asks every client for its password (a wrong or missing one is refused, on TCP and on its
socket), and its password lives in the stack's 0600 credentials only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.stack import postgres
from ops.stack.credentials import (
    credentials_path,
    ensure_credentials,
    ensure_database_password,
    load_credentials,
)
from ops.stack.lifecycle import _start_postgres
from ops.stack.processes import _group_members, free_port
from ops.stack.state import StackError, StackPaths


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A state folder the `postgres` user may enter (pytest's own tmp is 0700 for root)."""
    root = Path(tempfile.mkdtemp(prefix="fedpipe-pgtest-"))
    root.chmod(0o711)
    yield root / "state"
    shutil.rmtree(root, ignore_errors=True)


def _record() -> dict[str, Any]:
    return {"processes": [], "database": "sqlite"}


def test_without_postgresql_auto_falls_back_to_sqlite_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "find_bindir", lambda: None)
    ensure_credentials(tmp_path, ["a"])
    paths = StackPaths(tmp_path, tmp_path / "mlflow")
    record = _record()
    assert _start_postgres(paths, {}, record, required=False) is None
    assert record["processes"] == [] and record["database"] == "sqlite"
    assert "apt-get install postgresql" in record["database_note"]
    assert "--database sqlite" in record["database_note"]
    with pytest.raises(postgres.PostgresUnusable, match="not on this host"):
        _start_postgres(paths, {}, _record(), required=True)


def test_the_database_password_is_made_once_and_kept_with_the_credentials(tmp_path: Path) -> None:
    ensure_credentials(tmp_path, ["a"])
    password = ensure_database_password(tmp_path)
    assert ensure_database_password(tmp_path) == password
    saved = load_credentials(tmp_path)
    assert saved is not None and saved.database_password == password
    assert password in saved.secrets()  # so the no-secret-in-logs checks look for it too
    assert stat.S_IMODE(credentials_path(tmp_path).stat().st_mode) == 0o600
    with pytest.raises(StackError, match="fedpipe up"):
        ensure_database_password(tmp_path / "none")


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres user's reach matters as root only")
def test_as_root_a_closed_state_folder_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    if postgres.find_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    cluster = postgres.cluster_for(closed / "state")
    with pytest.raises(postgres.PostgresUnusable, match="cannot enter"):
        postgres.initialise(cluster, "secret")
    assert not cluster.data.exists()


def _connect(port: int, password: str | None, host: str = "127.0.0.1") -> str:
    import asyncpg

    async def attempt() -> str:
        try:
            connection = await asyncpg.connect(
                host=host, port=port, user=postgres.DB_USER, password=password,
                database=postgres.DB_NAME, timeout=10,
            )  # fmt: skip
        except (asyncpg.PostgresError, OSError) as error:
            return f"refused: {type(error).__name__}"
        try:
            return str(await connection.fetchval("SELECT current_database()"))
        finally:
            await connection.close()

    return asyncio.run(attempt())


@pytest.mark.integration
def test_a_real_cluster_asks_every_client_for_its_password(open_root: Path) -> None:
    if postgres.find_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    open_root.mkdir()
    ensure_credentials(open_root, ["a"])
    paths = StackPaths(open_root, open_root / "mlflow")
    record = _record()
    url = _start_postgres(paths, {**os.environ}, record, required=True)
    process = record["processes"][0]
    try:
        password = ensure_database_password(open_root)
        port = record["postgres"]["port"]
        assert url == f"postgresql+asyncpg://fedpipe:{password}@127.0.0.1:{port}/prefect"
        assert password not in str(record)  # the record (stack.json) holds no secret
        assert _connect(port, password) == "prefect"
        assert _connect(port, "wrong").startswith("refused")
        assert _connect(port, None).startswith("refused")
        sockets = str(postgres.cluster_for(open_root).sockets)
        assert _connect(port, None, host=sockets).startswith("refused")  # no trust locally
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=False)
        ours = [line for line in listening.stdout.splitlines() if f":{port} " in line]
        assert ours and all("127.0.0.1:" in line for line in ours), ours
        log = Path(process["log"]).read_text()
        assert password not in log
    finally:
        os.killpg(process["pgid"], 15)
        _wait_stopped(process)
    # a second start finds the cluster made: no initdb, the same password, the same data
    again = _record()
    url = _start_postgres(paths, {**os.environ}, again, required=True, port=free_port())
    try:
        assert url is not None and _connect(again["postgres"]["port"], password) == "prefect"
    finally:
        os.killpg(again["processes"][0]["pgid"], 15)
        _wait_stopped(again["processes"][0])


def _wait_stopped(process: dict[str, Any]) -> None:
    for _ in range(200):
        if not _group_members(process["pgid"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"{process} still runs 20 s after SIGTERM")


def test_the_spawned_server_command_runs_as_postgres_when_root(tmp_path: Path) -> None:
    cluster = postgres.Cluster(bindir=Path("/pg/bin"), root=tmp_path / "postgres")
    command = cluster.server_command(5433)
    if os.geteuid() == 0:
        assert command[:4] == ["runuser", "-u", "postgres", "--"]
    assert "listen_addresses=127.0.0.1" in command
