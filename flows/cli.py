"""``fedpipe``: the command line (Typer + Rich).

``fedpipe demo`` trains the embedded default federation; ``fedpipe run FILE.yaml`` trains
any federation; ``fedpipe partition`` writes site folders; ``fedpipe validate`` checks a
config. Prefect runs ephemerally (no server to start) with its state under ``state/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fl_components.config import FederationConfig, config_from_dict, load_config, parse_yaml
from fl_components.errors import ConfigError, FedpipeError
from flows.run_report import QuietRun, quiet_console

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
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
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


def run_with_progress(config: FederationConfig, *, quiet: QuietRun, resume: str | None) -> Any:
    """Run the training flow in-process, showing a live progress bar and a row per round.

    The temporary Prefect server boots while the heavy imports run (or a running one named by
    PREFECT_API_URL is reused). Whether the run succeeds or fails, the server is given this
    process's last events and logs, and a bounded time to record them, before it stops.
    """
    server = start_temporary_server()  # boots while the imports below run
    from flows.federated_training import federated_training
    from flows.naming import run_name
    from flows.progress import listening
    from flows.runners import task_runner_for
    from flows.startup import warm_in_background
    from flows.temporary_server import flush_and_wait

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
    flow_run_ids: list[str] = []
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("rounds", total=config.rounds, status="starting")
        started = time.perf_counter()

        def on_event(event: str, payload: dict[str, Any]) -> None:
            if event == "start":
                from prefect.runtime import flow_run

                flow_run_ids.append(str(flow_run.get_id() or ""))
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
                for site, reason in payload.get("dropouts", {}).items():
                    quiet.dropouts.add(site, f"round {payload['round']}: {reason}")

        named = run_name(config.name, started=datetime.now(UTC))
        flow = federated_training.with_options(
            flow_run_name=named, task_runner=task_runner_for(config)
        )
        try:
            if server is not None:
                warm_in_background()
                server.wait_ready(timeout=_startup_timeout())
            with server.serving() if server else contextlib.nullcontext(), listening(on_event):
                try:
                    return flow(config, resume=resume)
                finally:
                    # send this process's last events and logs, wait (bounded) for the server
                    # to record every task run, so that the Prefect UI shows them all final
                    progress.update(bar, status="flushing Prefect events")
                    flush_and_wait(flow_run_ids[0] if flow_run_ids else "", timeout=30)
        finally:
            if server is not None:
                server.stop()


def train_and_report(config: FederationConfig, *, resume: str | None = None) -> None:
    """Run ``config`` in-process and tell the user how it went, in one paragraph.

    Exits 1 when the run failed (the reason, one line per site that dropped out, and the
    log file with the full trace), 3 when it finished but some site gave nothing in every
    round, 0 otherwise.
    """
    prepare_environment()
    quiet_console_logs()
    log_file = (STATE_DIR / "logs" / f"{config.name}.log").resolve()
    quiet = quiet_console(log_file, sites=config.site_names)
    try:
        summary = run_with_progress(config, quiet=quiet, resume=resume)
    except FedpipeError as error:
        console.print(f"[bold red]run failed:[/] {error}")
        _print_dropouts(quiet, unless_named_in=str(error))
        console.print(f"full log: {log_file}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    except RuntimeError as error:
        # Prefect says so only in this message; anything else is a bug, shown as such
        if "ephemeral Prefect API server" not in str(error):
            raise
        wait = os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
        console.print(
            f"[bold red]run failed:[/] Prefect's temporary server did not answer within {wait}s "
            "(a busy machine starts it slowly); set "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or start a server once "
            "with `fedpipe up` and set PREFECT_API_URL",
            soft_wrap=True,
        )
        console.print(f"full log: {log_file}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    finally:
        quiet.close()
    print_where_to_look(summary)
    _print_dropouts(quiet)
    silent = sorted(
        site for site, lines in quiet.dropouts.messages.items() if len(lines) >= config.rounds
    )
    if silent:
        console.print(
            f"[bold yellow]warning:[/] {', '.join(silent)} gave nothing in any round: the model "
            f"was trained without them; fix what the lines above name (full log: {log_file})",
            soft_wrap=True,
        )
        raise typer.Exit(code=3)


def _print_dropouts(quiet: QuietRun, *, unless_named_in: str = "") -> None:
    """One line per site that dropped out, but not for a site the error already names."""
    lines = [
        line
        for site, line in zip(sorted(quiet.dropouts.messages), quiet.dropouts.lines(), strict=True)
        if f"{site}:" not in unless_named_in
    ]
    if lines:
        console.print(f"[yellow]{len(lines)} site(s) dropped out:[/]")
    for line in lines:
        console.print(f"  {line}", soft_wrap=True)


def start_temporary_server() -> Any:
    """Start this run's temporary Prefect server, unless PREFECT_API_URL names one to reuse."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from flows.temporary_server import TemporaryServer

    return TemporaryServer.start(Path(os.environ["PREFECT_HOME"]) / "server.log")


