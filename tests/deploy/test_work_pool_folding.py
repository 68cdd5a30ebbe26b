"""The work-pool backend folds a round's federated evaluation into the next training dispatch.

Each site's deployment runs in this process (the participant flow itself, with the site's
environment scoped to its run); what is checked is what the backend dispatches and what it
hands back: the same scores as an evaluation dispatched on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fl_components.config import FederationConfig
from fl_components.engine import (
    DropoutKind,
    EvaluationRequest,
    RoundPlan,
    evaluate_sites,
    run_round,
)
from fl_components.errors import BudgetExhaustedError
from fl_components.federation import Site, dataset_info, materialize_sites
from fl_components.models import build_model
from fl_components.parameters import NDArrays, get_parameters
from fl_components.strategies import FedAvg
from tasks import work_pool
from tests.in_process_sites import dispatch_in_process

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture()
def backend_and_calls(
    small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[work_pool.WorkPoolBackend, list[dict[str, Any]], NDArrays]:
    config = small_config.model_copy(
        update={
            "backend": "work-pool",
            "deployment": small_config.deployment.model_copy(
                update={"exchange_dir": str(tmp_path / "exchange")}
            ),
        }
    )
    materialize_sites(config)
    calls = dispatch_in_process(monkeypatch)
    info = dataset_info(config)
    parameters = get_parameters(build_model(config.model, info, seed=config.seed))
    return work_pool.WorkPoolBackend(config, info, run_id="fold-run"), calls, parameters


def _plan(sites: tuple[str, ...]) -> RoundPlan:
    return RoundPlan(
        round=1,
        selected=("site-0", "site-1"),
        seeds={"site-0": 1, "site-1": 2},
        evaluation=EvaluationRequest(round=0, sites=sites),
    )


def test_evaluation_rides_with_training_and_covers_the_sites_not_training(
    backend_and_calls: tuple[work_pool.WorkPoolBackend, list[dict[str, Any]], NDArrays],
) -> None:
    backend, calls, parameters = backend_and_calls
    sites = ("site-0", "site-1", "site-2")
    strategy = FedAvg()

    state, report = run_round(strategy.initial_state(parameters), _plan(sites), backend, strategy)

    assert [(c["site"], c["stage"], c["round_num"], c["evaluate_round"]) for c in calls] == [
        ("site-0", "train", 1, 0),
        ("site-1", "train", 1, 0),
        ("site-2", "evaluate", 0, None),  # not training this round: evaluated in the same wave
    ]
    assert [u.site for u in report.updates] == ["site-0", "site-1"]
    assert set(report.evaluations) == set(sites)
    assert state.round == 1
    assert report.metrics["bytes/up"] > 0  # the payloads as they crossed the boundary

    calls.clear()
    alone = evaluate_sites(parameters, EvaluationRequest(round=0, sites=sites), backend)
    assert [c["stage"] for c in calls] == ["evaluate"] * 3  # a dispatch of its own
    assert alone == report.evaluations


def test_a_budget_refusal_on_a_work_pool_site_is_a_typed_decline(
    backend_and_calls: tuple[work_pool.WorkPoolBackend, list[dict[str, Any]], NDArrays],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, _, parameters = backend_and_calls
    real_train = Site.train

    def refuse_site_1(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == "site-1":
            raise BudgetExhaustedError("site 'site-1': epsilon 2.99 spent, max_epsilon 3")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Site, "train", refuse_site_1)
    strategy = FedAvg()

    _, report = run_round(
        strategy.initial_state(parameters), _plan(("site-0", "site-1")), backend, strategy
    )

    assert [(d.site, d.kind) for d in report.dropouts] == [("site-1", DropoutKind.DECLINED)]
    assert "epsilon 2.99 spent" in report.dropouts[0].reason
    assert set(report.evaluations) == {"site-0", "site-1"}  # it still scored the model
