"""The ``fedpipe`` Typer app and what its command modules share: console, folders, errors.

The commands live by concern in ``flows.cli_run`` (training runs), ``flows.cli_stack``
(the stack and its sites, ``doctor``) and ``flows.cli_report`` (what a run reports, budgets,
privacy reports); ``flows.cli`` registers them on :data:`app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from flows.stack_state import DEFAULT_STACK_DIR

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
data_app = typer.Typer(help="Check the sites' own data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(error: Exception) -> NoReturn:
    """Print an expected failure as one line and exit 2 (a bad command line or config)."""
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)
