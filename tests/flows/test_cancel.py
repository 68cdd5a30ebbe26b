"""A run whose own flow run is cancelled, with nothing to kill it, stops at the next boundary.

Prefect cancels a run by moving it to CANCELLING and having the worker that runs it kill
the process. Here no worker watches (as after a server outage: "Flow run cancellation
disabled", tests/deploy/test_faults.py plays that on the stack): the coordinator reads its
own state between rounds and before registration, and stops there.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _cancel_own_flow_run() -> None:
    """What `prefect flow-run cancel ID` does: propose CANCELLING for the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(flow_run.get_id(), Cancelling(message="by the test"))
    assert result.status.value == "ACCEPT", result


def test_a_run_cancelled_mid_round_stops_before_the_next_and_registers_nothing(
    small_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.exceptions import CancelledRun

    import flows.federated_training as training

    config = small_config.model_copy(update={"rounds": 4})
    real_round = training.run_round
    flow_runs: list[Any] = []

    def cancelled_in_round_2(state, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        from prefect.runtime import flow_run

        flow_runs.append(flow_run.get_id())
        result = real_round(state, plan, *args, **kwargs)
        if plan.round == 2:
            _cancel_own_flow_run()
        return result

    monkeypatch.setattr(training, "run_round", cancelled_in_round_2)
    with pytest.raises(CancelledRun, match="stopped before round 3"):
        training.federated_training(config)

    uri = config.tracking.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)  # not the registry an earlier test set
    (run,) = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])
    assert run.info.status == "KILLED"
    # round 1 was logged when round 2's evaluation came in; nothing after round 2 ran
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "participants")) == [1]
    assert client.search_model_versions(f"name = '{config.name}'") == []
    with get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(flow_runs[0]).state
    assert state is not None and state.type.value == "CANCELLED", state
