"""The site steward's approval: a run waits until the site itself signs "yes" (or "no").

When the site's policy says so (``approval.mode`` in its ``policy.yaml``: ``never``,
``new_config`` or ``every_run``), the first job of a coordinator run does not touch the
site's data: the site writes an :class:`ApprovalRequest` into its own folder
(``approvals/pending/<run>.json``: who asks, the federation, the run, the config's hash and
its difference from the last config this site approved, the task code's hash, the epsilon
the whole run would spend here and the budget left) and waits. The steward answers on the
site's host with ``fedpipe site approve RUN`` or ``fedpipe site reject RUN --reason ...``,
which signs an :class:`ApprovalDecision` with the **site's own Ed25519 key** (the one it
signs its answers with, never leaving the site) and writes it to
``approvals/decisions/<run>.json``.

The site acts on a decision only after :func:`verify_decision`: signed by its own key (a
decision written by the coordinator, by another site, or edited after signing does not
verify), for this site, federation, run, config hash, task code and this very request (an
approval of an earlier request, or of another config, is a replay and is refused). A
click on a shared Prefect UI's "Resume" alone changes nothing.

``new_config``: a run whose config hash and task code this site approved before (a
recurring run) goes without asking; the site re-verifies the remembered signed decision
(``approvals/approved/<config hash>.json``) each time. ``every_run``: every coordinator run
asks once; its later rounds go on the same decision. A rejection stands for the whole run.

Every decision lands in the site's audit log (:mod:`fl_components.site.audit`, kind
``approval``): requested, approved, rejected, timed out, auto-approved by a known config,
and refused (a forged or mismatched decision, or a resume without one).
"""

from __future__ import annotations

import base64
import enum
import getpass
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError, FedpipeError
from fl_components.exchange import SITE_KEYS_ENV
from fl_components.federation import Site
from fl_components.privacy.epsilon import epsilon_of
from fl_components.privacy.ledger import PrivacyLedger
from fl_components.secure_aggregation.protocol.agreement import encode_fields
from fl_components.secure_aggregation.protocol.errors import KeyFileError
from fl_components.secure_aggregation.protocol.keys import SiteKeys
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.dpsgd import plan_round
from fl_components.site.policy import ApprovalRule, SitePolicy
from fl_components.wire.signing import canonical_json, digest_of, key_id_of

APPROVALS_DIR = "approvals"
DECISION_DOMAIN = b"fedpipe/site-approval/v1"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# the stages that need the steward's approval: every stage that reads the site's data
# (``unmask`` reads none: it answers for a mask this site already sent)
GATED_STAGES = ("train", "mask", "evaluate")


class Verdict(enum.StrEnum):
    """What the steward decided."""

    APPROVED = "approved"
    REJECTED = "rejected"


class ApprovalEvent(enum.StrEnum):
    """The ``event`` of an ``approval`` line in the site's audit log."""

    REQUESTED = "requested"
    APPROVED = "approved"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    AUTO_APPROVED = "auto_approved"  # a config hash this site approved before (new_config)
    REFUSED = "refused"  # a forged or mismatched decision, or a resume without one
    WITHDRAWN = "withdrawn"  # the coordinator cancelled the run while it waited


class DecisionRefused(FedpipeError):
    """A decision the site does not act on; the message says which check failed."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is safe as a file name (a coordinator run id is a UUID)."""
    if not _RUN_ID.match(run_id):
        raise ConfigError(
            f"run id {run_id!r} is not a coordinator run id (letters, digits, '.', '_', '-'; "
            "at most 128); copy it from `fedpipe site pending`"
        )
    return run_id


