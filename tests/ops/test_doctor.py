"""`fedpipe doctor`'s checks, each without a stack: a small HTTP server for the Prefect
and MLflow answers, a stand-in Prefect client for the pools, real keys, data and ledgers
in a temporary folder. The checks on a real stack are in tests/deploy/test_stack.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.config import FederationConfig
from fl_components.data.site_files import write_split
from fl_components.data.types import Split
from ops.doctor import (
    SiteEntry,
    check_budgets,
    check_keys,
    check_mlflow,
    check_prefect,
    check_site_data,
    check_site_workers,
)


@pytest.fixture
def server() -> Iterator[dict[str, Any]]:
    """An HTTP server answering /api/health and /ui-settings with ``answers["api_url"]``."""
    answers: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in ("/api/health", "/health"):
                body = b"true"
            elif self.path == "/ui-settings":
                body = json.dumps({"api_url": answers["api_url"]}).encode()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    answers["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield answers
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_ui_told_another_api_is_named_with_the_fix(server: dict[str, Any]) -> None:
    api = f"{server['url']}/api"
    server["api_url"] = "http://127.0.0.1:4200/api"  # Prefect's answer when the setting is unset

    health, ui = check_prefect(api, fix="fedpipe up")

    assert health.ok
    assert not ui.ok and "http://127.0.0.1:4200/api" in ui.detail
    assert f"PREFECT_SERVER_UI_API_URL={api}" in ui.fix

    server["api_url"] = api
    assert all(c.ok for c in check_prefect(api, fix="fedpipe up"))


def test_an_unreachable_server_fails_with_the_command_that_starts_it(
    server: dict[str, Any],
) -> None:
    (api,) = check_prefect("http://127.0.0.1:9/api", fix="fedpipe up")
    assert not api.ok and "does not answer" in api.detail and api.fix == "fedpipe up"

    assert check_mlflow(server["url"], fix="fedpipe up").ok
    down = check_mlflow("http://127.0.0.1:9", fix="fedpipe up")
    assert not down.ok and "does not answer" in down.detail
    assert check_mlflow("sqlite:///mlflow/mlflow.db", fix="").ok  # a local store: nothing to ask


@dataclass
class _Pool:
    is_paused: bool = False
    status: Any = None


@dataclass
class _Worker:
    status: Any


@dataclass
class _Client:
    """What `pool_not_serving` asks a Prefect client."""

    online: set[str] = field(default_factory=set)

    def read_work_pool(self, name: str) -> _Pool:
        from prefect.client.schemas.objects import WorkPoolStatus

        ready = name in self.online
        return _Pool(status=WorkPoolStatus.READY if ready else WorkPoolStatus.NOT_READY)

    def read_workers_for_work_pool(self, name: str) -> list[_Worker]:
        from prefect.client.schemas.objects import WorkerStatus

        return [_Worker(WorkerStatus.ONLINE if name in self.online else WorkerStatus.OFFLINE)]


def test_a_site_without_a_live_worker_names_the_restart_command(tmp_path: Path) -> None:
    sites = [SiteEntry("north", "fedpipe-north"), SiteEntry("east", "fedpipe-east")]
    record = {
        "sites": {
            s: {"pool": f"fedpipe-{s}", "executor": str(tmp_path / s / "executor.sock")}
            for s in ("north", "east")
        },
        "processes": [],  # no worker process recorded: both read as down on this host
    }
    client = _Client(online={"fedpipe-north"})

    north, east = check_site_workers(client, sites, record=record, state_dir=tmp_path)

    assert not east.ok and "has no live worker (pool NOT_READY)" in east.detail
    assert east.fix == f"fedpipe site restart east --state-dir {tmp_path}"
    # north's pool is served, but the worker this stack started is gone
    assert not north.ok and north.detail.startswith("worker down")
    assert north.fix.startswith("fedpipe site restart north")

    # a deployment checked through PREFECT_API_URL alone: the pool is all there is to ask
    remote = check_site_workers(client, sites, record=None, state_dir=None)
    assert remote[0].ok
    assert not remote[1].ok and "fedpipe site worker --pool fedpipe-east" in remote[1].fix


def test_keys_must_load_and_match_the_registry(tmp_path: Path) -> None:
    from ops.stack.sites import enrol_keys
    from ops.stack.state import StackPaths

    paths = StackPaths(tmp_path, tmp_path)
    sites = [
        SiteEntry(s, f"fedpipe-{s}", data=tmp_path / s, keys=enrol_keys(paths, s))
        for s in ("north", "south")
    ]
    registry = tmp_path / "registry.json"
    assert all(c.ok for c in check_keys(registry, sites, state_dir=tmp_path))

    entries = json.loads(registry.read_text())
    entries["south"] = entries["north"]  # south's entry replaced: its signatures would fail
    registry.write_text(json.dumps(entries))
    north, south = check_keys(registry, sites, state_dir=tmp_path)
    assert north.ok and not south.ok and "does not match" in south.detail
    assert (
        south.fix == f"fedpipe site init south --data {tmp_path / 'south'} --state-dir {tmp_path}"
    )

    key = tmp_path / "keys" / "north" / "ed25519.key"
    key.chmod(0o644)
    north, _ = check_keys(registry, sites, state_dir=tmp_path)
    assert not north.ok and "chmod 600" in north.detail

    (missing,) = check_keys(tmp_path / "none.json", sites, state_dir=tmp_path)
    assert not missing.ok and "does not exist" in missing.detail


def _site_files_config(tmp_path: Path, **privacy: Any) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "doc",
            "sites": [{"name": s, "data_path": str(tmp_path / s)} for s in ("a", "b", "c")],
            "data": {"source": "site_files", "n_features": 3, "n_classes": 2},
            "privacy": privacy or {"mode": "off"},
        }
    )


def _write_site(folder: Path, labels: list[int]) -> None:
    rng = np.random.default_rng(0)
    for stem in ("train", "test"):
        split = Split(rng.normal(size=(len(labels), 3)).astype(np.float32), np.array(labels))
        write_split(folder / f"{stem}.npz", split)


def test_site_data_is_loaded_as_the_site_loads_it(tmp_path: Path) -> None:
    config = _site_files_config(tmp_path)
    _write_site(tmp_path / "a", [0, 1, 0, 1])
    _write_site(tmp_path / "b", [0, 1, 7, 1])  # a label outside n_classes
    sites = [SiteEntry(s, f"fedpipe-{s}", data=tmp_path / s) for s in ("a", "b", "c")]

    good, bad_labels, missing = check_site_data(config, sites)

    assert good.ok and "4 train / 4 test rows" in good.detail
    # the site's own loader checks the labels: file, values, where, and the fix
    assert not bad_labels.ok and "b/train.npz" in bad_labels.detail
    assert "outside [0, 2), values 7, at index 2" in bad_labels.detail
    assert not missing.ok and "site 'c'" in missing.detail and "does not exist" in missing.detail


def test_a_spent_budget_is_a_problem(tmp_path: Path) -> None:
    from fl_components.privacy.ledger import PrivacyLedger

    config = _site_files_config(tmp_path, mode="record", noise_multiplier=1.1, max_epsilon=1.0)
    for site, max_epsilon in (("a", 1000.0), ("b", 0.01)):
        ledger = PrivacyLedger.open(tmp_path / site, site=site, accountant="rdp")
        ledger.record(
            federation="doc", round_num=1, noise_multiplier=1.0, sample_rate=0.5, steps=10,
            delta=1e-5, max_epsilon=max_epsilon,
        )  # fmt: skip
    (tmp_path / "c").mkdir()
    sites = [SiteEntry(s, f"fedpipe-{s}", data=tmp_path / s) for s in ("a", "b", "c")]

    left, spent, fresh = check_budgets(config, sites)

    assert left.ok and "left" in left.detail
    assert not spent.ok and "none left" in spent.detail and "fedpipe budget" in spent.fix
    assert fresh.ok and "no DP round yet" in fresh.detail
