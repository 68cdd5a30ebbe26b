"""Every strategy through the real coordinator flow (local backend) and the work-pool path.

The local runs go through Prefect tasks and MLflow; the work-pool runs dispatch each
site's job to the participant flow run in this process, so FedProx's μ, SCAFFOLD's control
variate (a file in the exchange folder, verified by hash) and q-FedAvg's initial loss all
cross the boundary as they would to a real site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_components.config import FederationConfig
from fl_components.federation import dataset_info, materialize_sites
from fl_components.parameters import get_parameters
from fl_components.round.engine import RoundPlan, run_round
from fl_components.site.models import build_model
from fl_components.strategies import build_strategy
from flows.federated_training import federated_training
from tests.in_process_sites import dispatch_in_process

pytestmark = pytest.mark.usefixtures("prefect_harness")

RULES: list[dict[str, Any]] = [
    {"name": "fedavgm", "server_momentum": 0.5},
    {"name": "fedprox", "proximal_mu": 0.1},
    {"name": "scaffold"},
    {"name": "fedadam"},
    {"name": "fedyogi"},
    {"name": "fedadagrad"},
    {"name": "qfedavg", "q": 1.0},
    {"name": "fedavg", "aggregator": "median"},
    {"name": "fedavg", "aggregator": "trimmed_mean", "trim_beta": 0.2},
    {"name": "fedavg", "aggregator": "krum", "byzantine_f": 0},
    {"name": "fedavg", "norm_bound": 1.0},
]


def _with(config: FederationConfig, strategy: dict[str, Any], **changes: Any) -> FederationConfig:
    raw = config.model_dump(mode="json")
    raw["strategy"] = strategy
    raw["training"]["optimizer"] = "sgd"
    raw["training"]["momentum"] = 0.0  # SCAFFOLD's option II assumes plain local SGD
    raw.update(changes)
    return FederationConfig.model_validate(raw)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RULES, ids=lambda s: "-".join(map(str, s.values())))
def test_strategy_runs_through_the_flow_and_is_comparable_in_mlflow(
    small_config: FederationConfig, strategy: dict[str, Any]
) -> None:
    participation = {"fraction": 1.0, "min_participants": 3}  # Krum's n >= 2f + 3
    config = _with(small_config, strategy, rounds=2, participation=participation)

    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["strategy.effective.rule"] == strategy["name"]
    assert run.data.tags["fedpipe.strategy"] == strategy["name"]
    assert run.data.tags["fedpipe.aggregator"] == strategy.get("aggregator", "mean")
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "global/loss")]
    assert np.isfinite(summary.final_accuracy) and all(np.isfinite(losses))
    if strategy.get("aggregator") != "krum":  # Krum keeps one site's non-IID update a round
        assert losses[-1] < losses[0]  # the global model moved toward the data
    assert [m.step for m in client.get_metric_history(run.info.run_id, "participants")] == [1, 2]
    worst = client.get_metric_history(run.info.run_id, "sites/worst_accuracy")
    assert [m.step for m in worst] == [0, 1, 2]


@pytest.mark.parametrize("name", ["fedprox", "scaffold", "qfedavg", "fedadam"])
def test_strategy_instructions_cross_the_work_pool_boundary(
    small_config: FederationConfig,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
) -> None:
    config = _with(
        small_config,
        {"name": name},
        backend="work-pool",
        deployment={"exchange_dir": str(tmp_path / "exchange")},
    )
    materialize_sites(config)
    calls = dispatch_in_process(monkeypatch)
    from tasks.work_pool import WorkPoolBackend

    info = dataset_info(config)
    backend = WorkPoolBackend(config, info, run_id="strategy-run")
    strategy = build_strategy(config.strategy, num_sites=3, local_lr=config.training.lr)
    state = strategy.initial_state(get_parameters(build_model(config.model, info, seed=1)))
    names = config.site_names

    for round_num in (1, 2):
        plan = RoundPlan(round=round_num, selected=names, seeds=dict.fromkeys(names, round_num))
        state, report = run_round(state, plan, backend, strategy)
        assert report.metrics["participants"] == 3.0, report.dropouts

    sent = calls[-1]["instructions"]
    if name == "fedprox":
        assert sent["proximal_mu"] == pytest.approx(config.strategy.proximal_mu)
    if name == "scaffold":
        assert sent["server_control"]["uri"].startswith(str(tmp_path / "exchange"))
        assert all(u.control_delta is not None for u in report.updates)
        assert any(np.abs(c).sum() > 0 for c in state.strategy_state["control"])
        site_control = tmp_path / "sites" / config.name / "site-0" / "scaffold_control.npz"
        assert site_control.is_file()  # c_i stays in the site's own folder
    if name == "qfedavg":
        assert all(u.initial_loss is not None and u.initial_loss > 0 for u in report.updates)
    assert state.round == 2
