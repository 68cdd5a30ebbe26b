"""``fedpipe``: the command line (Typer + Rich).

``fedpipe demo`` trains the embedded default federation; ``fedpipe run FILE.yaml`` trains
any federation; ``fedpipe partition`` writes site folders; ``fedpipe validate`` checks a
config (with ``--data`` also the sites' files, as ``fedpipe data check`` does);
``fedpipe up`` / ``down`` / ``status`` / ``doctor`` / ``site ...`` start, stop and check the
local stack and its sites; ``fedpipe schedule on|off|show`` switches recurring retraining;
``fedpipe stats`` summarizes the sites' data from their summed statistics;
``fedpipe budget`` / ``privacy-report`` report. The commands live by concern in
:mod:`ops.cli.run`, :mod:`ops.cli.data`, :mod:`ops.cli.stack`, :mod:`ops.cli.schedule` and
:mod:`ops.cli.report`; they are registered here, in the order ``--help`` lists them.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

from ops.cli import approval as cli_approval
from ops.cli import certs as cli_certs
from ops.cli import data as cli_data
from ops.cli import report as cli_report
from ops.cli import run as cli_run
from ops.cli import schedule as cli_schedule
from ops.cli import stack as cli_stack
from ops.cli import trust as cli_trust
from ops.cli.app import app, data_app, site_app
from ops.cli.server import server_app

__all__ = ["app", "main"]

app.command()(cli_run.demo)
app.command()(cli_run.run)
app.command()(cli_run.validate)
app.command()(cli_run.partition)
app.command()(cli_stack.up)
app.command()(cli_stack.down)
app.command()(cli_stack.status)
app.command()(cli_stack.doctor)
app.command()(cli_certs.certs)
app.command()(cli_schedule.schedule)
app.command()(cli_report.budget)
app.command("privacy-report")(cli_report.privacy_report)
app.add_typer(server_app, name="server")
data_app.command("check")(cli_data.data_check)
app.command()(cli_data.stats)
app.add_typer(cli_trust.coordinator_app, name="coordinator")
cli_trust.key_app.command("show")(cli_trust.key_show)
cli_trust.key_app.command("rotate")(cli_trust.key_rotate)
site_app.add_typer(cli_trust.policy_app, name="policy")
cli_trust.policy_app.command("show")(cli_trust.policy_show)
cli_trust.policy_app.command("check")(cli_trust.policy_check)
site_app.command("audit")(cli_trust.site_audit)
site_app.command("check")(cli_trust.site_check)
site_app.command("pending")(cli_approval.pending)
site_app.command("approve")(cli_approval.approve)
site_app.command("reject")(cli_approval.reject)
site_app.command("init")(cli_stack.site_init)
site_app.command("restart")(cli_stack.site_restart)
site_app.command(
    "worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(cli_stack.site_worker)


def main() -> None:
    """Console-script entry point.

    After a command that imported torch (a run, a site's job), the interpreter's own
    teardown frees hundreds of thousands of objects one by one: 1-2 s after the last line,
    for nothing. Here the command's threads are joined and the exit handlers run as Python
    would (logs flushed, MLflow and Prefect closed), then the process ends at once.
    """
    try:
        app()
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    if "torch" not in sys.modules:
        raise SystemExit(code)
    _exit_without_teardown(code)


def _exit_without_teardown(code: object) -> NoReturn:
    """Exit like ``sys.exit(code)``, minus the interpreter's teardown (see :func:`main`)."""
    # what Python's own exit does first: run threading's exit hooks (executors shut down)
    # and join the non-daemon threads (private, but the very function the interpreter calls)
    threading._shutdown()  # type: ignore[attr-defined]
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # logging.shutdown, Prefect's and MLflow's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
