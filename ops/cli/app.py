"""The ``fedpipe`` Typer app and what its command modules share: console, folders, errors.

The commands live by concern in ``ops.cli.run`` (training runs), ``ops.cli.stack``
(the stack and its sites, ``doctor``), ``ops.cli.data`` (the sites' files against the data
contract) and ``ops.cli.report`` (what a run reports, budgets, privacy reports);
``ops.cli.main`` registers them on :data:`app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from fl_components.config import FederationConfig, load_config, parse_yaml
from fl_components.errors import ConfigError
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
data_app = typer.Typer(help="Check the sites' own data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(error: Exception) -> NoReturn:
    """Print an expected failure as one line and exit 2 (a bad command line or config)."""
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def read_config_file(path: Path) -> FederationConfig:
    """:func:`load_config`, refusing a folder or an empty file with what to give instead.

    Raises
    ------
    ConfigError
        If ``path`` is a folder, empty (or only comments), or not a valid config.
    """
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        hint = f" (it holds {', '.join(yamls)})" if yamls else ""
        raise ConfigError(
            f"{path} is a directory{hint}; give a federation config file, e.g. "
            "`fedpipe run examples/digits-10-sites.yaml`"
        )
    if path.is_file() and not parse_yaml(path.read_text(errors="replace"), source=str(path)):
        raise ConfigError(
            f"{path} is empty (no settings); a run needs at least a federation name and its "
            "sites: copy one of examples/*.yaml, or run the built-in demo with `fedpipe demo`"
        )
    return load_config(path)