def _startup_timeout() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))


def _round_header(config: FederationConfig) -> str:
    extra = "  epsilon" if config.privacy.mode != "off" else ""
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
        config = config_from_dict({"rounds": rounds}, source="--rounds")
    except FedpipeError as error:
        _fail(error)
    train_and_report(config)


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    rounds: Annotated[int | None, typer.Option(help="Override the config's rounds.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Go on with this crashed run (its MLflow run id) from its last round."),
    ] = None,
) -> None:
    """Train the federation described in CONFIG_PATH."""
    try:
        config = read_config_file(config_path)
        if rounds is not None:
            raw = {**config.model_dump(mode="json", exclude_unset=True), "rounds": rounds}
            config = config_from_dict(raw, source=f"{config_path} with --rounds {rounds}")
    except FedpipeError as error:
        _fail(error)
    train_and_report(config, resume=resume)


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


@app.command()
def validate(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
) -> None:
    """Check a config and print it with every default filled in."""
    try:
        config = read_config_file(config_path)
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


STACK_DIR = STATE_DIR / "stack"
site_app = typer.Typer(help="Onboard and manage the federation's sites.", no_args_is_help=True)
app.add_typer(site_app, name="site")


@app.command()
def up(
    config_path: Annotated[
        Path, typer.Option("--config", help="Federation to deploy (YAML).")
    ] = Path("infra/federation.yaml"),
    state_dir: Annotated[Path, typer.Option(help="Stack state (SQLite, logs, PIDs).")] = STACK_DIR,
    mlflow_dir: Annotated[Path, typer.Option(help="MLflow store.")] = Path("mlflow/server"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server port (0: any free).")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port (0: any free).")] = 5000,
    database_url: Annotated[
        str | None,
        typer.Option(help="Prefect database (postgresql+asyncpg://...); SQLite if unset."),
    ] = None,
) -> None:
    """Start Prefect + MLflow servers, a work pool and worker per site, and the deployments."""
    from flows import stack

    started = time.perf_counter()
    try:
        record = stack.up(
            config_path=config_path,
            root=state_dir,
            mlflow_dir=mlflow_dir,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            database_url=database_url,
        )
    except FedpipeError as error:
        _fail(error)
    console.print(f"[bold green]stack up[/] in {time.perf_counter() - started:.1f}s")
    console.print(f"Prefect UI: {record['prefect_ui_url']}  (API {record['prefect_api_url']})")
    console.print(f"MLflow UI:  {record['mlflow_url']}")
    for site, entry in record["sites"].items():
        console.print(f"  site {site}: pool {entry['pool']}, data {entry['data']}")
    console.print(
        "Run it: Prefect UI > Deployments > federated-training > Run (or "
        f"`PREFECT_API_URL={record['prefect_api_url']} prefect deployment run "
        "federated-training/federated-training`); stop it: `fedpipe down`",
        soft_wrap=True,
    )


