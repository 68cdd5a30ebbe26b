"""Finding the task a config names, and the identity of its code.

``task: my_clinic.fl:task`` names a module importable where the site runs (installed in its
environment, never a file a job points at) and an attribute of it: a task object, or a class
or function that makes one when called with no arguments. Without ``task`` the built-in
task of ``model.kind`` runs (:mod:`fl_components.task.builtin`).

The identity of the code that touches a site's data is its package's name, its installed
version and a SHA-256 over its source files (every ``.py`` file of the top-level package,
by relative path and content). It is logged to MLflow, carried in the signed site job and
written into the site's audit log and privacy ledger; a site's policy may pin the hash.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_components.config import FederationConfig
from fl_components.data.check import dataset_info
from fl_components.data.types import DatasetInfo
from fl_components.errors import ConfigError
from fl_components.task.builtin import BuiltinTask
from fl_components.task.protocol import BoundTask

BUILTIN_PREFIX = "builtin:"
_FIRST_PARTY = Path(__file__).resolve().parents[1]  # fl_components/
_BUILTIN_SOURCES = ("task", "site/models.py", "data")
_IDENTITIES: dict[str, TaskIdentity] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class TaskIdentity:
    """Which code a task is: its spec, package, installed version and source hash."""

    spec: str
    package: str
    version: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        """The identity as plain strings (MLflow params, the job message, audit entries)."""
        return {
            "spec": self.spec,
            "package": self.package,
            "version": self.version,
            "sha256": self.sha256,
        }


def task_spec(config: FederationConfig) -> str:
    """The config's task: its ``task`` field, or ``builtin:<model.kind>``."""
    return config.task if config.task is not None else f"{BUILTIN_PREFIX}{config.model.kind}"


def import_task(spec: str) -> Any:
    """The object ``module:attribute`` names, made by calling it when it is a factory.

    Raises
    ------
    ConfigError
        Naming the module or attribute that is missing and how to make it importable.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"task: cannot import module {module_name!r} (from task {spec!r}): {error}. "
            f"Install the package that provides it where this site runs (`pip install "
            f"<your-package>` in the site's environment), or put its folder on PYTHONPATH; "
            "a task is named by module, never by file path"
        ) from None
    except Exception as error:  # the user's module failed while importing
        raise ConfigError(
            f"task: importing module {module_name!r} (from task {spec!r}) failed: "
            f"{type(error).__name__}: {error}; fix the module, then `fedpipe validate` again"
        ) from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"task: module {module_name!r} has no attribute {attribute!r} (task {spec!r}); "
            f"define it there, or name the right one as 'module:attribute'"
        ) from None
    if not callable(getattr(found, "build_model", None)) and callable(found):
        found = found()  # a class or factory of the task
    return found


def resolve_task(config: FederationConfig, info: DatasetInfo | None = None) -> BoundTask:
    """The config's task, with fedpipe's defaults for what it leaves out."""
    if config.task is None:
        info = dataset_info(config) if info is None else info
        return BoundTask(BuiltinTask(config, info), spec=task_spec(config))
    return BoundTask(import_task(config.task), spec=config.task)


def task_identity(config: FederationConfig) -> TaskIdentity:
    """The identity of the config's task code, computed once per process and spec."""
    return identity_of(task_spec(config))


def identity_of(spec: str) -> TaskIdentity:
    """The identity of the task ``spec`` names (``module:attribute`` or ``builtin:<kind>``).

    Computed once per process and spec: the hash is of the code this process imported.

    Raises
    ------
    ConfigError
        When the task cannot be imported here (naming the module and the fix).
    """
    with _LOCK:
        known = _IDENTITIES.get(spec)
    if known is not None:
        return known
    if spec.startswith(BUILTIN_PREFIX):
        identity = TaskIdentity(
            spec=spec,
            package="fedpipe",
            version=_version("fedpipe"),
            sha256=_hash_files(_FIRST_PARTY, [_FIRST_PARTY / p for p in _BUILTIN_SOURCES]),
        )
    else:
        import_task(spec)  # a clear error when it cannot be imported
        identity = _identity_of(spec)
    with _LOCK:
        _IDENTITIES[spec] = identity
    return identity


def _identity_of(spec: str) -> TaskIdentity:
    top = spec.partition(":")[0].split(".")[0]
    found = importlib.util.find_spec(top)
    if found is None:
        raise ConfigError(f"task {spec!r}: package {top!r} is not importable")
    if found.submodule_search_locations:
        roots = [Path(p) for p in found.submodule_search_locations]
        base = roots[0]
    elif found.origin is not None:
        roots = [Path(found.origin)]
        base = roots[0].parent
    else:
        raise ConfigError(f"task {spec!r}: package {top!r} has no source files to identify")
    return TaskIdentity(
        spec=spec, package=top, version=_version(top), sha256=_hash_files(base, roots)
    )


def _version(package: str) -> str:
    """The installed distribution's version providing ``package``; 'unknown' when none."""
    try:  # most packages are their distribution's name: one lookup, not a scan of them all
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    names = importlib.metadata.packages_distributions().get(package, [])
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _hash_files(base: Path, roots: list[Path]) -> str:
    """SHA-256 over every .py file under ``roots``: relative path, NUL, content, NUL."""
    files: set[Path] = set()
    for root in roots:
        if root.is_file():
            files.add(root.resolve())
        elif root.is_dir():
            files.update(p.resolve() for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in sorted(files):
        try:
            name = path.relative_to(base.resolve()).as_posix()
        except ValueError:
            name = path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
