"""PostgreSQL for the stack's Prefect server: a cluster ``fedpipe up`` keeps in its state folder.

SQLite takes one writer at a time; with a few sites' workers sending heartbeats, runs being
created and the UI open, the Prefect server on SQLite logs "database is locked" and answers
some requests with 503 (``benchmarks/stack_load.py`` counts them). So ``fedpipe up`` runs the
Prefect server on PostgreSQL when PostgreSQL's programs are on this host
(``--database auto``, the default): one cluster per state folder under
``<state>/postgres/data``, listening on 127.0.0.1 only, started and stopped with the stack
like its other processes. Its password is made once and kept in ``credentials.json`` (0600)
with the stack's other secrets; it reaches the Prefect server through its environment only.

When the programs are missing (or, run as root, the ``postgres`` user cannot reach the state
folder), ``auto`` falls back to SQLite and ``up`` says why; ``--database postgresql`` fails
instead, and ``--database-url`` points at a PostgreSQL server you run yourself.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ops.stack.state import StackError

POSTGRES_DIR = "postgres"
DB_USER = "fedpipe"
DB_NAME = "prefect"
PROGRAMS = ("initdb", "postgres", "createdb", "pg_isready")
# a throwaway-grade cluster would turn fsync off; this one holds the stack's run history,
# so only the commit wait is relaxed (a crash loses at most the last few transactions)
SERVER_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "synchronous_commit=off",
    "max_connections=100",
    "shared_buffers=64MB",
)


class PostgresUnusable(StackError):
    """PostgreSQL cannot serve this stack here (not installed, or not reachable as root)."""


def find_bindir() -> Path | None:
    """A folder with PostgreSQL's server programs: on PATH, else Debian's newest version."""
    candidates = []
    if (on_path := shutil.which("initdb")) is not None:
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql")
    versions = [p for p in debian.glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if all((folder / program).is_file() for program in PROGRAMS):
            return folder
    return None


@dataclass(frozen=True)
class Cluster:
    """The stack's PostgreSQL cluster: its programs and its folders."""

    bindir: Path
    root: Path  # <state>/postgres

    @property
    def data(self) -> Path:
        """The cluster's data folder (``initdb``'s)."""
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        """Where the server puts its Unix socket (not /run: it may not be writable)."""
        return self.root / "run"

    def as_owner(self, command: list[str]) -> list[str]:
        """``command`` run as the cluster's owner: PostgreSQL refuses to run as root."""
        if os.geteuid() != 0:
            return command
        return ["runuser", "-u", "postgres", "--", *command]

    def server_command(self, port: int) -> list[str]:
        """The ``postgres`` server on ``port`` (127.0.0.1 and a socket under the state folder)."""
        settings = [arg for setting in SERVER_SETTINGS for arg in ("-c", setting)]
        return self.as_owner(
            [
                str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(port),
                "-k", str(self.sockets), *settings,
            ]
        )  # fmt: skip

    def url(self, port: int, password: str) -> str:
        """The Prefect server's database URL (it holds the password: environment only)."""
        return f"postgresql+asyncpg://{DB_USER}:{password}@127.0.0.1:{port}/{DB_NAME}"


def cluster_for(state_root: Path) -> Cluster:
    """The cluster of the stack at ``state_root``.

    Raises
    ------
    PostgresUnusable
        If PostgreSQL's programs are not on this host, or (as root) there is no ``postgres``
        user or ``runuser``.
    """
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnusable(
            "PostgreSQL's programs (initdb, postgres, createdb, pg_isready) are not on this "
            "host: install them (Debian/Ubuntu: `apt-get install postgresql`), give a server "
            "of your own with --database-url postgresql+asyncpg://..., or choose "
            "--database sqlite"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnusable(
                "running as root, PostgreSQL needs a `postgres` user to run as, and there is "
                "none: run fedpipe as an ordinary user, or choose --database sqlite"
            ) from None
        if shutil.which("runuser") is None:
            raise PostgresUnusable("running as root, PostgreSQL needs `runuser` (util-linux)")
    return Cluster(bindir=bindir, root=state_root / POSTGRES_DIR)


def initialise(cluster: Cluster, password: str) -> bool:
    """Make the cluster's data folder once (``initdb``); whether it was made now.

    Raises
    ------
    PostgresUnusable
        If (as root) the ``postgres`` user cannot reach the state folder, or initdb fails.
    """
    cluster.sockets.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for folder in (cluster.root, cluster.sockets):
            shutil.chown(folder, "postgres", "postgres")
        reach = subprocess.run(
            cluster.as_owner(["test", "-w", str(cluster.root)]), capture_output=True, check=False
        )
        if reach.returncode != 0:
            raise PostgresUnusable(
                f"the `postgres` user (PostgreSQL will not run as root) cannot enter "
                f"{cluster.root}: a folder above it is closed to other users (mode 0700?). "
                "Choose a --state-dir under a folder others may enter, run fedpipe as an "
                "ordinary user, or choose --database sqlite"
            )
    if (cluster.data / "PG_VERSION").is_file():
        return False
    password_file = cluster.root / "initdb.pw"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(password_file, "postgres", "postgres")
    try:
        done = subprocess.run(
            cluster.as_owner(
                [
                    str(cluster.bindir / "initdb"), "-D", str(cluster.data), "-U", DB_USER,
                    "--pwfile", str(password_file), "--auth-local", "scram-sha-256",
                    "--auth-host", "scram-sha-256", "--encoding", "UTF8",
                ]
            ),
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        password_file.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(cluster.data, ignore_errors=True)
        raise PostgresUnusable(f"initdb failed for {cluster.data}: {done.stderr.strip()[-500:]}")
    return True


def wait_ready(
    cluster: Cluster, port: int, *, alive: Callable[[], bool], timeout: float = 60.0
) -> None:
    """Wait until the server accepts connections (``alive``: whether its process still runs).

    Raises
    ------
    StackError
        If the server exits or does not answer within ``timeout`` seconds.
    """
    ready = [str(cluster.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"]
    deadline = time.monotonic() + timeout
    while subprocess.run(ready, capture_output=True, check=False).returncode != 0:
        if not alive() or time.monotonic() > deadline:
            log = cluster.root.parent / "logs" / "postgres.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.is_file() else []
            raise StackError(
                f"PostgreSQL did not start on 127.0.0.1:{port}; its log {log} ends:\n"
                + "\n".join(tail)
            )
        time.sleep(0.3)


def ensure_database(cluster: Cluster, port: int, password: str) -> None:
    """Create the Prefect database unless it exists.

    Raises
    ------
    StackError
        If ``createdb`` fails for another reason than the database existing.
    """
    marker = cluster.root / "database-made"
    if marker.is_file():
        return
    env = {**os.environ, "PGPASSWORD": password}  # the child's environment only
    done = subprocess.run(
        [str(cluster.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
         DB_NAME],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    if done.returncode != 0 and "already exists" not in done.stderr:
        raise StackError(f"could not create the Prefect database: {done.stderr.strip()}")
    marker.write_text("")
