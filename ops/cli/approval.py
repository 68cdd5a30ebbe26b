"""``fedpipe site pending``, ``fedpipe site approve RUN``, ``fedpipe site reject RUN``.

What a site's data steward runs on the site's host when the site's policy
(``approval.mode``) makes a run wait: see what is asked, then sign the decision with the
site's own key (:mod:`fl_components.site.approval`). The decision is written to the site's
folder, where the waiting participant run verifies it against the site's key before it
goes on; the run is then resumed on the Prefect server when one is reachable (the site
also goes on by itself within a second of the decision).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fl_components.errors import FedpipeError
from ops.cli.app import STACK_DIR, console, fail

FolderOption = Annotated[
    Path | None,
    typer.Option(
        "--folder", help="The site's folder [default: $FEDPIPE_SITE_DIR, as its worker has]."
    ),
]
KeysOption = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="The site's key folder [default: $FEDPIPE_SITE_KEYS, else <folder>/keys].",
    ),
]
SiteOption = Annotated[
    str | None,
    typer.Option(
        "--site", help="A site of the one-machine stack (its folder and keys from the stack)."
    ),
]
StateOption = Annotated[Path, typer.Option("--state-dir", help="Stack state folder.")]


def _where(
    folder: Path | None, keys: Path | None, site: str | None, state_dir: Path
) -> tuple[Path, Path]:
    """The site's folder and key folder, from the options, the stack or the environment."""
    from fl_components.site.approval import site_keys_dir

    if site is not None:
        from ops.stack.state import load_record

        try:
            entry = load_record(state_dir).get("sites", {}).get(site)
        except FedpipeError as error:
            fail(error)
        if entry is None:
            fail(FedpipeError(f"the stack in {state_dir} has no site {site!r}; check --site"))
        folder = folder or Path(entry["data"])
        keys = keys or (Path(entry["keys"]) if entry.get("keys") else None)
    if folder is None and "FEDPIPE_SITE_DIR" in os.environ:
        folder = Path(os.environ["FEDPIPE_SITE_DIR"])
    if folder is None:
        fail(
            FedpipeError(
                "no site folder: pass --folder PATH or --site NAME (or set FEDPIPE_SITE_DIR)"
            )
        )
    if not folder.is_dir():
        fail(FedpipeError(f"site folder {folder} does not exist; check --folder"))
    return folder, keys or site_keys_dir(folder)


def pending(
    folder: FolderOption = None,
    site: SiteOption = None,
    state_dir: StateOption = STACK_DIR,
) -> None:
    """List the runs waiting for this site's approval, with what each asks."""
    from fl_components.site.approval import ApprovalStore

    where, _keys = _where(folder, None, site, state_dir)
    requests = ApprovalStore(where).pending()
    if not requests:
        console.print(f"no run waits for approval at {where}", soft_wrap=True)
        return
    for request in requests:
        console.print(f"[bold]run {request.run_id}[/]", soft_wrap=True)
        console.print(request.describe(), soft_wrap=True, markup=False, highlight=False)
        console.print()


def _resume(flow_run_id: str, api_url: str | None) -> str:
    """Resume the waiting participant run on the Prefect server, if reachable; what happened."""
    if not flow_run_id:
        return "no flow run to resume"
    from contextlib import nullcontext
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url else nullcontext()
    try:
        with settings:
            resume_flow_run(UUID(flow_run_id))
    except Exception as error:  # the site goes on without it: the decision file is what counts
        return (
            f"flow run {flow_run_id} not resumed from here ({type(error).__name__}); the site "
            "goes on by itself"
        )
    return f"flow run {flow_run_id} resumed"


def _api_url(site: str | None, state_dir: Path) -> str | None:
    """The stack's Prefect API (with --site), else the environment's."""
    if site is None:
        return None
    from ops.stack.state import load_record

    try:
        url = load_record(state_dir).get("prefect_api_url")
    except FedpipeError:
        return None
    return str(url) if url else None


def _decide(
    run: str,
    *,
    approved: bool,
    reason: str,
    folder: Path | None,
    keys: Path | None,
    site: str | None,
    state_dir: Path,
) -> None:
    from fl_components.site.approval import Verdict, decide

    where, keys_dir = _where(folder, keys, site, state_dir)
    verdict = Verdict.APPROVED if approved else Verdict.REJECTED
    try:
        request, signed = decide(where, run, verdict=verdict, reason=reason, keys_dir=keys_dir)
    except FedpipeError as error:
        fail(error)
    colour = "green" if approved else "yellow"
    console.print(
        f"[{colour}]{verdict}[/] run {request.run_id} of {request.federation} at site "
        f"{request.site} (config {request.config_sha256[:12]}...), signed with the site's key "
        f"{signed.key_id[:16]}...; {_resume(request.flow_run_id, _api_url(site, state_dir))}",
        soft_wrap=True,
    )


def approve(
    run: Annotated[
        str, typer.Argument(help="The coordinator run id (see `fedpipe site pending`).")
    ],
    reason: Annotated[str, typer.Option(help="A note kept in the audit trail.")] = "",
    folder: FolderOption = None,
    keys: KeysOption = None,
    site: SiteOption = None,
    state_dir: StateOption = STACK_DIR,
) -> None:
    """Approve a waiting run: sign the decision with the site's own key; the run goes on."""
    _decide(
        run, approved=True, reason=reason, folder=folder, keys=keys, site=site, state_dir=state_dir
    )


def reject(
    run: Annotated[
        str, typer.Argument(help="The coordinator run id (see `fedpipe site pending`).")
    ],
    reason: Annotated[
        str, typer.Option(help="Why; the coordinator sees it in the declined answer.")
    ],
    folder: FolderOption = None,
    keys: KeysOption = None,
    site: SiteOption = None,
    state_dir: StateOption = STACK_DIR,
) -> None:
    """Reject a waiting run: signed like an approval; the site declines the whole run."""
    _decide(
        run, approved=False, reason=reason, folder=folder, keys=keys, site=site, state_dir=state_dir
    )
