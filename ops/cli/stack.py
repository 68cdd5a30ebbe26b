"""``fedpipe up`` / ``down`` / ``status`` / ``site ...``: the stack and its sites."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from fl_components.errors import FedpipeError
from ops.cli.app import STACK_DIR, console, fail


class Database(StrEnum):
    """The Prefect server's database (``fedpipe up --database``)."""

    auto = "auto"
    postgresql = "postgresql"
    sqlite = "sqlite"


def up(
    config_path: Annotated[
        Path, typer.Option("--config", help="Federation to deploy (YAML).")
    ] = Path("infra/federation.yaml"),
    state_dir: Annotated[Path, typer.Option(help="Stack state (SQLite, logs, PIDs).")] = STACK_DIR,
    mlflow_dir: Annotated[Path, typer.Option(help="MLflow store.")] = Path("mlflow/server"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server port (0: any free).")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port (0: any free).")] = 5000,
    database: Annotated[
        Database,
        typer.Option(
            help="The Prefect server's database: auto = the stack's own PostgreSQL when "
            "PostgreSQL is installed here, else SQLite (fine for a try-out, locks under load)."
        ),
    ] = Database.auto,
    database_url: Annotated[
        str | None,
        typer.Option(help="A PostgreSQL server of your own (postgresql+asyncpg://...)."),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Restart whatever of the running stack has stopped (a server, a worker).",
        ),
    ] = False,
) -> None:
    """Start Prefect + MLflow servers, a work pool and worker per site, and the deployments."""
    from ops.stack import lifecycle as stack

    started = time.perf_counter()
    if repair:
        try:
            lines = stack.repair(root=state_dir, database_url=database_url)
        except FedpipeError as error:
            fail(error)
        for line in lines:
            console.print(line, soft_wrap=True)
        done = f"{len(lines)} process(es) restarted" if lines else "nothing had stopped"
        console.print(f"[green]stack repaired[/]: {done}, in {time.perf_counter() - started:.1f}s")
        return
    try:
        record = stack.up(
            config_path=config_path,
            root=state_dir,
            mlflow_dir=mlflow_dir,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            database_url=database_url,
            database=database.value,
        )
    except FedpipeError as error:
        fail(error)
    console.print(f"[bold green]stack up[/] in {time.perf_counter() - started:.1f}s")
    _print_where(record)


def _print_where(record: dict[str, Any]) -> None:
    """The stack's UIs, its sites, and how to start a run."""
    # imported here: fl_components.tracking imports torch (~1 s), which would delay every
    # command's start
    from fl_components.tracking import CLASSIC_VIEW

    console.print(f"Prefect UI: {record['prefect_ui_url']}  (API {record['prefect_api_url']})")
    # the classic (model-training) view: MLflow 3 would open its GenAI view
    console.print(f"MLflow UI:  {record['mlflow_url']}/#/experiments?{CLASSIC_VIEW}")
    console.print(f"Prefect database: {record.get('database', 'sqlite')}", soft_wrap=True)
    if note := record.get("database_note"):
        console.print(f"[yellow]note[/]: {note}", soft_wrap=True)
    for site, entry in record["sites"].items():
        console.print(f"  site {site}: pool {entry['pool']}, data {entry['data']}")
    console.print(
        "Run it: Prefect UI > Deployments > federated-training > Run (or "
        f"`PREFECT_API_URL={record['prefect_api_url']} prefect deployment run "
        "federated-training/federated-training`); stop it: `fedpipe down`",
        soft_wrap=True,
    )


