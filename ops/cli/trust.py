"""``fedpipe site policy show|check``, ``fedpipe site audit``, ``fedpipe coordinator key ...``.

What a site's data steward and the federation's operator use to see and check the trust
set-up: the site's policy and enrolment, the site's audit trail (its hash chain verified),
and the coordinator's key (shown, or rotated: each site re-pins only a rotation signed by
the key it already pins).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
import yaml

from fl_components.errors import FedpipeError
from fl_components.wire.site_job import Stage
from ops.cli.app import STACK_DIR, console, fail

coordinator_app = typer.Typer(help="The federation coordinator's identity.", no_args_is_help=True)
key_app = typer.Typer(help="Show or rotate the coordinator's signing key.", no_args_is_help=True)
coordinator_app.add_typer(key_app, name="key")
policy_app = typer.Typer(help="The site's own policy (never sent by the coordinator).")

FolderOption = Annotated[
    Path | None,
    typer.Option(
        "--folder", help="The site's folder [default: $FEDPIPE_SITE_DIR, as its worker has]."
    ),
]


def _site_folder(folder: Path | None) -> Path:
    chosen = folder or (
        Path(os.environ["FEDPIPE_SITE_DIR"]) if "FEDPIPE_SITE_DIR" in os.environ else None
    )
    if chosen is None:
        fail(FedpipeError("no site folder: pass --folder PATH (or set FEDPIPE_SITE_DIR)"))
    if not chosen.is_dir():
        fail(FedpipeError(f"site folder {chosen} does not exist"))
    return chosen


def policy_show(folder: FolderOption = None) -> None:
    """Print the site's policy and what it was enrolled with."""
    from fl_components.site.enrolment import load_enrolment
    from fl_components.site.policy import load_policy, policy_path
    from fl_components.wire.rejection import RejectedJob

    site = _site_folder(folder)
    try:
        policy = load_policy(policy_path(site))
        enrolment = load_enrolment(site)
    except (FedpipeError, RejectedJob) as error:
        fail(error)
    console.print(f"[bold]{policy_path(site)}[/]")
    console.print(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False), soft_wrap=True)
    console.print(
        f"enrolled as site {enrolment.site!r} of federation {enrolment.federation!r}; "
        f"coordinator key {enrolment.coordinator.key_id}; models only from "
        f"{enrolment.exchange_dir}; peers' keys from {enrolment.registry}",
        soft_wrap=True,
    )


def site_check(
    config_path: Annotated[
        Path | None,
        typer.Argument(help="Federation config (YAML): check this site's data against it."),
    ] = None,
    site: Annotated[
        str | None, typer.Option("--site", help="This site's name in the federation.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="This site's data folder (default: its sites[].data_path)."),
    ] = None,
    folder: FolderOption = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task", help="The task (module:attribute) [default: the policy's task.spec]."
        ),
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option(
            "--sha256", help="The expected source hash [default: the policy's task.sha256]."
        ),
    ] = None,
) -> None:
    """At a site, before any job comes: check the task's code is here and the files load.

    The task (``--task``, or the one the site's policy pins, or the config's ``task``) must be
    importable with the expected source hash; with a federation config and ``--site``, the
    site's own folder is loaded against the federation's data contract (the table of
    ``fedpipe data check``, for this one site). Exits 1 on a hash mismatch, 2 when the
    files cannot load or nothing was named to check.
    """
    config_task: str | None = None
    if config_path is not None:
        if site is None:
            fail(FedpipeError("site check CONFIG: name this site with --site NAME"))
        from ops.cli.app import read_config_file

        try:
            config_task = read_config_file(config_path).task
        except FedpipeError as error:
            fail(error)
    checked = _check_task(folder, task, sha256, config_task=config_task)
    if config_path is not None and site is not None:
        from ops.cli.data import check_site_data

        check_site_data(config_path, site, data)  # exits 2 if the files cannot load
        checked = True
    if not checked:
        fail(
            FedpipeError(
                "site check: nothing to check; give a federation config and --site NAME (the "
                "site's data), --task module:attribute, or pin task.spec in the site's "
                "policy.yaml (--folder PATH)"
            )
        )


def _check_task(
    folder: Path | None, task: str | None, sha256: str | None, *, config_task: str | None
) -> bool:
    """Check the task named here, by the policy, or by the config; False if none is named."""
    from fl_components.site.policy import load_policy, policy_path
    from fl_components.task.loading import identity_of

    site = folder or (
        Path(os.environ["FEDPIPE_SITE_DIR"]) if "FEDPIPE_SITE_DIR" in os.environ else None
    )
    pinned_spec: str | None = None
    pinned: tuple[str, ...] = ()
    if site is not None and policy_path(site).is_file():
        try:
            policy = load_policy(policy_path(site))
        except FedpipeError as error:
            fail(error)
        pinned_spec, pinned = policy.task.spec, policy.task.sha256
    spec = task or pinned_spec or config_task
    if spec is None:
        return False
    expected = (sha256,) if sha256 else pinned
    try:
        identity = identity_of(spec)
    except FedpipeError as error:
        fail(error)
    console.print(
        f"task {identity.spec}: importable; package {identity.package} {identity.version}; "
        f"source sha256 {identity.sha256}",
        soft_wrap=True,
    )
    if expected and identity.sha256 not in expected:
        console.print(
            f"[bold red]task {spec}: its source hashes to {identity.sha256}, not the expected "
            f"{', '.join(expected)}[/]: install the agreed version of {identity.package} in "
            "this site's environment (or, if this version was agreed, add its hash to the "
            "policy's task.sha256)",
            soft_wrap=True,
        )
        raise typer.Exit(code=1)
    verdict = "the expected hash" if expected else "no hash pinned (policy task.sha256)"
    console.print(f"[green]site check passed: {verdict}[/]")
    return True


