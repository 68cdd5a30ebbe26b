"""Soak: 50 rounds over 20 embedded sites, 10% of the participants failing in every round.

The failures are real: for a scheduled (site, round), the site's ``train.npz`` is unreadable
while that round's training reads it (its folded evaluation, read before, still counts), so
the site's own loader fails and the round goes on without it. Record-level DP-SGD runs at
every site, so each site's privacy ledger must hold exactly the rounds the site trained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROUNDS = 50
SITES = 20
FAILING_PER_ROUND = 2  # 10% of the participants


@contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """``path`` holds garbage for the duration (a disk error, a half-copied file)."""
    original = path.read_bytes()
    path.write_bytes(b"not an npz: the file went bad")
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.mark.slow
def test_fifty_rounds_twenty_sites_with_failures_log_each_round_once(
    prefect_harness: None, small_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from fl_components.federation import Site, federation_dir
    from fl_components.privacy.ledger import PrivacyLedger
    from flows.federated_training import federated_training

    config = small_config.model_validate(
        {
            **small_config.model_dump(exclude_unset=True),
            "name": "soak",
            "rounds": ROUNDS,
            "sites": [{"name": f"site-{i:02d}"} for i in range(SITES)],
            "participation": {"fraction": 1.0, "min_participants": SITES - FAILING_PER_ROUND},
            "data": {**small_config.data.model_dump(), "partitioner": "iid"},
            "model": {"kind": "logreg"},
            "training": {"epochs": 1, "batch_size": 32},
            # gdp: constant sigma and q, and an epsilon in closed form (cheap per round)
            "privacy": {"mode": "record", "accountant": "gdp", "noise_multiplier": 1.0},
            "tracking": {**small_config.tracking.model_dump(), "register_model": False},
        }
    )
    rng = np.random.default_rng(2026)
    failing = {
        round_num: set(rng.choice(config.site_names, size=FAILING_PER_ROUND, replace=False))
        for round_num in range(1, ROUNDS + 1)
    }
    real_train = Site.train

    def train(self: Site, parameters: Any, *, round_num: int, **kwargs: Any) -> Any:
        if self.name not in failing[round_num]:
            return real_train(self, parameters, round_num=round_num, **kwargs)
        with _unreadable(self.folder / "train.npz"):
            return real_train(self, parameters, round_num=round_num, **kwargs)

    monkeypatch.setattr(Site, "train", train)
    started = time.perf_counter()

    summary = federated_training(config)

    seconds = time.perf_counter() - started
    client = MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED", seconds
    participants = client.get_metric_history(run.info.run_id, "participants")
    assert sorted((m.step, m.value) for m in participants) == [
        (r, float(SITES - FAILING_PER_ROUND)) for r in range(1, ROUNDS + 1)
    ]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "global/accuracy"))
    assert steps == list(range(ROUNDS + 1))
    for key in run.data.metrics:  # every metric: one value per step, no round logged twice
        history = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(history) == len(set(history)), (key, sorted(history))
    for site in config.site_names:
        ledger = PrivacyLedger.load(federation_dir(config) / site / "privacy_ledger.json")
        charged = [e.round for e in ledger.entries if e.mlflow_run_id == run.info.run_id]
        joined = [r for r in range(1, ROUNDS + 1) if site not in failing[r]]
        assert charged == joined, site
        epsilon = client.get_metric_history(run.info.run_id, f"privacy/site/{site}/epsilon")
        assert sorted(m.step for m in epsilon) == joined, site
