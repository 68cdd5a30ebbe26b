"""The run's summary: two accuracies named for what they measure, the config's changes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fl_components.config import FederationConfig
from fl_components.tracking import model_version_url, run_url
from flows.run_summary import config_difference
from tasks.tracking import summary_markdown


def test_the_difference_from_the_deployment_names_each_changed_field() -> None:
    deployed = FederationConfig(rounds=20).model_dump(mode="json")
    config = FederationConfig.model_validate(
        {**deployed, "rounds": 3, "strategy": {"name": "fedadam"}}
    )

    difference = config_difference(config, deployed)

    assert "`rounds`: 20 -> 3" in difference
    assert "`strategy.name`: fedavg -> fedadam" in difference
    assert config_difference(FederationConfig.model_validate(deployed), deployed) == []
    assert config_difference(config, None) is None  # not a deployment run


def test_the_summary_says_which_accuracy_is_which_and_why_the_model_is_not_champion() -> None:
    markdown = summary_markdown(
        federation="fed",
        strategy="fedadam",
        rounds=3,
        final={"global/accuracy": 0.9109, "sites/mean_accuracy": 0.8889, "global/loss": 0.3},
        promotion="**challenger**: not promoted: diverged: ...",
        mlflow_run="[abc](http://mlflow/#/experiments/1/runs/abc)",
        model_version="[fed version 4](http://mlflow/#/models/fed/versions/4)",
        difference=["`rounds`: 20 -> 3"],
    )

    assert "- accuracy on the central test split: **0.9109**" in markdown
    assert "- federated accuracy (the sites' held-out splits" in markdown and "0.8889" in markdown
    assert "- promotion: **challenger**: not promoted: diverged" in markdown
    assert markdown.endswith("- `rounds`: 20 -> 3")


def test_links_open_mlflow_in_its_classic_view() -> None:
    assert run_url("http://127.0.0.1:5000/", experiment_id="1", run_id="abc") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    )
    assert model_version_url("http://h:5000", name="fed", version="4") == (
        "http://h:5000/#/models/fed/versions/4?workflowType=machine_learning"
    )


def test_a_summary_that_cannot_be_written_is_a_warning_not_a_failed_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flows import run_summary

    def refused(federation: str, markdown: str) -> None:
        raise ConnectionError("Prefect is not answering")

    monkeypatch.setattr(run_summary, "publish_summary", refused)
    tracker = SimpleNamespace(run_id="abc", experiment_id="1", tracking_uri="sqlite:///x.db")

    with caplog.at_level(logging.WARNING, logger="fedpipe"):
        written = run_summary.publish_run_summary(
            FederationConfig(),
            tracker,  # type: ignore[arg-type]
            final={"global/accuracy": 0.9, "global/loss": 0.3},
            version=None,
            decision=None,
        )

    assert written is None
    assert "summary could not be written (ConnectionError" in caplog.text
    assert "MLflow run abc" in caplog.text
