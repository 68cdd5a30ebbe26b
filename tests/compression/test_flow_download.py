"""The coordinator flow with compressed updates and model deltas: exact bytes in MLflow."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fl_components.compression.download import HELD_FILE, full_download_nbytes
from fl_components.config import FederationConfig
from fl_components.federation import site_folder
from flows.federated_training import federated_training

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_the_flow_sends_deltas_after_the_first_round_and_logs_what_crossed(
    small_config: FederationConfig,
) -> None:
    compression = {"method": "qsgd", "bits": 8, "download": "delta", "download_bits": 8}
    config = FederationConfig.model_validate(
        small_config.model_dump(exclude_unset=True) | {"compression": compression}
    )

    summary = federated_training(config)

    client = MlflowClient(tracking_uri=config.tracking.tracking_uri)
    down = {m.step: m.value for m in client.get_metric_history(summary.mlflow_run_id, "bytes/down")}
    site = client.get_metric_history(summary.mlflow_run_id, "bytes/down/site/site-0")
    d = (64 * 32 + 32) + (32 * 10 + 10)  # digits MLP, hidden [32]
    assert down[1] == 3 * full_download_nbytes(d)  # round 1: the full model
    assert down[2] < 0.3 * down[1]  # round 2: the 8-bit delta
    assert {m.step: m.value for m in site}[2] == down[2] / 3
    up = client.get_metric_history(summary.mlflow_run_id, "bytes/up/site/site-0")
    assert all(m.value < 0.3 * 4 * d for m in up)
    assert all((site_folder(config, s) / HELD_FILE).is_file() for s in config.site_names)
