"""Shared fixtures: an isolated Prefect (one test harness per session) and MLflow store."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Isolate Prefect before anything imports it: its home, database and settings.
_PREFECT_HOME = tempfile.mkdtemp(prefix="fedpipe-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL"] = "WARNING"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL"] = "WARNING"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.pop("PREFECT_API_URL", None)
# round checkpoints of the flows under test (flows.resume), away from the checkout's state/
os.environ["FEDPIPE_CHECKPOINT_DIR"] = tempfile.mkdtemp(prefix="fedpipe-test-checkpoints-")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One real (temporary) Prefect server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture
def mlflow_store(tmp_path: Path) -> dict[str, str]:
    """A fresh MLflow tracking store (SQLite + artifact folder) in a temp dir."""
    return {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_root": str(tmp_path / "artifacts"),
    }


@pytest.fixture
def small_config(tmp_path: Path, mlflow_store: dict[str, str]):  # type: ignore[no-untyped-def]
    """3 digits sites x 2 rounds, isolated data and tracking under tmp_path."""
    from fl_components.config import FederationConfig

    return FederationConfig.model_validate(
        {
            "name": "test-fed",
            "rounds": 2,
            "sites": [{"name": f"site-{i}"} for i in range(3)],
            "participation": {"fraction": 1.0, "min_participants": 2},
            "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
            "model": {"kind": "mlp", "hidden": [32]},
            "training": {"epochs": 2, "batch_size": 32},
            "tracking": mlflow_store,
            "seed": 1,
        }
    )


# deploy test modules that start a stack of their own (not the session's): they may run on
# the other worker, beside the shared stack's tests, which are the suite's longest chain
OWN_STACK = frozenset({"tests/deploy/test_stack_postgres.py"})


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under `pytest -n 2` (make test) the deploy tests run on one worker, in file order, on
    the session's one stack (tests/deploy/conftest.py); every other test (and a deploy module
    with a stack of its own, :data:`OWN_STACK`) is balanced beside them. (xdist's own ``xdist_group`` marks do nothing under pytest 9: its hook renames node
    ids, which pytest 9 no longer lets it do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class DeployTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            if module in OWN_STACK:  # its own stack: beside the shared one, module together
                return module
            return "tests/deploy" if nodeid.startswith("tests/deploy/") else nodeid

    return DeployTogether(config, log)
