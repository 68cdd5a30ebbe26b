"""A throwaway PostgreSQL cluster on 127.0.0.1 for the Prefect server (benchmarks and tests).

For a PostgreSQL server that is not the stack's own (``fedpipe up --database-url``); the
stack's own cluster is ops/stack/postgres.py. PostgreSQL comes from Debian's `postgresql`
package, installed when missing (as root, with apt-get); :class:`PostgresUnavailable` says why when it cannot be had. The cluster runs as
the `postgres` user with fsync off (it is thrown away) and is removed on exit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ops.stack.postgres import find_bindir


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed and could not be installed here."""


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}")


PG_USER = "fedpipe"
PG_DB = "prefect"


def _ensure_postgresql() -> Path:
    """The newest PostgreSQL bin folder; installs Debian's package when there is none."""
    if (bindir := find_bindir()) is not None:
        return bindir
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL is not installed and apt-get (as root) is not available"
        )
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
        if (bindir := find_bindir()) is not None:
            return bindir
    raise PostgresUnavailable(f"could not install PostgreSQL: {'; '.join(errors)}")


def _as_postgres(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a server command as the `postgres` user (initdb and postgres refuse root)."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A throwaway cluster on a free 127.0.0.1 port; yields its asyncpg URL.

    Raises
    ------
    PostgresUnavailable
        If PostgreSQL is not installed and cannot be installed here.
    """
    from ops.stack.processes import free_port

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
        _check(init, "initdb")
        port = free_port()
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = _as_postgres([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "60", "start"])
        started = start.returncode == 0
        if not started:
            raise RuntimeError(
                "pg_ctl start failed: "
                + start.stdout
                + start.stderr
                + (log.read_text() if log.exists() else "")
            )
        created = _as_postgres(
            [str(bindir / "createdb"), "-h", str(sockets), "-p", str(port), "-U", PG_USER, PG_DB],
            timeout=60,
        )
        _check(created, "createdb")
        yield f"postgresql+asyncpg://{PG_USER}:{password}@127.0.0.1:{port}/{PG_DB}"
    finally:
        if started:
            stop = _as_postgres([*pg_ctl, "-m", "fast", "-w", "stop"], timeout=60)
            _check(stop, "pg_ctl stop")
        shutil.rmtree(base, ignore_errors=True)
