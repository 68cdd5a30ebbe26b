"""The flow path: dropouts, runs from the champion, the client budget, every site declining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl_components.config import FederationConfig, PromotionConfig
from fl_components.errors import RoundError
from fl_components.privacy.federation_ledger import FederationLedger, federation_ledger_path
from fl_components.privacy.ledger import epsilon_of

pytestmark = pytest.mark.integration


def _participant(small: FederationConfig, tmp_path: Path, **privacy: Any) -> FederationConfig:
    # site-2 reads an empty folder: it drops out (bad data) in every round
    sites = [{"name": "site-0"}, {"name": "site-1"}, {"name": "site-2", "data_path": str(tmp_path)}]
    return small.model_validate(
        {
            **small.model_dump(exclude_unset=True),
            "sites": sites,
            "training": {"epochs": 1, "batch_size": 32},
            "participation": {"fraction": 1.0, "min_participants": 1},
            "privacy": {"mode": "participant", "delta": 1e-3, **privacy},
        }
    )


def _metric(client: Any, run_id: str, key: str) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, key)]


def test_dropouts_every_round_and_a_champion_run_continue_one_budget(
    prefect_harness, small_config, tmp_path
) -> None:
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training

    config = _participant(small_config, tmp_path / "empty")
    # (a two-round DP model scored without the empty site: the guard rails would hold it back)
    config = config.model_copy(
        update={"promotion": PromotionConfig(allow_below_baseline=True, allow_partial=True)}
    )
    first = federated_training(config)
    client = MlflowClient(tracking_uri=first.tracking_uri)
    # q = 1 (every site selected), whoever answered: survivors-based q would be 2/3
    assert _metric(client, first.mlflow_run_id, "privacy/client_sample_rate") == [1.0, 1.0]
    assert _metric(client, first.mlflow_run_id, "dropouts") == [1.0, 1.0]
    two = epsilon_of([(1.0, 1.0, 2)], delta=1e-3, accountant="rdp")
    assert _metric(client, first.mlflow_run_id, "privacy/client_epsilon")[-1] == pytest.approx(
        two, rel=1e-9
    )

    second = federated_training(config.model_copy(update={"init_from": "champion"}))
    four = epsilon_of([(1.0, 1.0, 4)], delta=1e-3, accountant="rdp")
    assert _metric(client, second.mlflow_run_id, "privacy/client_epsilon")[-1] == pytest.approx(
        four, rel=1e-9
    )
    ledger = FederationLedger.load(federation_ledger_path(config.tracking, config.name))
    assert ledger.lineage(second.mlflow_run_id) == [first.mlflow_run_id, second.mlflow_run_id]
    report = client.download_artifacts(second.mlflow_run_id, "privacy/privacy_report.json")
    client_part = json.loads(Path(report).read_text())["client"]
    assert client_part["lineage"] == [first.mlflow_run_id, second.mlflow_run_id]
    assert client_part["epsilon"]["rdp"] == pytest.approx(four, rel=1e-9)
    assert ledger.runs[second.mlflow_run_id].flow_run_id == second.prefect_flow_run_id


def test_a_round_past_max_client_epsilon_ends_the_run_cleanly(
    prefect_harness, small_config, tmp_path
) -> None:
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training

    two = epsilon_of([(1.0, 1.0, 2)], delta=1e-3, accountant="rdp")
    config = _participant(small_config, tmp_path / "empty", max_client_epsilon=two + 0.01)
    config = config.model_copy(update={"rounds": 4})

    summary = federated_training(config)  # round 3 refused: no exception, the run finishes

    ledger = FederationLedger.load(federation_ledger_path(config.tracking, config.name))
    assert [len(run.rounds) for run in ledger.runs.values()] == [2]
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "refuses round 3" in run.data.tags["fedpipe.stopped"]
    # every charged round is logged, the last one with its evaluation
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global/accuracy")] == [
        0,
        1,
        2,
    ]
    assert _metric(client, run.info.run_id, "privacy/client_epsilon")[-1] == pytest.approx(
        two, rel=1e-9
    )
    assert _metric(client, run.info.run_id, "privacy/refused") == [1.0]
    report = json.loads(
        Path(client.download_artifacts(run.info.run_id, "privacy/privacy_report.json")).read_text()
    )
    assert report["refused"]["round"] == 3
    assert "max_client_epsilon" in report["refused"]["reason"]
    assert report["refused"]["client_epsilon_spent"] == pytest.approx(two, rel=1e-9)
    assert len(report["client"]["rounds"]) == 2
    # the last good model (round 2's) is logged and registered
    assert summary.model_version is not None
    assert [h["round"] for h in summary.history] == [1.0, 2.0]


def test_every_site_declining_is_logged_before_the_run_fails(prefect_harness, small_config) -> None:
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training

    config = small_config.model_validate(
        {
            **small_config.model_dump(exclude_unset=True),
            "training": {"epochs": 1, "batch_size": 32},
            "privacy": {"mode": "record", "noise_multiplier": 1.0, "max_epsilon": 0.01},
        }
    )
    with pytest.raises(RoundError, match="declined"):
        federated_training(config)
    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["privacy/declined"] == 3.0
    assert {f"privacy.declined.site-{i}" for i in range(3)} <= set(run.data.tags)
    assert "epsilon spent 0.000" in run.data.tags["privacy.declined.site-0"]


def test_the_adapted_clip_norm_rides_in_the_state_from_round_to_round(
    prefect_harness, small_config, tmp_path
) -> None:
    """Adaptive clipping through the flow: the norm each round clips with is the one the
    round before moved (carried in ServerState, nowhere else); without it, every round
    would clip at privacy.clip_norm."""
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training

    config = _participant(small_config, tmp_path / "empty", adaptive_clipping=True, clip_norm=0.5)
    config = config.model_copy(
        update={
            "rounds": 3,
            "promotion": PromotionConfig(allow_below_baseline=True, allow_partial=True),
        }
    )
    result = federated_training(config)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    clips = _metric(client, result.mlflow_run_id, "privacy/clip_norm")
    assert len(clips) == 3 and clips[0] == pytest.approx(0.5)
    assert clips[1] != pytest.approx(clips[0]) and clips[2] != pytest.approx(clips[1])
    assert len(_metric(client, result.mlflow_run_id, "privacy/clipped_fraction")) == 3
