"""A retried ``log_round`` never logs a round's metrics twice at one step."""

from __future__ import annotations

import pytest

from fl_components.config import FederationConfig
from fl_components.tracking import RunTracker


def test_a_retry_after_the_artifact_failed_logs_the_metrics_once(
    prefect_harness: None, small_config: FederationConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    import tasks.tracking as tracking_tasks

    failures = iter([OSError("artifact store unreachable")])

    def flaky_artifact(**kwargs: object) -> None:
        error = next(failures, None)
        if error is not None:  # the first attempt fails after the metrics went in
            raise error

    monkeypatch.setattr(tracking_tasks, "create_markdown_artifact", flaky_artifact)
    tracker = RunTracker(small_config)
    tracker.start(run_name="retry", tags={})

    @flow
    def one_round() -> None:
        tracking_tasks.log_round.with_options(retry_delay_seconds=0)(
            tracker,
            {"global/accuracy": 0.5, "global/loss": 1.0},
            "| site |",
            federation="test-fed",
            round_num=3,
        )

    one_round()
    history = tracker.client.get_metric_history(tracker._run(), "global/accuracy")
    tracker.end()
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
