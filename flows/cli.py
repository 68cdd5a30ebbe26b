"""``fedpipe``: the command line (Typer + Rich).

``fedpipe demo`` trains the embedded default federation; ``fedpipe run FILE.yaml`` trains
any federation; ``fedpipe partition`` writes site folders; ``fedpipe validate`` checks a
config. Prefect runs ephemerally (no server to start) with its state under ``state/``.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fl_components.config import FederationConfig, load_config
from fl_components.errors import FedpipeError

app = typer.Typer(
    name="fedpipe",
    help="Federated learning as an MLOps pipeline "
    "(Prefect + MLflow + Opacus + secure aggregation).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
STATE_DIR = Path("state")


def prepare_environment() -> None:
    """Quiet, isolated defaults for an in-process (ephemeral) Prefect, unless set already."""
    os.environ.setdefault("PREFECT_HOME", str((STATE_DIR / "prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # Prefect's console handler at WARNING; the API handler still ships INFO logs to the UI
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def quiet_console_logs() -> None:
    """Keep library loggers at WARNING on the console."""
    for name in ("mlflow", "alembic", "httpx", "opacus"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def run_with_progress(config: FederationConfig) -> Any:
    """Run the training flow in-process, showing a live progress bar and a row per round."""
    prepare_environment()
    from flows.federated_training import federated_training
    from flows.progress import listening

    quiet_console_logs()
    console.print(
        f"[bold]fedpipe[/] federation [cyan]{config.name}[/]: {len(config.sites)} sites, "
        f"{config.rounds} rounds, {config.strategy.name}, {config.model.kind}, "
        f"backend {config.backend}"
    )
    console.print("[dim]starting Prefect (ephemeral, first start takes a few seconds)...[/]")
    columns = (
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("rounds", total=config.rounds, status="starting")
        started = time.perf_counter()

        def on_event(event: str, payload: dict[str, Any]) -> None:
            if event == "start":
                progress.console.print(
                    f"[dim]Prefect up after {time.perf_counter() - started:.1f}s; "
                    f"MLflow run {payload['run_id']}[/]"
                )
                progress.console.print(_round_header(config))
            elif event == "round":
                m = payload["metrics"]
                progress.console.print(_round_row(config, payload["round"], m))
                progress.update(
                    bar,
                    advance=1,
                    status=f"acc {m['global/accuracy']:.3f}  loss {m['global/loss']:.3f}",
                )

        with listening(on_event):
            summary = federated_training(config)
        # the temporary Prefect server stops at exit; give its event recorder a moment to
        # flush the last task-run events so the Prefect UI shows every run complete
        progress.update(bar, status="flushing Prefect events")
        time.sleep(3)
        return summary


def _round_header(config: FederationConfig) -> str:
    extra = "  epsilon" if getattr(config, "privacy", None) is not None else ""
    return (
        f"[bold]{'round':>5}  {'sites':>5}  {'accuracy':>8}  {'loss':>7}  {'seconds':>7}{extra}[/]"
    )


def _round_row(config: FederationConfig, round_num: int, m: dict[str, float]) -> str:
    row = (
        f"{round_num:>5}  {int(m['participants']):>5}  {m['global/accuracy']:>8.4f}  "
        f"{m['global/loss']:>7.4f}  {m['round_seconds']:>7.2f}"
    )
    if "privacy/epsilon" in m:
        row += f"  {m['privacy/epsilon']:>7.3f}"
    return row


def print_where_to_look(summary: Any) -> None:
    """Tell the user where the run was recorded and how to open both UIs on it."""
    prefect_home = os.environ.get("PREFECT_HOME", "")
    uri = summary.tracking_uri
    venv_bin = Path(sys.executable).parent
    console.print()
    console.print(
        f"[bold green]done[/]: final global accuracy [bold]{summary.final_accuracy:.4f}[/] "
        f"(loss {summary.final_loss:.4f}) after {summary.rounds} rounds"
    )
    console.print(f"MLflow run:   {summary.mlflow_run_id} (experiment {summary.experiment_id})")
    if summary.model_version:
        console.print(f"Model:        models:/{summary.federation}/{summary.model_version}")
    console.print("Open the MLflow UI:")
    console.print(
        f"  {venv_bin}/mlflow ui --backend-store-uri {shlex.quote(_absolute_sqlite(uri))} "
        "--host 127.0.0.1 --port 5000",
        soft_wrap=True,
    )
    console.print(
        f"  then http://127.0.0.1:5000/#/experiments/{summary.experiment_id}/runs/{summary.mlflow_run_id}",
        soft_wrap=True,
    )
    console.print("Open the Prefect UI:")
    console.print(
        f"  PREFECT_HOME={shlex.quote(prefect_home)} {venv_bin}/prefect server start "
        "--host 127.0.0.1",
        soft_wrap=True,
    )
    console.print("  then http://127.0.0.1:4200/runs", soft_wrap=True)


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


@app.command()
def demo(
    rounds: Annotated[int, typer.Option(help="Rounds to train.")] = 20,
) -> None:
    """Train the embedded default: 10 sites on scikit-learn's digits, Dirichlet(0.5), FedAvg."""
    try:
        config = FederationConfig(rounds=rounds)
        summary = run_with_progress(config)
    except FedpipeError as error:
        _fail(error)
    print_where_to_look(summary)


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    rounds: Annotated[int | None, typer.Option(help="Override the config's rounds.")] = None,
) -> None:
    """Train the federation described in CONFIG_PATH."""
    try:
        config = load_config(config_path)
        if rounds is not None:
            config = config.model_copy(update={"rounds": rounds})
            config = FederationConfig.model_validate(config.model_dump())
        summary = run_with_progress(config)
    except FedpipeError as error:
        _fail(error)
    print_where_to_look(summary)


@app.command()
def validate(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
) -> None:
    """Check a config and print it with every default filled in."""
    try:
        config = load_config(config_path)
    except FedpipeError as error:
        _fail(error)
    console.print_json(config.model_dump_json())
    console.print(f"[green]{config_path} is valid[/]")


@app.command()
def partition(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    overwrite: Annotated[bool, typer.Option(help="Rebuild existing site folders.")] = False,
) -> None:
    """Materialize site folders (sites/<federation>/<site>/train.npz, test.npz)."""
    from fl_components.federation import materialize_sites

    try:
        config = load_config(config_path)
        folders = materialize_sites(config, overwrite=overwrite)
    except FedpipeError as error:
        _fail(error)
    for folder in folders:
        console.print(f"{folder}")
    console.print(f"[green]{len(folders)} site folders ready[/]")


def main() -> None:
    """Console-script entry point."""
    app()
