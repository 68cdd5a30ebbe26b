"""The only thing a fedpipe site runs: the participant flow, from the code installed here.

Prefect's own engine (``python -m prefect.engine``) loads a flow run's code from its
deployment: it runs the deployment's pull steps and imports its entrypoint. Anyone who can
create a deployment on a site's work pool could thereby run any code at the site. This entry
point takes only the flow run's id, refuses a run of any flow but ``federated-participant``,
and runs :func:`flows.participant.federated_participant` as installed here, never a pull
step or an entrypoint the server names. The site's warm executor forks it for each run
(:mod:`ops.site_executor`), and the site's worker starts nothing else
(:mod:`ops.site_worker`).

    python -m ops.site_engine FLOW_RUN_ID
"""

from __future__ import annotations

import os
import sys
from typing import Any
from uuid import UUID

PARTICIPANT_FLOW = "federated-participant"


def _refuse(flow_run: Any, message: str) -> None:
    """Mark the run failed with ``message`` and leave (it ran nothing)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Failed(message=message), force=True)
    print(f"fedpipe site engine: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    """Run the flow run named on the command line if, and only if, it is a participant run."""
    from prefect._internal.control_listener import configure_from_env
    from prefect.engine import _drive_run_flow_result, handle_engine_signals

    try:
        flow_run_id = UUID(sys.argv[1] if len(sys.argv) > 1 else os.environ["PREFECT__FLOW_RUN_ID"])
    except (KeyError, ValueError):
        print(f"fedpipe site engine: no valid flow run id in {sys.argv[1:]}", file=sys.stderr)
        sys.exit(1)
    configure_from_env()
    with handle_engine_signals(flow_run_id):
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import flow_run_logger, load_flow_run, run_flow

        flow_run = load_flow_run(flow_run_id=flow_run_id)
        with get_client(sync_client=True) as client:
            name = client.read_flow(flow_run.flow_id).name
        if name != PARTICIPANT_FLOW:
            _refuse(
                flow_run,
                f"this is a fedpipe site: it runs only the {PARTICIPANT_FLOW!r} flow, from "
                f"the code installed here; flow run {flow_run.name!r} is of flow {name!r}",
            )
        from flows.participant import federated_participant

        logger = flow_run_logger(flow_run=flow_run)
        # Prefect's run logger is a LoggerAdapter, which run_flow uses as a Logger
        result = run_flow(
            federated_participant,
            flow_run=flow_run,
            error_logger=logger,  # type: ignore[arg-type]
        )
        _drive_run_flow_result(federated_participant, result)


if __name__ == "__main__":
    main()
