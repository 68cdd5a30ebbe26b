"""What a site learned when it was enrolled, kept in its own folder: whom it serves, and where.

``fedpipe site init`` (and ``fedpipe up`` for the stack's sites) writes
``<site folder>/enrolment.json``: the federation, the site's own name, the coordinator's
public key it pins, the exchange folder it reads models from and the registry of its peers'
public keys. A job can change none of these: the site verifies the job against the pinned
key, answers only for its own name, reads models only inside its exchange folder and takes
its peers' keys only from its registry. Re-pinning is a key rotation signed by the pinned
key (:func:`apply_rotation`) or a fresh enrolment by the site itself.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_components.errors import ConfigError
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.nonces import NonceStore
from fl_components.site.policy import load_policy, policy_path
from fl_components.wire.rejection import RejectedJob, RejectReason
from fl_components.wire.signing import CoordinatorPublicKey, KeyRotation, Signed, verify

ENROLMENT_FILE = "enrolment.json"


class SiteEnrolment(BaseModel):
    """A site's enrolment record (public facts only; no key material but public keys).

    Attributes
    ----------
    federation : str
        The federation served.
    site : str
        This site's name.
    coordinator : CoordinatorPublicKey
        The pinned coordinator key.
    exchange_dir : str
        The only folder the site reads models from (absolute).
    registry : str
        The federation's public-key registry file (peers' keys), absolute.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field(min_length=1)
    site: str = Field(min_length=1)
    coordinator: CoordinatorPublicKey
    exchange_dir: str = Field(min_length=1)
    registry: str = Field(min_length=1)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``<folder>/enrolment.json`` atomically."""
        target = enrolment_path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_text(self.model_dump_json(indent=2) + "\n")
        partial.replace(target)
        return target


def enrolment_path(folder: str | os.PathLike[str]) -> Path:
    """The enrolment record of the site whose folder is ``folder``."""
    return Path(folder) / ENROLMENT_FILE


def load_enrolment(folder: str | os.PathLike[str]) -> SiteEnrolment:
    """Read the site's enrolment record.

    Raises
    ------
    RejectedJob
        ``not_enrolled`` when the record is missing or invalid: such a site runs nothing.
    """
    target = enrolment_path(folder)
    if not target.is_file():
        raise RejectedJob(
            RejectReason.NOT_ENROLLED,
            f"{target} does not exist: this folder was never enrolled; run "
            "`fedpipe site init NAME --data PATH` (it pins the coordinator key)",
        )
    try:
        return SiteEnrolment.model_validate_json(target.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(file)"
        raise RejectedJob(
            RejectReason.NOT_ENROLLED,
            f"{target}: {field}: {first['msg']}; enrol the site again with `fedpipe site init`",
        ) from None


def confine(uri: str, *, exchange_dir: str | os.PathLike[str], what: str) -> str:
    """``uri`` if it names a file inside the enrolled exchange folder, else refuse.

    Symbolic links and ``..`` are resolved first, so neither leads out of the folder.

    Raises
    ------
    RejectedJob
        ``model_location``, naming the path and the folder the site reads from.
    """
    root = Path(exchange_dir).resolve()
    path = Path(uri.removeprefix("file://")).resolve()
    if not path.is_relative_to(root):
        raise RejectedJob(
            RejectReason.MODEL_LOCATION,
            f"{what} {uri} is outside the exchange folder this site was enrolled with "
            f"({root}); it reads models from nowhere else",
        )
    return str(path)


def apply_rotation(
    folder: str | os.PathLike[str], envelope: Signed[KeyRotation], *, now: datetime | None = None
) -> SiteEnrolment:
    """Pin the coordinator's new key, if the rotation verifies against the pinned one.

    The policy's ``coordinator_key_id`` follows (the steward's other lines are kept), and
    the audit log records the change.

    Raises
    ------
    RejectedJob
        If the rotation is not signed by the pinned key, is for another site, expired or
        replayed.
    ConfigError
        If the site's policy cannot be read.
    """
    enrolment = load_enrolment(folder)
    rotation = verify(
        envelope,
        pinned=enrolment.coordinator,
        site=enrolment.site,
        nonces=NonceStore.in_folder(folder),
        now=now,
    )
    if rotation.federation != enrolment.federation:
        raise RejectedJob(
            RejectReason.WRONG_SITE,
            f"the rotation is for federation {rotation.federation!r}; this site serves "
            f"{enrolment.federation!r}",
        )
    updated = enrolment.model_copy(update={"coordinator": rotation.new_key})
    policy_file = policy_path(folder)
    if policy_file.is_file():
        policy = load_policy(policy_file)
        policy.model_copy(update={"coordinator_key_id": rotation.new_key.key_id}).save(policy_file)
    updated.save(folder)
    AuditLog.in_folder(folder).append(
        AuditKind.KEY,
        {
            "event": "rotated",
            "from": enrolment.coordinator.key_id,
            "to": rotation.new_key.key_id,
        },
    )
    return updated


def enrol(
    folder: str | os.PathLike[str],
    *,
    federation: str,
    site: str,
    coordinator: CoordinatorPublicKey,
    exchange_dir: str | os.PathLike[str],
    registry: str | os.PathLike[str],
) -> SiteEnrolment:
    """Write the site's enrolment record (pinning ``coordinator``) and log it.

    Re-enrolling with another coordinator key is the site's own decision (it runs this);
    the audit log records the key pinned.

    Raises
    ------
    ConfigError
        If ``folder`` is not a directory.
    """
    if not Path(folder).is_dir():
        raise ConfigError(f"site folder {folder} does not exist; create it or pass --data")
    record = SiteEnrolment(
        federation=federation,
        site=site,
        coordinator=coordinator,
        exchange_dir=str(Path(exchange_dir).resolve()),
        registry=str(Path(registry).resolve()),
    )
    previous = None
    if enrolment_path(folder).is_file():
        try:
            previous = load_enrolment(folder)
        except RejectedJob:
            previous = None
    record.save(folder)
    if previous != record:
        AuditLog.in_folder(folder).append(
            AuditKind.KEY,
            {
                "event": "enrolled",
                "federation": federation,
                "site": site,
                "coordinator_key_id": coordinator.key_id,
                "exchange_dir": record.exchange_dir,
                "registry": record.registry,
            },
        )
    return record