def down(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Stop exactly what `fedpipe up` started and check that nothing is left."""
    from ops.stack import lifecycle as stack

    try:
        lines = stack.down(root=state_dir)
    except FedpipeError as error:
        fail(error)
    for line in lines:
        console.print(line)
    console.print("[green]stack down: no process left[/]")


def status(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Show the stack's processes, servers and work pools."""
    from ops.stack import lifecycle as stack

    try:
        report = stack.status(root=state_dir)
    except FedpipeError as error:
        fail(error)
    console.print(f"Prefect {report['prefect_ui_url']}: healthy={report['prefect_healthy']}")
    console.print(f"MLflow  {report['mlflow_url']}: healthy={report['mlflow_healthy']}")
    console.print(f"Prefect database: {report['database']}", soft_wrap=True)
    for process in report["processes"]:
        state = "[green]running[/]" if process["running"] else "[red]stopped[/]"
        console.print(f"  {process['name']:<24} pid {process['pid']:<8} {state}")
    for pool, pool_status in report["pools"].items():
        console.print(f"  pool {pool:<28} {pool_status}")
    for site, executor in report.get("executors", {}).items():
        colour = "green" if executor == "warm" else "red" if "down" in executor else "yellow"
        console.print(f"  site {site:<28} [{colour}]{executor}[/]", soft_wrap=True)


def site_init(
    name: Annotated[str, typer.Argument(help="Site name (lowercase, digits, - and _).")],
    data: Annotated[Path, typer.Option(help="The site's data folder (train/test files).")],
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Onboard a site: keys, registry entry, work pool and participant deployment."""
    from ops.stack import lifecycle as stack

    try:
        entry = stack.site_init(name=name, data=data, root=state_dir)
    except FedpipeError as error:
        fail(error)
    console.print(f"[green]site {name} enrolled[/]: pool {entry['pool']}, keys {entry['keys']}")
    console.print("On the site's host, start its worker:")
    console.print(f"  {entry['worker_command']}", soft_wrap=True)


def site_restart(
    name: Annotated[str, typer.Argument(help="The site whose worker to restart.")],
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Restart one site's worker on the local stack, with its data, keys and warm executor."""
    from ops.stack import lifecycle as stack

    started = time.perf_counter()
    try:
        process = stack.restart_site(name=name, root=state_dir)
    except FedpipeError as error:
        fail(error)
    console.print(
        f"[green]site {name}: worker restarted[/] (pid {process['pid']}, log {process['log']}) "
        f"and its pool is ready, in {time.perf_counter() - started:.1f}s",
        soft_wrap=True,
    )


def site_worker(
    ctx: typer.Context,
    pool: Annotated[str, typer.Option(help="The site's work pool (fedpipe-<site>).")],
    socket_path: Annotated[
        Path | None,
        typer.Option("--socket", help="Warm executor socket [default: under PREFECT_HOME]."),
    ] = None,
) -> None:
    """Run a site's worker: a warm executor plus the site's pinned process worker.

    The worker starts every flow run as the participant entry point installed here, whatever
    command, environment or folder a deployment names (ops.site_worker); runs are forked
    from the executor, with Prefect, torch and fedpipe already imported (~2 s per dispatch
    instead of ~6 s). Extra options (--name, --limit) go to the worker. Stop it with Ctrl-C
    or SIGTERM.
    """
    from ops.site_executor import default_socket, run_worker

    path = socket_path or default_socket()
    console.print(f"site worker for pool {pool}: warm executor on {path}")
    raise typer.Exit(run_worker(pool, path, worker_args=list(ctx.args)))


def doctor(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Check the deployment: what is wrong, and the exact command that fixes it.

    The Prefect API and its UI's API address, every site's worker and warm executor, MLflow,
    the sites' keys against the registry, their data and their privacy budget left. Checks
    the stack recorded under --state-dir, or the Prefect API named by PREFECT_API_URL.
    Exit 0 when all is well, 1 otherwise.
    """
    import os

    from rich.table import Table

    from ops.doctor import diagnose

    api_url = os.environ.get("PREFECT_API_URL") or None
    try:
        checks = diagnose(state_dir=state_dir, api_url=api_url)
    except FedpipeError as error:
        console.print(f"[bold red]doctor failed:[/] {error}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    table = Table(title=f"fedpipe doctor ({api_url or state_dir})")
    for column in ("check", "", "found", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        mark = "[green]ok[/]" if check.ok else "[bold red]FAIL[/]"
        table.add_row(check.name, mark, check.detail, check.fix)
    console.print(table)
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(
            f"[bold red]{len(failed)} problem(s):[/] "
            + "; ".join(f"{c.name}: {c.fix or c.detail}" for c in failed),
            soft_wrap=True,
        )
        raise typer.Exit(code=1)
    console.print(f"[bold green]all {len(checks)} checks passed[/]")