class ApprovalRequest(_Model):
    """What the site asks its steward, written to ``approvals/pending/<run>.json``.

    Attributes
    ----------
    site, federation, run_id, mlflow_run_id :
        Who is asked, for which federation and coordinator run.
    flow_run_id :
        The participant's Prefect flow run that waits (resumed after the decision).
    requested_by :
        The key id of the coordinator key that signed the job.
    config_sha256, previous_config_sha256, config_diff :
        The job's config hash; the last config this site approved and what changed since.
    task_code :
        The task code's hash the job names.
    stage, round, rounds :
        The first job's stage and round, and how many rounds the run asks.
    projected_epsilon, budget_left, delta :
        Record-level epsilon the whole run would spend here, and the site's budget left
        (None: no record-level DP, or no budget set).
    mode :
        The policy's ``approval.mode`` that asked.
    requested_at, expires_at :
        When the site asked; when it stops waiting (``approval.timeout_seconds``).
    """

    WIRE_TYPE: ClassVar[str] = "fedpipe-approval-request/v1"

    site: str = Field(min_length=1)
    federation: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    mlflow_run_id: str = ""
    flow_run_id: str = ""
    requested_by: str
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    previous_config_sha256: str | None = None
    config_diff: tuple[str, ...] = ()
    task_code: str
    stage: str
    round: int
    rounds: int
    projected_epsilon: float | None = None
    budget_left: float | None = None
    delta: float | None = None
    mode: str
    requested_at: datetime
    expires_at: datetime

    @property
    def sha256(self) -> str:
        """The request's own hash: a decision names it, so it answers this request only."""
        return digest_of(self)

    def describe(self) -> str:
        """Markdown for the Prefect UI and ``fedpipe site pending``: what is asked."""
        epsilon = "none (no record-level DP)"
        if self.projected_epsilon is not None:
            at = f" at delta {self.delta:g}" if self.delta is not None else ""
            epsilon = f"{self.projected_epsilon:.3g}{at}"
        left = f"{self.budget_left:.3g}" if self.budget_left is not None else "no budget set"
        diff = (
            "\n".join(f"    {line}" for line in self.config_diff)
            if self.config_diff
            else "    (no difference)"
        )
        previous = (
            f"the last approved config {self.previous_config_sha256[:12]}..."
            if self.previous_config_sha256
            else "no config approved before (first request)"
        )
        return (
            f"**Site {self.site!r} waits for its data steward's approval** "
            f"(policy approval.mode: {self.mode}).\n\n"
            f"- asked by: coordinator key {self.requested_by[:16]}...\n"
            f"- federation: {self.federation}, run {self.run_id}, {self.rounds} round(s); "
            f"first job: {self.stage}, round {self.round}\n"
            f"- config: {self.config_sha256[:12]}..., against {previous}:\n\n{diff}\n\n"
            f"- task code: {self.task_code[:16]}...\n"
            f"- projected epsilon for the whole run: {epsilon}; budget left: {left}\n"
            f"- waits until {self.expires_at:%Y-%m-%d %H:%M:%S} UTC\n\n"
            f"On the site's host: `fedpipe site approve {self.run_id}` or "
            f"`fedpipe site reject {self.run_id} --reason ...` (a click on Resume here "
            "alone is refused: the site acts only on a decision signed with its own key)."
        )


