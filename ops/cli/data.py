"""``fedpipe data check`` and ``fedpipe validate --data``: site files against the contract.

Every site folder on this machine is loaded as its site loads it (by name, against the
config's ``data`` section) before any server starts, and summarized in one table: rows,
label balance, unscaled and ID-like columns, and the error that stops a site, if any.
``fedpipe run`` does the same before round 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fl_components.config import FederationConfig, config_from_dict
from fl_components.data.check import DataCheck, check_sites, pin_columns, site_folder
from fl_components.errors import ConfigError, FedpipeError
from ops.cli.app import console, fail, read_config_file

if TYPE_CHECKING:
    from fl_components.federated_statistics import StatisticsResult


def data_table(check: DataCheck) -> Table:
    """One row per site: folder, rows, label balance, columns to look at, status."""
    table = Table(title=f"site data ({check.seconds:.2f}s)", title_justify="left")
    for header in ("site", "train / test rows", "label balance (train)", "look at", "status"):
        table.add_column(header)
    for row in check.sites:
        if row.skipped is not None:
            table.add_row(row.site, "", "", "", f"[dim]{row.skipped}[/]")
            continue
        if row.error is not None:
            table.add_row(row.site, "", "", "", "[red]cannot load[/]")
            continue
        total = max(1, sum(row.label_counts))
        balance = " ".join(f"{i}:{100 * c / total:.0f}%" for i, c in enumerate(row.label_counts))
        notes = [f"ID-like: {', '.join(row.id_like)}"] if row.id_like else []
        if row.unscaled:
            notes.append(f"unscaled: {', '.join(row.unscaled[:4])}")
        table.add_row(
            row.site,
            f"{row.train_rows} / {row.test_rows}",
            balance,
            "; ".join(notes),
            "[green]ok[/]",
        )
    return table


def report(check: DataCheck) -> None:
    """Print the table, then each problem and warning on its own line."""
    console.print(data_table(check))
    for line in check.problems:
        console.print(f"[bold red]error:[/] {line}", soft_wrap=True)
    for line in check.warnings:
        console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True)


def checked_before_run(config: FederationConfig) -> FederationConfig:
    """Check a local federation's site files before any server starts; exit 2 if one fails.

    With ``data.allow_unloadable_sites`` the problems are printed as warnings and the run
    starts (those sites drop out of every round).
    Returns the config with ``data.columns`` pinned to what every site holds (when unset),
    so each site refuses, at every job, files whose columns differ.
    """
    if config.data.source != "site_files" or config.backend != "local":
        return config
    check = check_sites(config)
    if not check.ok and config.data.allow_unloadable_sites:
        for line in check.problems:
            console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True)
        console.print(
            "[yellow]data.allow_unloadable_sites is true: the run starts without the sites above[/]"
        )
    elif not check.ok:
        report(check)
        console.print(
            "[bold red]run not started:[/] fix the site files named above "
            "(`fedpipe data check CONFIG` checks them again in seconds)"
        )
        raise typer.Exit(code=2)
    for line in check.warnings:
        console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True)
    pinned = pin_columns(config, check)
    if pinned.data.scale != "federation" or pinned.data.scaling is not None:
        return pinned
    # imported here: it imports torch (~1 s), which would delay every command's start
    from fl_components.federated_statistics import with_federation_scaling

    try:
        scaled = with_federation_scaling(pinned)
    except FedpipeError as error:
        fail(error)
    if scaled.data.scaling is not None:
        how = "secure aggregation" if scaled.data.scaling.secure else "sums in the clear"
        console.print(
            f"data.scale federation: mean and std of {scaled.data.scaling.rows} training rows "
            f"from the sites' summed statistics ({how}); `fedpipe stats` shows them"
        )
    return scaled


def data_check(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    site: Annotated[
        list[str] | None, typer.Option(help="Check only this site (repeatable).")
    ] = None,
) -> None:
    """Load each site's files against the config's data contract, without Prefect."""
    try:
        config = read_config_file(config_path)
        unknown = sorted(set(site or ()) - set(config.site_names))
        if unknown:
            raise FedpipeError(
                f"--site {', '.join(unknown)}: no such site in {config_path} "
                f"(sites: {', '.join(config.site_names)})"
            )
    except FedpipeError as error:
        fail(error)
    check_and_exit(config, names=tuple(site) if site else None)


def check_and_exit(config: FederationConfig, *, names: tuple[str, ...] | None = None) -> None:
    """Check the sites, print the table; exit 2 when any site cannot load or they disagree."""
    check = check_sites(config, names)
    report(check)
    if not check.ok:
        console.print(
            f"[bold red]{len(check.problems)} problem(s)[/]: no run would get past round 1 "
            "with these files; fix what each line names"
        )
        raise typer.Exit(code=2)
    console.print("[green]site data matches the contract[/]")


def _balance(counts: list[int]) -> str:
    total = max(1, sum(counts))
    return " ".join(f"{i}:{100 * c / total:.0f}%" for i, c in enumerate(counts))


def statistics_tables(result: StatisticsResult) -> list[Table]:
    """Per input: count, mean, std, missing; label balance (per site only in the clear)."""
    stats = result.stats
    how = "secure aggregation" if result.secure else "sums in the clear"
    columns = Table(
        title=f"federation: {stats.count} training rows of {len(result.sites)} sites ({how})",
        title_justify="left",
    )
    for header in ("input", "count", "mean", "std", "missing"):
        columns.add_column(header, justify="left" if header == "input" else "right")
    for name, mean, std in zip(result.inputs, stats.mean, stats.std, strict=True):
        columns.add_row(name, str(stats.count), f"{mean:.6g}", f"{std:.6g}", "0")
    labels = Table(title="label balance (training rows)", title_justify="left")
    for header in ("site", "rows", "balance"):
        labels.add_column(header)
    for site, sums in result.per_site.items():
        counts = [int(c) for c in sums.label_counts]
        labels.add_row(site, str(int(sums.count)), _balance(counts))
    labels.add_row("federation", str(stats.count), _balance(stats.label_counts.tolist()))
    return [columns, labels]


def stats(
    config_path: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    site: Annotated[
        list[str] | None,
        typer.Option(help="Only these sites (repeatable; at least 3 under secure aggregation)."),
    ] = None,
) -> None:
    """The federation's data statistics, formed from the sites' summed statistics.

    Each site sums its own training rows (count, sum and sum of squares per input, rows per
    class); only the sum over the sites is learnt, by secure aggregation when it is on (then
    no site's own figures are shown). No row leaves a site; no Prefect server is needed.
    """
    try:
        config = read_config_file(config_path)
        if config.data.source != "site_files":
            raise ConfigError(
                f"{config_path}: data.source is 'bundled'; `fedpipe stats` summarizes the "
                "sites' own files: set data.source: site_files"
            )
        unknown = sorted(set(site or ()) - set(config.site_names))
        if unknown:
            raise ConfigError(
                f"--site {', '.join(unknown)}: no such site in {config_path} "
                f"(sites: {', '.join(config.site_names)})"
            )
        # imported here: it imports torch (~1 s), which would delay every command's start
        from fl_components.federated_statistics import federation_statistics

        result = federation_statistics(config, sites=tuple(site) if site else None)
    except FedpipeError as error:
        fail(error)
    for table in statistics_tables(result):
        console.print(table)
    if result.epsilon is not None:
        console.print(
            f"differential privacy: each site clipped its values and noised its statistics "
            f"(epsilon {result.epsilon:g} each, charged to its privacy ledger)"
        )
    if result.secure:
        console.print(
            "[dim]per-site figures are not shown: under secure aggregation the coordinator "
            "learns only the federation's sum[/]"
        )
    console.print(
        "missing: 0 for every input (a site refuses files with missing values: "
        "`fedpipe data check`)"
    )


def check_site_data(config_path: Path, site: str, data: Path | None) -> None:
    """At a site: load its own folder against the federation's data contract, in seconds.

    What the site's worker will read at every job, checked before any job comes: the same
    table as ``fedpipe data check``, for this one site (``fedpipe site check CONFIG --site``).
    Exits 2 when the files cannot load.
    """
    try:
        config = read_config_file(config_path)
        if site not in config.site_names:
            raise ConfigError(
                f"--site {site}: no such site in {config_path} "
                f"(sites: {', '.join(config.site_names)})"
            )
        if data is not None:
            raw = config.model_dump(mode="json", exclude_unset=True)
            raw["sites"] = [
                {**entry, "data_path": str(data)} if entry["name"] == site else entry
                for entry in raw["sites"]
            ]
            config = config_from_dict(raw, source=f"{config_path} with --data {data}")
        folder = site_folder(config, site)
        if not folder.is_dir():
            raise ConfigError(
                f"site {site!r}: data folder {folder} does not exist on this host; give the "
                "site's folder with --data PATH (or fix sites[].data_path)"
            )
    except FedpipeError as error:
        fail(error)
    check_and_exit(config, names=(site,))
