"""Prefect tasks for participant-level DP and the round's privacy record."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components.tracking import RunTracker


@task(name="log_privacy", task_run_name="log_privacy-r{round_num}", cache_policy=NO_CACHE)
def log_privacy(
    tracker: RunTracker,
    params: dict[str, str],
    dropouts: dict[str, str],
    *,
    round_num: int,
) -> None:
    """Log params needed to recompute epsilon (once each) and tag who declined and why."""
    if params:
        tracker.log_params(params)
    declined = {s: r for s, r in dropouts.items() if r.startswith("declined")}
    if declined:
        tracker.set_tags(
            {f"privacy.declined.{s}": f"round {round_num}: {r}"[:5000] for s, r in declined.items()}
        )
