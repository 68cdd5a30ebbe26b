"""The local stack's record and layout: where ``fedpipe up`` keeps its state.

Constants shared by the stack's modules, :class:`StackPaths` (the state folder),
``stack.json`` (what ``up`` started), and the federation as the stack deploys it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_components.config import FederationConfig
from fl_components.errors import FedpipeError

REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
DEFAULT_FEDERATION = REPO / "infra" / "federation.yaml"
RESULTS_BLOCK = "fedpipe-results"
COORDINATOR_POOL = "fedpipe-coordinator"
STACK_TAG_ENV = "FEDPIPE_STACK"
# where `fedpipe up` keeps a stack unless --state-dir says otherwise (relative to the cwd)
DEFAULT_STACK_DIR = Path("state") / "stack"
# worker latency is part of every round: poll for new runs each second
# one BLAS/torch thread per flow run: a site's runs share its cores with the others here
# a heartbeat each 5 s: a dead worker reads OFFLINE after 15 s (3 missed), and its site is
# skipped instead of waited for (tasks.work_pool.pool_not_serving)
WORKER_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    "PREFECT_WORKER_PREFETCH_SECONDS": "10",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class StackError(FedpipeError):
    """The local stack could not be started, found or stopped."""


@dataclass(frozen=True)
class StackPaths:
    """Where a stack keeps its state."""

    root: Path
    mlflow_dir: Path

    @property
    def state_file(self) -> Path:
        """The record of what ``up`` started (addresses, PIDs, sites)."""
        return self.root / "stack.json"

    @property
    def logs(self) -> Path:
        """One log file per started process."""
        return self.root / "logs"

    @property
    def results(self) -> Path:
        """Shared Prefect result storage (the participants' payloads)."""
        return self.root / "results"

    @property
    def exchange(self) -> Path:
        """Shared exchange storage (the global-model files)."""
        return self.root / "exchange"

    @property
    def keys(self) -> Path:
        """Site key folders (in a real deployment each lives on its own site)."""
        return self.root / "keys"


def stack_config(config: FederationConfig, paths: StackPaths, mlflow_url: str) -> FederationConfig:
    """The federation as the stack deploys it: work-pool backend, its exchange and tracking.

    Configs travel as the fields that were set (``exclude_unset``): validated again, a
    dump of every field would read as a knob set on purpose (strategy knobs are checked
    against the strategy they belong to).
    """
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["backend"] = "work-pool"
    raw["deployment"] = {**raw.get("deployment", {}), "exchange_dir": str(paths.exchange)}
    raw["tracking"] = {**raw.get("tracking", {}), "tracking_uri": mlflow_url}
    # the one registry `enrol_keys` writes; sites and coordinator read public keys from it
    raw["secure_aggregation"] = {
        **raw.get("secure_aggregation", {}),
        "registry": str(paths.root / "registry.json"),
    }
    if config.data.source == "bundled":
        sites_dir = str(Path(config.data.sites_dir).resolve())
        raw["data"] = {**raw.get("data", {}), "sites_dir": sites_dir}
    return FederationConfig.model_validate(raw)


def _redacted(url: str) -> str:
    """The database URL without its password: the state file is not a secret store."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def load_record(root: Path) -> dict[str, Any]:
    """The record ``up`` wrote; a clear error when there is none."""
    state_file = root.resolve() / "stack.json"
    if not state_file.is_file():
        raise StackError(f"no stack recorded under {root} (no stack.json); start one: `fedpipe up`")
    return dict(json.loads(state_file.read_text()))
