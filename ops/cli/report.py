"""What the CLI reports: a run's rounds, where it was recorded, privacy budgets and reports.

``fedpipe budget`` prints a site's privacy ledger (or the coordinator's participant-level
ledger); ``fedpipe privacy-report`` a run's privacy report.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fl_components.config import FederationConfig
from fl_components.errors import FedpipeError
from ops.cli.app import console, fail
from ops.run_report import QuietRun


def print_dropouts(quiet: QuietRun, *, unless_named_in: str = "") -> None:
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


def round_header(config: FederationConfig) -> str:
    """The header of the per-round table ``fedpipe run`` prints."""
    extra = "  epsilon" if config.privacy.mode != "off" else ""
    return (
        f"[bold]{'round':>5}  {'sites':>5}  {'accuracy':>8}  {'loss':>7}  {'seconds':>7}{extra}[/]"
    )


def round_row(config: FederationConfig, round_num: int, m: dict[str, float]) -> str:
    """One round's row of that table, from the round's metrics."""
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
    last = summary.history[-1] if summary.history else {}
    federated = last.get("sites/mean_accuracy")
    central = last.get("global/accuracy")
    scores = (
        f"accuracy on the central test split [bold]{central:.4f}[/], "
        if central is not None and federated is not None and central != federated
        else ""
    )
    scores += (
        f"federated accuracy (the sites' held-out splits) [bold]{federated:.4f}[/]"
        if federated is not None
        else f"final accuracy [bold]{summary.final_accuracy:.4f}[/]"
    )
    console.print(
        f"[bold green]done[/]: {scores} (loss {summary.final_loss:.4f}) after "
        f"{summary.rounds} rounds",
        soft_wrap=True,
    )
    console.print(f"MLflow run:   {summary.mlflow_run_id} (experiment {summary.experiment_id})")
    if summary.model_version:
        console.print(f"Model:        models:/{summary.federation}/{summary.model_version}")
    if getattr(summary, "promotion", ""):
        console.print(f"Promotion:    {summary.promotion}", soft_wrap=True, markup=False)
    port = _free_port(5000)
    console.print("Open the MLflow UI:")
    console.print(
        f"  {venv_bin}/mlflow ui --backend-store-uri {shlex.quote(_absolute_sqlite(uri))} "
        f"--host 127.0.0.1 --port {port}",
        soft_wrap=True,
    )
    # imported here: fl_components.tracking imports torch (~1 s), which would delay every
    # command's start (this runs after the run, when it is imported already)
    from fl_components.tracking import run_url

    link = run_url(
        f"http://127.0.0.1:{port}",
        experiment_id=summary.experiment_id,
        run_id=summary.mlflow_run_id,
    )
    console.print(f"  then {link}", soft_wrap=True)
    api_url = os.environ.get("PREFECT_API_URL", "")
    if api_url:  # a server that outlives the run: the local one, or a stack's
        ui = api_url.removesuffix("/").removesuffix("/api")
        console.print(f"Prefect UI:   {ui}/runs", soft_wrap=True)
    else:  # the run's temporary server is gone; its runs are in PREFECT_HOME's database
        console.print("Open the Prefect UI (and keep it for the next runs):")
        console.print(
            f"  PREFECT_HOME={shlex.quote(prefect_home)} {venv_bin}/fedpipe server start",
            soft_wrap=True,
        )
        console.print("  then http://127.0.0.1:4200/runs", soft_wrap=True)


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it now, else a port the system has free."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


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
        fail(error)


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
        fail(error)
    if as_json:
        print(text)
    else:
        console.print(Markdown(text))
