"""The ``fedpipe`` Typer app and what its command modules share: console, folders, errors.

The commands live by concern in ``ops.cli.run`` (training runs), ``ops.cli.stack``
(the stack and its sites, ``doctor``) and ``ops.cli.report`` (what a run reports, budgets,
privacy reports); ``ops.cli.main`` registers them on :data:`app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from ops.stack.state import DEFAULT_STACK_DIR

app = typer.Typer(
    name="fedpipe",
    help="Federated learning as an MLOps pipeline "
    "(Prefect + MLflow + Opacus + secure aggregation).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
STATE_DIR = Path("state")
STACK_DIR = DEFAULT_STACK_DIR
site_app = typer.Typer(help="Onboard and manage the federation's sites.", no_args_is_help=True)
app.add_typer(site_app, name="site")


def fail(error: Exception) -> NoReturn:
    """Print an expected failure as one line and exit 2 (a bad command line or config)."""
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)
