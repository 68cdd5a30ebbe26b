"""A site's Prefect worker that starts nothing but fedpipe's participant entry point.

Prefect's process worker starts whatever command a deployment's job variables name, with
the environment and working folder they name, and resolves the flow for its hooks by running
the deployment's pull steps: anyone with access to the Prefect API could create a deployment
on a site's pool and run code at the site, or point the site's worker at another folder.
This worker keeps the process worker's polling, heartbeats, cancellation and crash
reporting, and replaces what a job may set:

- the command is always the site's executor client (``python -m ops.site_executor client``),
  which hands the run to the warm executor, which runs only :mod:`ops.site_engine`;
- the environment is the one the worker was started with (the site's folder, keys, API and
  result storage), plus what Prefect itself adds to identify the run; the job's ``env`` is
  dropped;
- the working folder is the worker's own; the job's ``working_dir`` is dropped;
- the flow behind a run's hooks is the installed participant flow, never one loaded from
  the deployment (no pull step ever runs here).

    python -m ops.site_worker --pool fedpipe-north [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.utilities.processutils import command_to_string
from prefect.workers import process as process_worker
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

SITE_COMMAND = [sys.executable, "-m", "ops.site_executor", "client"]


async def participant_flow_only(flow_run: Any) -> Any:
    """What the worker's hook runner gets instead of the deployment's code."""
    from flows.participant import federated_participant

    return federated_participant


# it serves the site's process pool, so it keeps the type "process"; Prefect warns that the
# type is registered twice (here, the subclass is the one this process means)
warnings.filterwarnings("ignore", message="Type 'SiteWorker'.*", category=UserWarning)


class SiteWorker(ProcessWorker):
    """A process worker whose flow runs all start as the site's participant entry point.

    Parameters
    ----------
    site_env : Mapping[str, str]
        The environment every flow run gets (the worker's own, at its start).
    workdir : Path
        The working folder of every flow run.
    """

    def __init__(self, *args: Any, site_env: Mapping[str, str], workdir: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.site_env = dict(site_env)
        self.workdir = workdir

    def pinned(self, configuration: ProcessJobConfiguration) -> ProcessJobConfiguration:
        """``configuration`` with the site's command, environment and folder."""
        # Prefect's starter adds the run's own identity (PREFECT__FLOW_RUN_ID, the control
        # channel) on top of this; nothing the job's variables set survives
        pinned = configuration.model_copy(
            update={
                "command": command_to_string(SITE_COMMAND),
                "env": dict(self.site_env),
                "working_dir": self.workdir,
            }
        )
        pinned._command_configured = True
        return pinned

    async def run(
        self,
        flow_run: Any,
        configuration: ProcessJobConfiguration,
        task_status: Any = None,
    ) -> ProcessWorkerResult:
        """Start the run as the participant entry point, whatever the job asked for."""
        return await super().run(flow_run, self.pinned(configuration), task_status)


def main(argv: list[str] | None = None) -> None:
    """``python -m ops.site_worker --pool POOL``."""
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS

    parser = argparse.ArgumentParser(prog="python -m ops.site_worker", description=__doc__)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    # the hooks of a crashed or cancelled run resolve the installed flow, not the deployment's
    process_worker.load_flow_from_flow_run = participant_flow_only  # type: ignore[assignment]
    workdir = Path(os.environ.get("PREFECT_HOME") or Path.cwd()) / "runs"
    workdir.mkdir(parents=True, exist_ok=True)

    async def serve() -> None:
        async with SiteWorker(
            work_pool_name=args.pool,
            name=args.name,
            limit=args.limit,
            heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
            site_env=dict(os.environ),
            workdir=workdir,
        ) as worker:
            await worker.start()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
