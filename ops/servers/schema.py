"""A Prefect database with its schema already made, so that a fresh folder's server starts fast.

A temporary Prefect server in a fresh ``PREFECT_HOME`` first runs all of Prefect's database
migrations: ~6 s of a 9 s start on this machine, in every new folder, for the same empty
schema. fedpipe keeps one copy of that empty, migrated database per Prefect version in the
user's cache (``$FEDPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedpipe``, else
``~/.cache/fedpipe``) and copies it into a fresh folder before the server starts; the server
still checks the schema at its start (migrations up to date: nothing to do).

The copy is made once: by ``make`` (``fedpipe server prepare``, with the environment),
or else from the first fresh server that came up, right after its start and before any run
wrote to it (SQLite's online backup: a consistent snapshot). It holds no run, flow, log or
credential: only what every new Prefect server writes for itself.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

DATABASE = "prefect.db"  # the file Prefect's default SQLite URL names under PREFECT_HOME


def cache_dir() -> Path:
    """Where the template lives (created on demand)."""
    if os.environ.get("FEDPIPE_CACHE_DIR"):
        return Path(os.environ["FEDPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedpipe"


def template_path() -> Path:
    """The template for the installed Prefect version (its migrations are fixed by it)."""
    version = importlib.metadata.version("prefect")
    return cache_dir() / f"prefect-{version}-schema.db"


def prefect_home() -> Path:
    """The folder whose ``prefect.db`` a server started from this process would use."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


def uses_default_database() -> bool:
    """Whether the server will use ``PREFECT_HOME/prefect.db`` (no database URL set)."""
    return not os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") and not os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    )


def seed(home: Path) -> bool:
    """Copy the template into ``home`` if it has no database yet; whether it did.

    Nothing happens when the folder has a database already, when a database URL points
    elsewhere, or when there is no template (the server then migrates, as Prefect does).
    """
    target = home / DATABASE
    template = template_path()
    if target.exists() or not uses_default_database() or not template.is_file():
        return False
    home.mkdir(parents=True, exist_ok=True)
    partial = home / f".{DATABASE}.seeding"
    try:
        shutil.copyfile(template, partial)
        os.replace(partial, target)
    except OSError:  # a full disk, a read-only cache: the server makes its own
        partial.unlink(missing_ok=True)
        return False
    return True


def snapshot(database: Path) -> Path | None:
    """Save ``database`` (a server's, freshly started) as the template unless one exists.

    Uses SQLite's online backup, consistent while the server runs; written under a temporary
    name and renamed, so a reader never sees half a file. Returns the template's path when
    this call wrote it; ``None`` when it existed already or could not be written (the cache
    is optional: nothing fails for want of it).
    """
    template = template_path()
    if template.is_file() or not database.is_file():
        return None
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=template.parent, suffix=".partial")
        os.close(handle)
        source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        with contextlib.closing(source) as src, contextlib.closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
            _forget_instance_settings(dst)
        os.replace(partial, template)
    except (OSError, sqlite3.Error):
        with contextlib.suppress(NameError, OSError):
            os.unlink(partial)
        return None
    return template


def _forget_instance_settings(database: sqlite3.Connection) -> None:
    """Drop the server's own settings from the copy: each folder's server makes its own.

    Prefect keeps e.g. its block encryption key in ``configuration``.
    """
    tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master")}
    if "configuration" in tables:
        database.execute("DELETE FROM configuration")
        database.commit()
