"""The work-pool backend folds a round's federated evaluation into the next training dispatch.

Each site's deployment runs in this process (the participant flow itself, with the site's
environment scoped to its run); what is checked is what the backend dispatches and what it
hands back: the same scores as an evaluation dispatched on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fl_components.compression.download import full_download_nbytes
from fl_components.compression.instruction import CompressionInstruction
from fl_components.config import CompressionConfig, FederationConfig
from fl_components.errors import BudgetExhaustedError
from fl_components.federation import Site, dataset_info, materialize_sites
from fl_components.parameters import NDArrays, get_parameters
from fl_components.round.engine import EvaluationRequest, RoundPlan, evaluate_sites, run_round
from fl_components.round.types import DropoutKind
from fl_components.site.models import build_model
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

    assert [(c["site"], c["stage"], c["round"], c["evaluate_round"]) for c in calls] == [
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


def test_compressed_updates_and_model_deltas_cross_the_work_pool_boundary(
    backend_and_calls: tuple[work_pool.WorkPoolBackend, list[dict[str, Any]], NDArrays],
) -> None:
    backend, calls, parameters = backend_and_calls
    compression = {"method": "qsgd", "bits": 4, "download": "delta", "download_bits": 8}
    config = backend.config.model_copy(
        update={"compression": CompressionConfig.model_validate(compression)}
    )
    backend = work_pool.WorkPoolBackend(config, backend.info, run_id="compress-run")
    assert backend.downloads is not None
    strategy = FedAvg()
    state = strategy.initial_state(parameters)
    d = sum(p.size for p in parameters)
    sites = ("site-0", "site-1")
    reports = []
    for round_num in (1, 2):
        calls.clear()
        plan = RoundPlan(
            round=round_num,
            selected=sites,
            seeds={"site-0": 1, "site-1": 2},
            compression=CompressionInstruction(config.compression, "compress-run", round_num),
            downloads=backend.downloads,
        )
        state, report = run_round(state, plan, backend, strategy)
        reports.append(report)
        assert [c["compression"]["round"] for c in calls] == [round_num] * 2
        assert all(c["model"] is None for c in calls)  # the model travels as a download
    first, second = reports

    # round 1: the full model; round 2: the 8-bit delta, read from the exchange folder
    assert {c["download"]["delta_uri"] for c in calls} != {""}
    delta_file = Path(calls[0]["download"]["delta_uri"])
    assert first.metrics["bytes/down/site/site-0"] == full_download_nbytes(d)
    assert second.metrics["bytes/down/site/site-0"] == delta_file.stat().st_size
    assert second.metrics["bytes/down"] == 2 * delta_file.stat().st_size < 0.3 * 4 * d * 2
    assert backend.downloads.holds("site-0") == calls[0]["download"]["sha256"]
    # the updates came up as 4-bit QSGD messages (base64 in JSON: a float32 payload is 16d/3
    # bytes), decoded at the coordinator; sealed to the coordinator, the answer is base64 of
    # its encrypted JSON (4/3 of it) plus the sealed envelope (under 512 bytes)
    assert second.metrics["bytes/up/site/site-0"] < 0.25 * 4 * d * 4 / 3 + 512
    # both answers were decoded and folded into the mean as they came (streamed: the round
    # keeps each update's metadata, not its delta), into a float32 model
    assert [u.site for u in second.updates] == ["site-0", "site-1"]
    assert second.metrics["aggregation/peak_updates_held"] <= 1
    assert all(p.dtype.name == "float32" for p in state.parameters)
    assert state.round == 2
