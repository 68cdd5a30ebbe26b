"""``fedpipe demo`` / ``run`` / ``validate`` / ``partition``: training runs from the CLI.

``fedpipe demo`` trains the embedded default federation; ``fedpipe run FILE.yaml`` trains
any federation; ``fedpipe partition`` writes site folders; ``fedpipe validate`` checks a
config. Prefect runs ephemerally (no server to start) with its state under ``state/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fl_components.config import FederationConfig, config_from_dict, load_config
from fl_components.errors import ConfigError, FedpipeError
from ops.cli.app import STATE_DIR, console, fail, read_config_file
from ops.cli.report import print_dropouts, print_where_to_look, round_header, round_row
from ops.run_report import QuietRun, quiet_console


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


def run_with_progress(config: FederationConfig, *, quiet: QuietRun, resume: str | None) -> Any:
    """Run the training flow in-process, showing a live progress bar and a row per round.

    The temporary Prefect server boots while the heavy imports run (or a running one named by
    PREFECT_API_URL is reused). Whether the run succeeds or fails, the server is given this
    process's last events and logs, and a bounded time to record them, before it stops.
    """
    server = start_temporary_server()  # boots while the imports below run
    from ops.startup import warm_in_background

    if server is not None:  # the run's one-time costs, paid while it boots
        warm_in_background(config)
    from flows.federated_training import federated_training
    from flows.naming import run_name
    from flows.progress import listening
    from flows.runners import task_runner_for
    from ops.servers.temporary import TemporaryServer, flush_and_wait

    console.print(
        f"[bold]fedpipe[/] federation [cyan]{config.name}[/]: {len(config.sites)} sites, "
        f"{config.rounds} rounds, {config.strategy.name}, {config.task or config.model.kind}, "
        f"backend {config.backend}"
    )
    if isinstance(server, TemporaryServer):
        console.print(
            "[dim]starting Prefect (a temporary server; `fedpipe server start` keeps one)...[/]"
        )
    flow_run_ids: list[str] = []
    with Progress(*_COLUMNS, console=console, transient=False) as progress:
        bar = progress.add_task("rounds", total=config.rounds, status="starting")
        on_event = _progress_listener(
            config,
            progress,
            bar,
            quiet=quiet,
            temporary=isinstance(server, TemporaryServer),
            flow_run_ids=flow_run_ids,
        )
        named = run_name(config.name, strategy=config.strategy.name, started=datetime.now(UTC))
        flow = federated_training.with_options(
            flow_run_name=named, task_runner=task_runner_for(config)
        )
        try:
            if server is not None:
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


_COLUMNS = (
    TextColumn("[bold blue]{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TextColumn("{task.fields[status]}"),
)


def _progress_listener(
    config: FederationConfig,
    progress: Progress,
    bar: TaskID,
    *,
    quiet: QuietRun,
    temporary: bool,
    flow_run_ids: list[str],
) -> Callable[[str, dict[str, Any]], None]:
    """The flow's progress events as the console shows them: a row per round, the bar moved.

    ``temporary``: the run started its own Prefect server (its wait is Prefect's start).
    Each started flow run's id is appended to ``flow_run_ids``.
    """
    started = time.perf_counter()

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "start":
            from prefect.runtime import flow_run  # imported once Prefect runs: start-up time

            flow_run_ids.append(str(flow_run.get_id() or ""))
            took = f"{time.perf_counter() - started:.1f}s"
            prefect = (  # a reused server was up already: the wait was the run's start
                f"Prefect up after {took}" if temporary else f"run started after {took}"
            )
            progress.console.print(f"[dim]{prefect}; MLflow run {payload['run_id']}[/]")
            progress.console.print(round_header(config))
        elif event == "round":
            m = payload["metrics"]
            progress.console.print(round_row(config, payload["round"], m))
            progress.update(
                bar,
                completed=payload["round"],  # resumed: the rounds before count as done
                status=f"acc {m['global/accuracy']:.3f}  loss {m['global/loss']:.3f}",
            )
            for site, reason in payload.get("dropouts", {}).items():
                quiet.dropouts.add(site, f"round {payload['round']}: {reason}")
        elif event == "end":  # (resumed after its last round: no round row comes)
            progress.update(bar, completed=config.rounds)

    return on_event


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
        print_dropouts(quiet, unless_named_in=str(error))
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
    except Exception as error:
        from prefect.exceptions import CancelledRun  # imported by the run already

        if not isinstance(error, CancelledRun):
            raise
        console.print(f"[bold yellow]run cancelled:[/] {error}", soft_wrap=True)
        console.print(f"full log: {log_file}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    finally:
        quiet.close()
    print_where_to_look(summary)
    print_dropouts(quiet)
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


def start_temporary_server() -> Any:
    """Start this run's temporary Prefect server, unless there is one to reuse.

    First, any temporary server a killed run left behind is stopped.

    Reused: the server ``PREFECT_API_URL`` names (a stack's), else the local one that
    ``fedpipe server start`` left running under ``PREFECT_HOME``.
    """
    from ops.servers.temporary import RECORDS, ReusedServer, TemporaryServer, stop_orphans

    for line in stop_orphans(Path(os.environ["PREFECT_HOME"]) / RECORDS):  # a killed run's
        console.print(f"[dim]{line}[/]", soft_wrap=True)
    if os.environ.get("PREFECT_API_URL"):
        from ops.stack.credentials import adopt_stack_credentials

        # a stack's server asks for its credentials: read from its state folder (0600)
        adopt_stack_credentials(os.environ["PREFECT_API_URL"])
        return None
    from ops.servers.local import running_api_url

    api_url = running_api_url()
    if api_url is not None:
        console.print(f"[dim]Prefect: the local server at {api_url} (`fedpipe server stop`)[/]")
        os.environ["PREFECT_API_URL"] = api_url  # for the run, and to point at its UI after
        return ReusedServer(api_url)
    return TemporaryServer.start(Path(os.environ["PREFECT_HOME"]) / "server.log")


def _startup_timeout() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))


def demo(
    rounds: Annotated[int, typer.Option(help="Rounds to train.")] = 20,
) -> None:
    """Train the embedded default: 10 sites on scikit-learn's digits, Dirichlet(0.5), FedAvg."""
    try:
        config = config_from_dict({"rounds": rounds}, source="--rounds")
    except FedpipeError as error:
        fail(error)
    train_and_report(config)


def run(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    rounds: Annotated[int | None, typer.Option(help="Override the config's rounds.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Go on with this crashed run (its MLflow run id) from its last round."),
    ] = None,
    promote_anyway: Annotated[
        bool,
        typer.Option(
            help="Make the model champion even if it diverged, does not beat the "
            "majority-class baseline or was evaluated without some sites (sets every "
            "promotion.allow_* to true; the reason is still recorded)."
        ),
    ] = False,
) -> None:
    """Train the federation described in CONFIG_PATH."""
    try:
        config = read_config_file(config_path)
        raw = config.model_dump(mode="json", exclude_unset=True)
        flags = []
        if rounds is not None:
            raw["rounds"] = rounds
            flags.append(f"--rounds {rounds}")
        if promote_anyway:
            raw["promotion"] = {
                **raw.get("promotion", {}),
                **{f"allow_{rail}": True for rail in ("diverged", "below_baseline", "partial")},
            }
            flags.append("--promote-anyway")
        if flags:
            config = config_from_dict(raw, source=f"{config_path} with {' '.join(flags)}")
    except FedpipeError as error:
        fail(error)
    from ops.cli.data import checked_before_run

    train_and_report(checked_before_run(config), resume=resume)


def validate(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    data: Annotated[
        bool,
        typer.Option(
            "--data", help="Also load every site folder on this host against the data contract."
        ),
    ] = False,
) -> None:
    """Check a config and print it with every default filled in (and, with --data, the sites)."""
    try:
        config = read_config_file(config_path)
        identity = _checked_task(config)
    except FedpipeError as error:
        fail(error)
    console.print_json(config.model_dump_json())
    if identity is not None:
        console.print(
            f"task {identity.spec}: {identity.package} {identity.version}, "
            f"source sha256 {identity.sha256}",
            soft_wrap=True,
        )
    console.print(f"[green]{config_path} is valid[/]")
    if data:
        from ops.cli.data import check_and_exit

        check_and_exit(config)


def _checked_task(config: FederationConfig) -> Any:
    """A user's task imported and built, and checked for DP-SGD when record-level DP is on.

    The built-in task is built only under record-level DP (its models always pass): the
    plain check needs no torch.
    """
    if config.task is None and not config.privacy.record_level:
        return None
    from fl_components.task.check import check_task

    return check_task(config)


def partition(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    overwrite: Annotated[bool, typer.Option(help="Rebuild existing site folders.")] = False,
    pooled: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Split this pooled CSV/Parquet file into the config's sites (site_files): "
            "by data.partitioner (iid, dirichlet on the label, ...) or --by.",
        ),
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="With --from: one site per value of this column.")
    ] = None,
) -> None:
    """Materialize site folders: a bundled set's split (npz), or one pooled file's (--from)."""
    from fl_components.federation import materialize_sites

    try:
        config = load_config(config_path)
        if pooled is None and by is not None:
            raise ConfigError("--by splits a pooled file: give it with --from FILE")
        if pooled is None and config.data.source == "site_files":
            raise ConfigError(
                f"{config_path}: data.source is 'site_files': sites bring their own files "
                "(check them with `fedpipe data check`); to simulate the sites from one pooled "
                "file, give it with --from FILE"
            )
        if pooled is not None:
            folders = _partition_pooled(config, pooled, by=by, overwrite=overwrite)
        else:
            folders = materialize_sites(config, overwrite=overwrite)
    except FedpipeError as error:
        fail(error)
    for folder in folders:
        console.print(f"{folder}")
    console.print(f"[green]{len(folders)} site folders ready[/]")


def _partition_pooled(
    config: FederationConfig, pooled: Path, *, by: str | None, overwrite: bool
) -> list[Path]:
    from fl_components.data.pooled import split_pooled_file, write_simulated_sites

    if config.data.source != "site_files":
        raise ConfigError(
            "--from writes site files: set data.source: site_files and each site's "
            "data_path (the folder its train.csv and test.csv go to)"
        )
    sites = split_pooled_file(pooled, config, by=by)
    folders = write_simulated_sites(sites, config, overwrite=overwrite)
    for site in sites:
        held = f" ({by} = {site.value})" if site.value is not None else ""
        console.print(f"site {site.name}{held}: {len(site.train)} train / {len(site.test)} test")
    if by is not None and by not in config.data.drop:
        console.print(
            f"[yellow]note:[/] column {by!r} names the site in every row; add it to "
            "data.drop so the model does not learn it"
        )
    return folders
