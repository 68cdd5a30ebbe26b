"""Prefect's empty database, made once and copied into fresh folders (ops/servers/schema.py).

A fresh folder's temporary server must start from the template (no migrations), a folder
with a database keeps its own, and the template holds no run nor any server's own setting.
The command-line exit without teardown must keep the exit code, the output and the exit
handlers' work.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ops.servers import schema

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    return tmp_path / "cache"


def _database(path: Path, rows: dict[str, list[tuple[str, str]]]) -> Path:
    with sqlite3.connect(path) as db:
        for table, values in rows.items():
            db.execute(f"CREATE TABLE {table} (key TEXT, value TEXT)")
            db.executemany(f"INSERT INTO {table} VALUES (?, ?)", values)
    return path


def test_the_template_is_copied_only_into_a_folder_without_a_database(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    assert not schema.seed(fresh)  # no template yet: the server migrates, as Prefect does
    cache.mkdir()
    _database(schema.template_path(), {"alembic_version": [("head", "x")]})
    used.mkdir()
    (used / schema.DATABASE).write_bytes(b"this folder's own runs")

    assert schema.seed(fresh)
    assert not schema.seed(used)

    assert (fresh / schema.DATABASE).read_bytes() == schema.template_path().read_bytes()
    assert (used / schema.DATABASE).read_bytes() == b"this folder's own runs"
    assert [p.name for p in fresh.iterdir()] == [schema.DATABASE]  # no partial file left
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://h/db")
    assert not schema.seed(tmp_path / "elsewhere")  # the server's database is not a file here


def test_the_snapshot_is_written_once_without_the_servers_own_settings(
    cache: Path, tmp_path: Path
) -> None:
    live = _database(
        tmp_path / "prefect.db",
        {"block_type": [("secret", "schema")], "configuration": [("ENCRYPTION_KEY", "k1")]},
    )

    written = schema.snapshot(live)

    assert written == schema.template_path()
    with sqlite3.connect(written) as db:
        assert db.execute("SELECT * FROM block_type").fetchall() == [("secret", "schema")]
        assert db.execute("SELECT * FROM configuration").fetchall() == []
    before = written.read_bytes()
    _database(tmp_path / "other.db", {"flow_run": [("a run", "x")]})
    assert schema.snapshot(tmp_path / "other.db") is None  # the first one stays
    assert written.read_bytes() == before
    assert sorted(p.name for p in cache.iterdir()) == [written.name]


@pytest.mark.slow
def test_a_fresh_folders_server_starts_from_the_first_ones_database(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first server in a fresh folder leaves the template; the next fresh folder's
    server is seeded from it, answers, and has none of the first one's runs."""
    from ops.servers.temporary import TemporaryServer

    homes = []
    for name in ("first", "second"):
        monkeypatch.setenv("PREFECT_HOME", str(tmp_path / name))
        server = TemporaryServer.start(tmp_path / name / "server.log")
        homes.append(tmp_path / name)
        try:
            server.wait_ready(timeout=300)
            assert server.keep_as_template == (name == "first")
            if name == "first":
                assert schema.template_path().is_file()
                with sqlite3.connect(homes[0] / schema.DATABASE) as db:  # a run, after it
                    db.execute("CREATE TABLE IF NOT EXISTS marker (x TEXT)")
        finally:
            server.stop()
    with sqlite3.connect(schema.template_path()) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "alembic_version" in tables and "marker" not in tables
        assert db.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)


def test_the_cli_exit_keeps_code_output_and_exit_handlers(tmp_path: Path) -> None:
    """Without the interpreter's teardown, still: the code, the printed lines, a thread
    pool's last task, and the atexit handlers (logging's flush among them)."""
    marker = tmp_path / "atexit.txt"
    pooled = tmp_path / "pool.txt"
    script = f"""
import atexit, logging, time
from concurrent.futures import ThreadPoolExecutor
import torch  # what makes the CLI skip the teardown
from ops.cli.main import _exit_without_teardown
logging.basicConfig(filename={str(tmp_path / "log.txt")!r}, level=logging.INFO)
logging.info("logged")
atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
pool = ThreadPoolExecutor(1)
pool.submit(lambda: (time.sleep(0.5), open({str(pooled)!r}, "w").write("done")))
print("last line", flush=False)
_exit_without_teardown(3)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "last line\n"
    assert marker.read_text() == "ran"
    assert pooled.read_text() == "done"
    assert "logged" in (tmp_path / "log.txt").read_text()
