"""Run names that tell runs apart: ``<federation>-<YYYYmmdd-HHMMSS>`` (UTC, at the start).

Prefect names the coordinator's flow run so; the MLflow run takes the same name; each
participant run adds its site, round, stage and the coordinator run's short id.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect.runtime import flow_run

from fl_components.config import FederationConfig


def run_name(federation: str, *, started: datetime) -> str:
    """``<federation>-<YYYYmmdd-HHMMSS>`` (UTC): readable, and one per start."""
    return f"{federation}-{started.astimezone(UTC):%Y%m%d-%H%M%S}"


def coordinator_run_name() -> str:
    """Prefect's ``flow_run_name`` for the training flow: its federation and start time."""
    config = flow_run.parameters.get("config")
    name = config.name if isinstance(config, FederationConfig) else dict(config or {}).get("name")
    return run_name(str(name or "federation"), started=datetime.now(UTC))


def participant_run_name() -> str:
    """``<site>-r<round>-<stage>-<coordinator run's short id>``: tells runs of trainings apart.

    For the participant flow's ``flow_run_name`` (Prefect renames a run by it when it
    starts, so the name ``run_deployment`` gave is not enough).
    """
    job = flow_run.parameters.get("job")
    params = job.model_dump() if hasattr(job, "model_dump") else dict(job or {})
    params = dict(params.get("message") or params)  # the signed job's message (unverified:
    # a name only)
    short = str(params.get("run_id") or "")[:8]
    return f"{params.get('site')}-r{params.get('round')}-{params.get('stage')}-{short}"
