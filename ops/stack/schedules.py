"""The coordinator deployment's schedules on the running server: read, switch, keep.

The Prefect server owns a schedule's on/off state once the stack is up: the operator
switches it in the UI or with ``fedpipe schedule on|off``. ``fedpipe up`` redeploys from
``infra/prefect.yaml``, whose ``active:`` is only the state of a schedule the server has
not seen yet; a schedule the server already holds (same cron and timezone) keeps its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COORDINATOR_DEPLOYMENT = "federated-training/federated-training"


@dataclass(frozen=True)
class ScheduleView:
    """One schedule of the deployment as the server holds it."""

    cron: str
    timezone: str | None
    active: bool

    @property
    def key(self) -> tuple[str, str | None]:
        """What identifies a schedule across redeploys: its cron and timezone."""
        return (self.cron, self.timezone)


def _views(deployment: Any) -> list[tuple[Any, ScheduleView]]:
    views = []
    for entry in deployment.schedules or []:
        cron = getattr(entry.schedule, "cron", None)
        if cron is None:  # an interval or rrule schedule someone added by hand: shown as is
            cron = str(entry.schedule)
        timezone = getattr(entry.schedule, "timezone", None)
        views.append((entry, ScheduleView(str(cron), timezone, bool(entry.active))))
    return views


def read_schedules(
    name: str = COORDINATOR_DEPLOYMENT,
) -> list[ScheduleView] | None:
    """The deployment's schedules on the server (needs PREFECT_API_URL); None: no deployment."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None
    return [view for _, view in _views(deployment)]


def set_schedules(active: bool, name: str = COORDINATOR_DEPLOYMENT) -> list[ScheduleView]:
    """Switch every schedule of the deployment on or off; the schedules as they now are.

    Raises
    ------
    LookupError
        If the server has no such deployment, or the deployment has no schedule.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise LookupError(
                f"no deployment {name!r} on the server; start the stack with `fedpipe up`"
            ) from None
        views = _views(deployment)
        if not views:
            raise LookupError(
                f"deployment {name!r} has no schedule; add one under its `schedules:` in "
                "infra/prefect.yaml and run `fedpipe up`"
            )
        for entry, _ in views:
            client.update_deployment_schedule(deployment.id, entry.id, active=active)
    return [ScheduleView(v.cron, v.timezone, active) for _, v in views]


def kept_states(declared: list[dict[str, Any]], on_server: list[ScheduleView] | None) -> list[bool]:
    """Each declared schedule's ``active``: the server's, else the file's (default off).

    A schedule is the server's when it holds one with the same cron and timezone.
    """
    held = {view.key: view.active for view in on_server or []}
    return [
        held.get((str(spec["cron"]), spec.get("timezone")), bool(spec.get("active", False)))
        for spec in declared
    ]
