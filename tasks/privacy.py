"""Prefect tasks for participant-level DP and the round's privacy record."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components.privacy.rounds import declined_record
from fl_components.tracking import RunTracker


@task(name="log_privacy", task_run_name="log_privacy-r{round_num}", cache_policy=NO_CACHE)
def log_privacy(
    tracker: RunTracker,
    params: dict[str, str],
    declined: dict[str, str],
    *,
    round_num: int,
) -> None:
    """Log params needed to recompute epsilon (once each) and tag who declined and why.

    ``declined``: ``{site: reason}`` of the round's DECLINED dropouts (typed, not parsed).
    """
    if params:
        tracker.log_params(params)
    _, tags = declined_record(declined, round_num=round_num)
    if tags:
        tracker.set_tags(tags)
