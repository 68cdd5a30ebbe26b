"""``fedpipe schedule on|off|show``: the coordinator deployment's recurring retraining.

The state lives on the Prefect server (the UI's schedule switch changes the same thing);
``fedpipe up`` keeps it (see :mod:`ops.stack.schedules`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fl_components.errors import FedpipeError
from ops.cli.app import STACK_DIR, console, fail


class ScheduleAction(StrEnum):
    """What ``fedpipe schedule`` does."""

    ON = "on"
    OFF = "off"
    SHOW = "show"


def schedule(
    action: Annotated[
        ScheduleAction, typer.Argument(help="on: start recurring retraining; off: stop; show.")
    ] = ScheduleAction.SHOW,
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Switch the federated-training deployment's schedule on or off, or show it."""
    from prefect.settings import temporary_settings

    from ops.stack.credentials import prefect_settings
    from ops.stack.schedules import COORDINATOR_DEPLOYMENT, read_schedules, set_schedules
    from ops.stack.state import load_record

    try:
        api_url = load_record(state_dir)["prefect_api_url"]
    except FedpipeError as error:
        fail(error)
    try:
        with temporary_settings(updates=prefect_settings(state_dir, api_url)):
            if action is ScheduleAction.SHOW:
                views = read_schedules()
                if views is None:
                    raise LookupError(
                        f"no deployment {COORDINATOR_DEPLOYMENT!r} on {api_url}; "
                        "start the stack with `fedpipe up`"
                    )
            else:
                views = set_schedules(action is ScheduleAction.ON)
    except LookupError as error:
        fail(error)
    except Exception as error:  # the server down or refusing: one line, not a traceback
        fail(RuntimeError(f"the Prefect server at {api_url} did not answer ({error})"))
    if not views:
        console.print(f"{COORDINATOR_DEPLOYMENT}: no schedule")
    for view in views:
        state = "[green]on[/]" if view.active else "[yellow]off[/]"
        console.print(
            f"{COORDINATOR_DEPLOYMENT}: cron {view.cron!r} ({view.timezone or 'UTC'}) {state}"
        )