def policy_check(
    folder: FolderOption = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A federation config: would its jobs pass this policy?"),
    ] = None,
) -> None:
    """Check the policy file, that it matches the enrolment, and (with --config) a federation."""
    from fl_components.config import load_config
    from fl_components.secure_aggregation.protocol import default_threshold
    from fl_components.site.enrolment import load_enrolment
    from fl_components.site.policy import check_job, installed_task_code, load_policy, policy_path
    from fl_components.wire.rejection import RejectedJob

    site = _site_folder(folder)
    try:
        policy = load_policy(policy_path(site))
        enrolment = load_enrolment(site)
    except (FedpipeError, RejectedJob) as error:
        fail(error)
    problems = []
    if policy.federation != enrolment.federation:
        problems.append(
            f"policy federation {policy.federation!r} is not the enrolled federation "
            f"{enrolment.federation!r}"
        )
    if policy.coordinator_key_id != enrolment.coordinator.key_id:
        problems.append(
            f"policy coordinator_key_id {policy.coordinator_key_id[:16]}... is not the pinned "
            f"key {enrolment.coordinator.key_id[:16]}...; every job would be refused"
        )
    if config is not None:
        try:
            federation = load_config(config)
        except FedpipeError as error:
            fail(error)
        n = len(federation.sites)
        threshold = federation.secure_aggregation.threshold or default_threshold(n)
        stage: Stage = "mask" if federation.secure_aggregation.enabled else "train"
        try:
            check_job(
                policy,
                federation,
                stage=stage,
                round_num=1,
                key_id=enrolment.coordinator.key_id,
                task_code=installed_task_code(),
                installed_task_code=installed_task_code(),
                cohort=n,
                threshold=threshold,
            )
        except RejectedJob as error:
            problems.append(f"{config}: a {stage} job would be refused: {error.detail}")
    if problems:
        for line in problems:
            console.print(f"[bold red]policy check failed:[/] {line}", soft_wrap=True)
        raise typer.Exit(code=1)
    console.print(f"[green]policy ok[/]: {policy_path(site)}", soft_wrap=True)


def site_audit(
    folder: FolderOption = None,
    last: Annotated[int, typer.Option(help="Show the last N entries (0: all).")] = 50,
) -> None:
    """Print the site's audit log and verify its hash chain (a removed or edited line is named)."""
    from fl_components.site.audit import AuditChainError, AuditLog

    site = _site_folder(folder)
    log = AuditLog.in_folder(site)
    try:
        entries = list(log.entries())
    except AuditChainError as error:
        console.print(f"[bold red]audit chain broken:[/] {error}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    for entry in entries[-last:] if last else entries:
        details = json.dumps(entry.details, sort_keys=True)
        console.print(
            f"{entry.seq:>6} {entry.time[:19]} {entry.kind:<9} {details}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    head = entries[-1].hash[:16] + "..." if entries else "(empty)"
    console.print(f"[green]chain verified[/]: {len(entries)} entries, head {head}")


def key_show(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Print the coordinator's public key (what each site pins at enrolment)."""
    from fl_components.wire.signing import COORDINATOR_KEYS_DIR, CoordinatorIdentity

    try:
        identity = CoordinatorIdentity.load(state_dir / COORDINATOR_KEYS_DIR)
    except FedpipeError as error:
        fail(error)
    console.print(identity.public.model_dump_json(indent=2), soft_wrap=True)


def key_rotate(
    state_dir: Annotated[Path, typer.Option(help="Stack state folder.")] = STACK_DIR,
) -> None:
    """Make a new coordinator key; each site re-pins it from a rotation signed by the old one.

    Sites of this stack apply it now; for each, the signed rotation is also written to
    ``<state>/rotations/<site>.json`` (for a site on another host: its steward applies it).
    The old key is kept as ``coordinator-keys.retired-<key id>``.
    """
    from fl_components.site.enrolment import apply_rotation
    from fl_components.wire.signing import (
        COORDINATOR_KEYS_DIR,
        CoordinatorIdentity,
        KeyRotation,
        sign,
    )
    from ops.stack.state import load_record

    folder = state_dir / COORDINATOR_KEYS_DIR
    try:
        old = CoordinatorIdentity.load(folder)
        record = load_record(state_dir)
    except FedpipeError as error:
        fail(error)
    staging = state_dir / f"{COORDINATOR_KEYS_DIR}.new"
    if staging.exists():
        shutil.rmtree(staging)
    new = CoordinatorIdentity.create(staging)
    rotations = state_dir / "rotations"
    rotations.mkdir(exist_ok=True)
    federation = str(record.get("federation", ""))
    for site, entry in record.get("sites", {}).items():
        rotation = KeyRotation(federation=federation, site=site, new_key=new.public)
        signed = sign(rotation, identity=old, audience=site, lifetime=timedelta(hours=24))
        (rotations / f"{site}.json").write_text(signed.model_dump_json(indent=2) + "\n")
        try:
            apply_rotation(entry["data"], signed)
        except FedpipeError as error:
            console.print(f"[yellow]site {site}: not applied here[/] ({error})", soft_wrap=True)
            continue
        console.print(f"site {site}: re-pinned {new.key_id[:16]}...")
    folder.rename(state_dir / f"{COORDINATOR_KEYS_DIR}.retired-{old.key_id[:16]}")
    staging.rename(folder)
    console.print(
        f"[green]coordinator key rotated[/]: {old.key_id[:16]}... -> {new.key_id[:16]}...; "
        f"signed rotations in {rotations}",
        soft_wrap=True,
    )