class ApprovalDecision(_Model):
    """The steward's answer to one request, signed with the site's own key."""

    WIRE_TYPE: ClassVar[str] = "fedpipe-approval-decision/v1"

    site: str = Field(min_length=1)
    federation: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    task_code: str
    request_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    verdict: Verdict
    reason: str = Field(default="", max_length=2000)
    decided_at: datetime
    decided_by: str = Field(default="", max_length=200)  # the account on the site's host

    @field_validator("decided_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("decided_at must carry a time zone (UTC)")
        return value.astimezone(UTC)


class SignedDecision(_Model):
    """A decision and the site's Ed25519 signature over :func:`decision_bytes`."""

    decision: ApprovalDecision
    key_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(min_length=1, max_length=128)


def decision_bytes(decision: ApprovalDecision, *, key_id: str) -> bytes:
    """The bytes a decision's signature covers (domain-separated, canonical)."""
    return DECISION_DOMAIN + encode_fields(
        ApprovalDecision.WIRE_TYPE, key_id, canonical_json(decision.model_dump(mode="json"))
    )


def sign_decision(decision: ApprovalDecision, keys: SiteKeys) -> SignedDecision:
    """``decision`` signed with the site's Ed25519 key."""
    key_id = key_id_of(keys.public().ed25519)
    signature = keys.sign(decision_bytes(decision, key_id=key_id))
    return SignedDecision(
        decision=decision, key_id=key_id, signature=base64.b64encode(signature).decode("ascii")
    )


def _check_signed_by_site(signed: SignedDecision, site_public: bytes) -> None:
    """Refuse a decision not signed by the site's own key, or altered since it was."""
    expected_key = key_id_of(site_public)
    if signed.key_id != expected_key:
        raise DecisionRefused(
            f"the decision is signed by key {signed.key_id[:16]}..., not this site's own key "
            f"{expected_key[:16]}...: only `fedpipe site approve|reject` on this site's host "
            "decides"
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        Ed25519PublicKey.from_public_bytes(site_public).verify(
            signature, decision_bytes(signed.decision, key_id=signed.key_id)
        )
    except (ValueError, InvalidSignature):
        raise DecisionRefused(
            "the decision's signature does not verify against this site's key: it was "
            "edited after signing, or forged"
        ) from None


def verify_decision(
    signed: SignedDecision,
    *,
    site_public: bytes,
    site: str,
    federation: str,
    config_sha256: str,
    task_code: str,
    run_id: str | None,
    request_sha256: str | None,
) -> ApprovalDecision:
    """The decision, if the site's own key signed it for exactly this run and config.

    Parameters
    ----------
    site_public : bytes
        The site's own raw Ed25519 public key (from its key folder).
    run_id, request_sha256 : str or None
        The run and the request it must answer; None for a remembered approval of a
        config (``new_config``), which binds the config hash and task code only.

    Raises
    ------
    DecisionRefused
        Naming the first check that failed: another key, a bad signature, or another site,
        federation, config, task code, run or request.
    """
    _check_signed_by_site(signed, site_public)
    decision = signed.decision
    bindings: list[tuple[str, str, str | None]] = [
        ("site", decision.site, site),
        ("federation", decision.federation, federation),
        ("config hash", decision.config_sha256, config_sha256),
        ("task code", decision.task_code, task_code),
        ("run", decision.run_id, run_id),
        ("request", decision.request_sha256, request_sha256),
    ]
    for what, got, wanted in bindings:
        if wanted is not None and got != wanted:
            raise DecisionRefused(
                f"the decision is for {what} {got[:24]!r}, this job's is {wanted[:24]!r}: "
                "a decision answers one request of one run and config only (a replay of an "
                "earlier approval is refused)"
            )
    return decision


def site_keys_dir(folder: str | os.PathLike[str]) -> Path:
    """The site's key folder: ``FEDPIPE_SITE_KEYS``, else ``<site folder>/keys``."""
    configured = os.environ.get(SITE_KEYS_ENV)
    return Path(configured) if configured else Path(folder) / "keys"


def site_public_key(keys_dir: str | os.PathLike[str]) -> bytes:
    """The site's own raw Ed25519 public key, derived from its private key on this host."""
    return SiteKeys.load(keys_dir).public().ed25519


def _write_json(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)
    return path


class ApprovalStore:
    """The site's approvals folder: pending requests, decisions, remembered approvals."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.site_folder = Path(folder)
        self.root = self.site_folder / APPROVALS_DIR

    def pending_path(self, run_id: str) -> Path:
        """``approvals/pending/<run>.json``."""
        return self.root / "pending" / f"{check_run_id(run_id)}.json"

    def decision_path(self, run_id: str) -> Path:
        """``approvals/decisions/<run>.json``."""
        return self.root / "decisions" / f"{check_run_id(run_id)}.json"

    def approved_path(self, config_sha256: str) -> Path:
        """``approvals/approved/<config hash>.json``: a remembered approval and its config."""
        return self.root / "approved" / f"{config_sha256}.json"

    def write_pending(self, request: ApprovalRequest) -> Path:
        """Record ``request`` as pending."""
        return _write_json(self.pending_path(request.run_id), request.model_dump_json(indent=2))

    def read_pending(self, run_id: str) -> ApprovalRequest:
        """The pending request of ``run_id``.

        Raises
        ------
        ConfigError
            If no request of that run is pending (naming the runs that are).
        """
        path = self.pending_path(run_id)
        if not path.is_file():
            waiting = ", ".join(r.run_id for r in self.pending()) or "none"
            raise ConfigError(
                f"no approval request of run {run_id!r} is pending at {self.root} (pending: "
                f"{waiting}); see `fedpipe site pending`"
            )
        try:
            return ApprovalRequest.model_validate_json(path.read_bytes())
        except ValidationError as error:
            raise ConfigError(
                f"{path}: not an approval request ({error.errors()[0]['msg']})"
            ) from None

    def pending(self) -> list[ApprovalRequest]:
        """Every pending request, oldest first (unreadable files are skipped)."""
        found = []
        for path in sorted((self.root / "pending").glob("*.json")):
            try:
                found.append(ApprovalRequest.model_validate_json(path.read_bytes()))
            except ValidationError:
                continue
        return sorted(found, key=lambda r: r.requested_at)

    def clear_pending(self, run_id: str) -> None:
        """Remove the pending request of ``run_id`` (answered or timed out)."""
        self.pending_path(run_id).unlink(missing_ok=True)

    def write_decision(self, signed: SignedDecision) -> Path:
        """Write a signed decision where the waiting site looks for it."""
        return _write_json(
            self.decision_path(signed.decision.run_id), signed.model_dump_json(indent=2)
        )

    def read_decision(self, run_id: str) -> SignedDecision | None:
        """The decision file of ``run_id`` as written (not yet verified), or None.

        Raises
        ------
        DecisionRefused
            If the file is there but is not a signed decision.
        """
        path = self.decision_path(run_id)
        if not path.is_file():
            return None
        try:
            return SignedDecision.model_validate_json(path.read_bytes())
        except ValidationError as error:
            raise DecisionRefused(
                f"{path} is not a signed decision ({error.errors()[0]['msg']})"
            ) from None

    def set_aside(self, run_id: str) -> Path | None:
        """Move a refused decision file out of the way (kept for inspection)."""
        path = self.decision_path(run_id)
        if not path.is_file():
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        target = self.root / "refused" / f"{run_id}.{stamp}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        return target

    def remember(self, signed: SignedDecision, config: FederationConfig) -> Path:
        """Keep an approval and the config it approved (for ``new_config`` and the diff)."""
        body = {
            "signed": signed.model_dump(mode="json"),
            "config": config.model_dump(mode="json", exclude_unset=True),
        }
        return _write_json(
            self.approved_path(signed.decision.config_sha256), json.dumps(body, indent=2)
        )

    def remembered(self) -> Iterator[tuple[SignedDecision, dict[str, Any]]]:
        """Every remembered approval (unverified) with its config, in no order."""
        for path in (self.root / "approved").glob("*.json"):
            try:
                body = json.loads(path.read_text())
                yield SignedDecision.model_validate(body["signed"]), dict(body["config"])
            except (ValueError, KeyError, TypeError, ValidationError):
                continue


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_diff(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> tuple[str, ...]:
    """One line per setting that differs (``privacy.noise_multiplier: 1.1 -> 0.8``)."""
    if before is None:
        return ()
    old, new = _flatten(before), _flatten(after)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            lines.append(
                f"{key}: {json.dumps(old.get(key, '(unset)'))} -> "
                f"{json.dumps(new.get(key, '(unset)'))}"
            )
    return tuple(lines[:200])


@dataclass(frozen=True)
class Asked:
    """What a job needs before it runs at this site."""

    go: bool  # True: it may run now
    verdict: Verdict | None = None  # a decision already in force for this run
    reason: str = ""  # why (the rejection's reason, or how it was approved)


class Gate:
    """The approval gate of the site in ``folder`` (its policy, key and approvals).

    Parameters
    ----------
    folder : path
        The site's folder.
    policy : SitePolicy
        The site's own policy.
    site : str
        The site's enrolled name.
    keys_dir : path
        The site's key folder (its own public key verifies decisions).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        policy: SitePolicy,
        site: str,
        keys_dir: str | os.PathLike[str],
    ) -> None:
        self.folder = Path(folder)
        self.policy = policy
        self.rule: ApprovalRule = policy.approval
        self.site = site
        self.keys_dir = Path(keys_dir)
        self.store = ApprovalStore(folder)
        self.audit = AuditLog.in_folder(folder)

    def _public(self) -> bytes:
        return site_public_key(self.keys_dir)

    def _log(self, event: ApprovalEvent, details: Mapping[str, Any]) -> None:
        self.audit.append(AuditKind.APPROVAL, {"event": str(event), **details})

    def check(
        self,
        *,
        federation: str,
        run_id: str,
        stage: str,
        config_sha256: str,
        task_code: str,
    ) -> Asked:
        """Whether this job may run now, or the steward must be asked.

        A decision already made for this run (approved or rejected) stands; under
        ``new_config`` a remembered approval of this config and task code lets it go
        (logged as ``auto_approved``). A decision file that does not verify is set aside
        and logged as ``refused``.
        """
        if self.rule.mode == "never" or stage not in GATED_STAGES:
            return Asked(go=True, reason="not required")
        check_run_id(run_id)
        facts = {"run_id": run_id, "federation": federation, "config_sha256": config_sha256}
        pending = self.store.pending_path(run_id)
        request = None
        if pending.is_file():
            request = self.store.read_pending(run_id)
        decided = self._decided(request, facts, task_code=task_code, pending=request is not None)
        if decided is not None:
            return decided
        if self.rule.mode == "new_config":
            for signed, _config in self.store.remembered():
                try:
                    verify_decision(
                        signed,
                        site_public=self._public(),
                        site=self.site,
                        federation=federation,
                        config_sha256=config_sha256,
                        task_code=task_code,
                        run_id=None,
                        request_sha256=None,
                    )
                except DecisionRefused:
                    continue
                if signed.decision.verdict is Verdict.APPROVED:
                    self._log(
                        ApprovalEvent.AUTO_APPROVED,
                        {**facts, "approved_run": signed.decision.run_id, "stage": stage},
                    )
                    return Asked(go=True, verdict=Verdict.APPROVED, reason="known config")
        return Asked(go=False)

    def _decided(
        self,
        request: ApprovalRequest | None,
        facts: Mapping[str, Any],
        *,
        task_code: str,
        pending: bool,
    ) -> Asked | None:
        """The decision in force for this run, if its file verifies."""
        run_id = str(facts["run_id"])
        try:
            signed = self.store.read_decision(run_id)
            if signed is None:
                return None
            decision = verify_decision(
                signed,
                site_public=self._public(),
                site=self.site,
                federation=str(facts["federation"]),
                config_sha256=str(facts["config_sha256"]),
                task_code=task_code,
                run_id=run_id,
                request_sha256=request.sha256 if request is not None else None,
            )
        except DecisionRefused as error:
            self.store.set_aside(run_id)
            self._log(ApprovalEvent.REFUSED, {**facts, "detail": str(error)})
            return None
        if pending and request is not None:
            self.store.clear_pending(run_id)
            self._log(
                ApprovalEvent(str(decision.verdict)),
                {
                    **facts,
                    "request_sha256": request.sha256,
                    "reason": decision.reason,
                    "decided_by": decision.decided_by,
                    "signed_by": signed.key_id,
                },
            )
        if decision.verdict is Verdict.APPROVED:
            return Asked(go=True, verdict=Verdict.APPROVED, reason="approved by the steward")
        return Asked(go=False, verdict=Verdict.REJECTED, reason=decision.reason)

    def ask(
        self,
        message_federation: FederationConfig,
        *,
        run_id: str,
        mlflow_run_id: str,
        flow_run_id: str,
        requested_by: str,
        config_sha256: str,
        task_code: str,
        stage: str,
        round_num: int,
        projected_epsilon: float | None,
        budget_left: float | None,
        delta: float | None = None,
        now: datetime | None = None,
    ) -> ApprovalRequest:
        """Write the pending request (with the diff from the last approved config); log it."""
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        previous_sha, previous = self.last_approved()
        config = message_federation.model_dump(mode="json", exclude_unset=True)
        request = ApprovalRequest(
            site=self.site,
            federation=message_federation.name,
            run_id=run_id,
            mlflow_run_id=mlflow_run_id,
            flow_run_id=flow_run_id,
            requested_by=requested_by,
            config_sha256=config_sha256,
            previous_config_sha256=previous_sha,
            config_diff=config_diff(previous, config),
            task_code=task_code,
            stage=stage,
            round=round_num,
            rounds=message_federation.rounds,
            projected_epsilon=projected_epsilon,
            budget_left=budget_left,
            delta=delta if delta is not None else message_federation.privacy.delta,
            mode=self.rule.mode,
            requested_at=moment,
            expires_at=moment + timedelta(seconds=self.rule.timeout_seconds),
        )
        self.store.write_pending(request)
        self._log(
            ApprovalEvent.REQUESTED,
            {
                "run_id": run_id,
                "federation": request.federation,
                "config_sha256": config_sha256,
                "request_sha256": request.sha256,
                "requested_by": requested_by,
                "task_code": task_code,
                "projected_epsilon": projected_epsilon,
                "budget_left": budget_left,
                "changes": len(request.config_diff),
            },
        )
        return request

    def last_approved(self) -> tuple[str | None, dict[str, Any] | None]:
        """The config this site approved most recently (its signature verified), if any."""
        best: tuple[datetime, str, dict[str, Any]] | None = None
        for signed, config in self.store.remembered():
            decision = signed.decision
            try:
                verify_decision(
                    signed,
                    site_public=self._public(),
                    site=self.site,
                    federation=decision.federation,
                    config_sha256=decision.config_sha256,
                    task_code=decision.task_code,
                    run_id=None,
                    request_sha256=None,
                )
            except DecisionRefused:
                continue
            if best is None or decision.decided_at > best[0]:
                best = (decision.decided_at, decision.config_sha256, config)
        return (best[1], best[2]) if best is not None else (None, None)

    def poll(self, request: ApprovalRequest, config: FederationConfig) -> Asked | None:
        """The steward's verified decision on ``request`` if one was written, else None.

        An approval is remembered (with its config) for ``new_config`` and later diffs.
        """
        facts = {
            "run_id": request.run_id,
            "federation": request.federation,
            "config_sha256": request.config_sha256,
        }
        asked = self._decided(request, facts, task_code=request.task_code, pending=True)
        if asked is not None and asked.verdict is Verdict.APPROVED:
            signed = self.store.read_decision(request.run_id)
            if signed is not None:
                self.store.remember(signed, config)
        return asked

    def refuse_bare_resume(self, request: ApprovalRequest) -> None:
        """Log a resume of the waiting run that came with no signed decision."""
        self._log(
            ApprovalEvent.REFUSED,
            {
                "run_id": request.run_id,
                "federation": request.federation,
                "config_sha256": request.config_sha256,
                "detail": "the flow run was resumed (e.g. from the Prefect UI) without a "
                "decision signed with this site's key; still waiting",
            },
        )

    def time_out(self, request: ApprovalRequest) -> str:
        """Give up waiting: clear the request, log it, return the reason."""
        self.store.clear_pending(request.run_id)
        reason = (
            f"site {self.site!r}: no approval from its data steward within "
            f"{self.rule.timeout_seconds} s (policy approval.timeout_seconds)"
        )
        self._log(
            ApprovalEvent.TIMED_OUT,
            {
                "run_id": request.run_id,
                "federation": request.federation,
                "config_sha256": request.config_sha256,
                "request_sha256": request.sha256,
            },
        )
        return reason

    def withdraw(self, request: ApprovalRequest) -> None:
        """The coordinator cancelled the waiting run: clear the request and log it."""
        self.store.clear_pending(request.run_id)
        self._log(
            ApprovalEvent.WITHDRAWN,
            {"run_id": request.run_id, "federation": request.federation},
        )


def decide(
    folder: str | os.PathLike[str],
    run_id: str,
    *,
    verdict: Verdict,
    reason: str,
    keys_dir: str | os.PathLike[str],
    now: datetime | None = None,
) -> tuple[ApprovalRequest, SignedDecision]:
    """The steward's decision on the pending request of ``run_id``, signed and written.

    Raises
    ------
    ConfigError
        If no request of ``run_id`` is pending, or the site's key cannot be read.
    """
    store = ApprovalStore(folder)
    request = store.read_pending(run_id)
    try:
        keys = SiteKeys.load(keys_dir)
    except (FedpipeError, KeyFileError, OSError) as error:
        raise ConfigError(
            f"the site's key in {keys_dir} cannot be read ({error}); run this on the site's "
            "host as the account that runs its worker, or pass --keys"
        ) from None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    decision = ApprovalDecision(
        site=request.site,
        federation=request.federation,
        run_id=request.run_id,
        config_sha256=request.config_sha256,
        task_code=request.task_code,
        request_sha256=request.sha256,
        verdict=verdict,
        reason=reason,
        decided_at=(now or datetime.now(UTC)).astimezone(UTC),
        decided_by=user,
    )
    signed = sign_decision(decision, keys)
    store.write_decision(signed)
    return request, signed


def projected_spend(
    site: Site, config: FederationConfig
) -> tuple[float | None, float | None, float | None]:
    """The epsilon a whole run of ``config`` would spend at ``site``, and the budget left.

    Record-level, with the delta both are at; (None, None, None) without record-level DP.
    ``config`` is the enforced one (the policy's budget and delta in force).
    """
    privacy = config.privacy
    if not privacy.record_level:
        return None, None, None
    plan = plan_round(
        examples=len(site.load().train),
        privacy=privacy,
        training=config.training,
        rounds=config.rounds,
    )
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * max(config.rounds, 1)
    projected = epsilon_of(history, delta=plan.delta, accountant=privacy.accountant)
    if privacy.max_epsilon is None:
        return projected, None, plan.delta
    ledger = PrivacyLedger.open(site.folder, site=site.name, accountant=privacy.accountant)
    return projected, max(0.0, privacy.max_epsilon - ledger.epsilon(plan.delta)), plan.delta
