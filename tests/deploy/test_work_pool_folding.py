"""The work-pool backend folds a round's federated evaluation into the next training dispatch.

Each site's deployment runs in this process (the participant flow itself, with the site's
environment scoped to its run); what is checked is what the backend dispatches and what it
hands back: the same scores as an evaluation dispatched on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.config import FederationConfig
from fl_components.federation import dataset_info, materialize_sites
from fl_components.models import build_model
from fl_components.parameters import NDArrays, get_parameters
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
    return work_pool.WorkPoolBackend(config, info), calls, parameters


def test_evaluation_rides_with_training_and_covers_the_sites_not_training(
    backend_and_calls: tuple[work_pool.WorkPoolBackend, list[dict[str, Any]], NDArrays],
) -> None:
    backend, calls, parameters = backend_and_calls
    sites = ("site-0", "site-1", "site-2")

    backend.request_evaluation(sites, parameters, round_num=0)
    assert calls == []  # nothing dispatched yet: it waits for the next dispatch
    outcome = backend.train(("site-0", "site-1"), parameters, round_num=1)
    folded = backend.collect_evaluation()

    assert [(c["site"], c["stage"], c["round_num"], c["evaluate_round"]) for c in calls] == [
        ("site-0", "train", 1, 0),
        ("site-1", "train", 1, 0),
        ("site-2", "evaluate", 0, None),  # not training this round: evaluated in the same wave
    ]
    assert [u.site for u in outcome.updates] == ["site-0", "site-1"]
    assert set(folded) == set(sites)

    calls.clear()
    alone = backend.evaluate(sites, parameters, round_num=0)  # a dispatch of its own
    assert [c["stage"] for c in calls] == ["evaluate"] * 3
    assert alone == folded


def test_a_different_model_is_not_folded(
    backend_and_calls: tuple[work_pool.WorkPoolBackend, list[dict[str, Any]], NDArrays],
) -> None:
    backend, calls, parameters = backend_and_calls
    sites = ("site-0", "site-1", "site-2")

    backend.request_evaluation(sites, parameters, round_num=0)
    backend.train(("site-0", "site-1"), [p + np.float32(0.01) for p in parameters], round_num=1)
    assert all(c["evaluate_round"] is None for c in calls)

    calls.clear()
    scores = backend.collect_evaluation()  # evaluated on its own, of the requested model
    assert [(c["stage"], c["round_num"]) for c in calls] == [("evaluate", 0)] * 3
    assert scores == backend.evaluate(sites, parameters, round_num=0)

    with pytest.raises(RuntimeError, match="without request_evaluation"):
        backend.collect_evaluation()