@app.command()
def down(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Stop exactly what `fedpipe up` started and check that nothing is left."""
    from flows import stack

    try:
        lines = stack.down(root=state_dir)
    except FedpipeError as error:
        _fail(error)
    for line in lines:
        console.print(line)
    console.print("[green]stack down: no process left[/]")


@app.command()
def status(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Show the stack's processes, servers and work pools."""
    from flows import stack

    try:
        report = stack.status(root=state_dir)
    except FedpipeError as error:
        _fail(error)
    console.print(f"Prefect {report['prefect_ui_url']}: healthy={report['prefect_healthy']}")
    console.print(f"MLflow  {report['mlflow_url']}: healthy={report['mlflow_healthy']}")
    for process in report["processes"]:
        state = "[green]running[/]" if process["running"] else "[red]stopped[/]"
        console.print(f"  {process['name']:<24} pid {process['pid']:<8} {state}")
    for pool, pool_status in report["pools"].items():
        console.print(f"  pool {pool:<28} {pool_status}")
    for site, executor in report.get("executors", {}).items():
        colour = "green" if executor == "warm" else "red" if "down" in executor else "yellow"
        console.print(f"  site {site:<28} [{colour}]{executor}[/]", soft_wrap=True)


@site_app.command("init")
def site_init(
    name: Annotated[str, typer.Argument(help="Site name (lowercase, digits, - and _).")],
    data: Annotated[Path, typer.Option(help="The site's data folder (train/test files).")],
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Onboard a site: keys, registry entry, work pool and participant deployment."""
    from flows import stack

    try:
        entry = stack.site_init(name=name, data=data, root=state_dir)
    except FedpipeError as error:
        _fail(error)
    console.print(f"[green]site {name} enrolled[/]: pool {entry['pool']}, keys {entry['keys']}")
    console.print("On the site's host, start its worker:")
    console.print(f"  {entry['worker_command']}", soft_wrap=True)


@site_app.command("restart")
def site_restart(
    name: Annotated[str, typer.Argument(help="The site whose worker to restart.")],
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Restart one site's worker on the local stack, with its data, keys and warm executor."""
    from flows import stack

    started = time.perf_counter()
    try:
        process = stack.restart_site(name=name, root=state_dir)
    except FedpipeError as error:
        _fail(error)
    console.print(
        f"[green]site {name}: worker restarted[/] (pid {process['pid']}, log {process['log']}) "
        f"and its pool is ready, in {time.perf_counter() - started:.1f}s",
        soft_wrap=True,
    )


@site_app.command(
    "worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def site_worker(
    ctx: typer.Context,
    pool: Annotated[str, typer.Option(help="The site's work pool (fedpipe-<site>).")],
    socket_path: Annotated[
        Path | None,
        typer.Option("--socket", help="Warm executor socket [default: under PREFECT_HOME]."),
    ] = None,
) -> None:
    """Run a site's worker: a warm executor plus `prefect worker start --type process`.

    Flow runs of the participant deployment are forked from the executor, with Prefect,
    torch and fedpipe already imported (~2 s per dispatch instead of ~6 s); extra options
    are passed to `prefect worker start`. Stop it with Ctrl-C or SIGTERM.
    """
    from flows.site_executor import default_socket, run_worker

    path = socket_path or default_socket()
    console.print(f"site worker for pool {pool}: warm executor on {path}")
    raise typer.Exit(run_worker(pool, path, worker_args=list(ctx.args)))


@app.command()
def budget(
    site_dir: Annotated[
        Path | None, typer.Argument(help="A site's folder (holds privacy_ledger.json).")
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="Report epsilon at this delta (default: the ledger's).")
    ] = None,
    federation: Annotated[
        str | None,
        typer.Option(help="Show this federation's participant-level ledger (coordinator side)."),
    ] = None,
    tracking_uri: Annotated[
        str, typer.Option(help="MLflow store the federation ledger lives next to.")
    ] = "sqlite:///mlflow/mlflow.db",
) -> None:
    """Print a site's privacy ledger, or (--federation) the coordinator's across runs."""
    from fl_components.privacy.inspection import check_delta

    try:
        if delta is not None:
            check_delta(delta)
        if federation is not None:
            _federation_budget(federation, delta=delta, tracking_uri=tracking_uri)
        elif site_dir is not None:
            _site_budget(site_dir, delta=delta)
        else:
            raise FedpipeError("give a site folder (fedpipe budget SITE) or --federation NAME")
    except FedpipeError as error:
        _fail(error)


def _site_budget(site_dir: Path, *, delta: float | None) -> None:
    from rich.table import Table

    from fl_components.privacy.inspection import site_ledger_path
    from fl_components.privacy.ledger import PrivacyLedger, epsilon_of

    ledger = PrivacyLedger.load(site_ledger_path(site_dir))
    at = delta if delta is not None else ledger.delta or 1e-5
    table = Table(title=f"privacy ledger of {ledger.site} ({ledger.accountant}, delta {at:g})")
    for column in ("federation", "round", "steps", "sigma", "q", "epsilon after", "left", "run"):
        table.add_column(column, justify="right")
    for index, entry in enumerate(ledger.entries):
        spent = epsilon_of(ledger.history[: index + 1], delta=at, accountant=ledger.accountant)
        left = "∞" if ledger.max_epsilon is None else f"{max(0.0, ledger.max_epsilon - spent):.3f}"
        table.add_row(
            entry.federation,
            str(entry.round),
            str(entry.steps),
            f"{entry.noise_multiplier:.4g}",
            f"{entry.sample_rate:.4g}",
            f"{spent:.3f}",
            left,
            entry.mlflow_run_id or "",
        )
    console.print(table)
    total = ledger.epsilon(at)
    limit = "unlimited" if ledger.max_epsilon is None else f"{ledger.max_epsilon:g}"
    console.print(
        f"{len(ledger.entries)} rounds, epsilon spent [bold]{total:.3f}[/] at delta {at:g}, "
        f"max_epsilon {limit}"
    )


def _federation_budget(name: str, *, delta: float | None, tracking_uri: str) -> None:
    from rich.table import Table

    from fl_components.config import TrackingConfig
    from fl_components.privacy.federation_ledger import FederationLedger, federation_ledger_path

    path = federation_ledger_path(TrackingConfig(tracking_uri=tracking_uri), name)
    if not path.is_file():
        raise FedpipeError(
            f"{path} does not exist: federation {name!r} has run no participant-level DP "
            "(privacy.mode participant or both) with this store; check --tracking-uri"
        )
    ledger = FederationLedger.load(path, federation=name)
    table = Table(title=f"participant-level ledger of {name} ({path})")
    for column in ("run", "flow run", "from run", "rounds", "z", "q", "delta", "model epsilon"):
        table.add_column(column, justify="right")
    accountant = "rdp"
    for run in ledger.runs.values():
        accountant = run.accountant
        at = delta if delta is not None else run.delta
        epsilon = ledger.epsilon(run.mlflow_run_id, delta=at, accountant=run.accountant)
        table.add_row(
            run.mlflow_run_id,
            run.flow_run_id or "",
            run.parent_run_id or "fresh",
            str(len(run.rounds)),
            ", ".join(sorted({f"{r.noise_multiplier:g}" for r in run.rounds})),
            ", ".join(sorted({f"{r.sample_rate:g}" for r in run.rounds})),
            f"{at:g}",
            f"{epsilon:.3f}",
        )
    console.print(table)
    last = list(ledger.runs.values())[-1] if ledger.runs else None
    at = delta if delta is not None else (last.delta if last else 1e-5)
    total = ledger.total_epsilon(delta=at, accountant=accountant)
    console.print(
        f"{len(ledger.runs)} runs; 'model epsilon' composes each run with the runs its model "
        f"descends from; all runs together: [bold]{total:.3f}[/] at delta {at:g}"
    )


@app.command("privacy-report")
def privacy_report(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a training run.")],
    tracking_uri: Annotated[
        str, typer.Option(help="MLflow tracking URI the run lives in.")
    ] = "sqlite:///mlflow/mlflow.db",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON instead.")] = False,
) -> None:
    """Print a run's privacy report (logged as privacy/privacy_report.{md,json})."""
    from rich.markdown import Markdown

    from fl_components.privacy.report import PRIVACY_REPORT_JSON, PRIVACY_REPORT_MD
    from fl_components.tracking import read_run_artifact

    path = PRIVACY_REPORT_JSON if as_json else PRIVACY_REPORT_MD
    try:
        text = read_run_artifact(tracking_uri, run_id=run_id, path=path)
    except FedpipeError as error:
        _fail(error)
    if as_json:
        print(text)
    else:
        console.print(Markdown(text))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
