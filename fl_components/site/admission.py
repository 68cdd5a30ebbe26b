"""The site's gate: a job is verified, checked and logged before any data is read.

:func:`admit` runs first in the participant flow, on nothing but the signed job and the
site's own folder (its enrolment, policy, nonce store and audit log): the signature against
the pinned coordinator key, the audience against the site's enrolled name (never the
worker's environment), the expiry, the nonce, then every policy line
(:func:`fl_components.site.policy.check_job`), the model paths against the enrolled
exchange folder. What comes out is the job with the site's own settings in place of those a
job could lower: the privacy budget and delta of the policy, the peers' registry of the
enrolment. Every job is logged as received, then accepted or refused with the reason.

:func:`seal_answer` is the last step: the answer, sealed to the pinned coordinator key and
signed by the site (:mod:`fl_components.wire.sealed`), its size and hash logged as released.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fl_components.errors import ConfigError
from fl_components.federation import Site
from fl_components.privacy.epsilon import epsilon_of
from fl_components.privacy.ledger import PrivacyLedger
from fl_components.secure_aggregation.protocol.keys import SiteKeys
from fl_components.secure_aggregation.site_stages import context_from_json
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.dpsgd import plan_round
from fl_components.site.enrolment import SiteEnrolment, confine, load_enrolment
from fl_components.site.nonces import NonceStore
from fl_components.site.policy import (
    TRAINING_STAGES,
    SitePolicy,
    check_job,
    check_round_spend,
    check_task,
    enforce,
    installed_task_code,
    load_policy,
    policy_path,
)
from fl_components.task.loading import task_identity
from fl_components.wire.answer_files import (
    AnswerFileSink,
    SealedFileRef,
    answers_folder,
    file_threshold,
)
from fl_components.wire.rejection import PolicyBreach, RejectedJob, RejectReason
from fl_components.wire.sealed import AnswerContext, seal
from fl_components.wire.signing import Signed, digest_of, verify
from fl_components.wire.site_job import SiteJobMessage

SignedSiteJob = Signed[SiteJobMessage]
SEALED_KEY = "sealed"


@dataclass(frozen=True)
class Admitted:
    """A job that passed every check, with the site's own settings in force.

    Attributes
    ----------
    message : SiteJobMessage
        The job: its config carries the policy's budget and delta and the enrolment's
        registry; its model paths are confined to the exchange folder.
    enrolment : SiteEnrolment
        The site's enrolment.
    policy : SitePolicy
        The site's policy.
    """

    message: SiteJobMessage
    enrolment: SiteEnrolment
    policy: SitePolicy


def _received(envelope: SignedSiteJob) -> dict[str, Any]:
    message = envelope.message
    return {
        "nonce": envelope.nonce,
        "key_id": envelope.key_id,
        "audience": envelope.audience,
        "federation": message.federation.name,
        "run_id": message.run_id,
        "round": message.round,
        "stage": message.stage,
        "model_sha256": message.model_sha256,
        "config_sha256": digest_of(message.federation),
        "task": None if message.task is None else message.task.model_dump(),
    }


def _confined(message: SiteJobMessage, exchange_dir: str) -> SiteJobMessage:
    """The message with every model path resolved inside ``exchange_dir`` (or refused)."""
    update: dict[str, Any] = {}
    if message.model is not None:
        uri = confine(message.model.uri, exchange_dir=exchange_dir, what="the global model")
        update["model"] = message.model.model_copy(update={"uri": uri})
    if message.download is not None:
        download = message.download
        paths = {"full_uri": confine(download.full_uri, exchange_dir=exchange_dir, what="model")}
        if download.delta_uri:
            paths["delta_uri"] = confine(
                download.delta_uri, exchange_dir=exchange_dir, what="model delta"
            )
        update["download"] = download.model_copy(update=paths)
    control = message.instructions.server_control
    if control is not None:
        uri = confine(control.uri, exchange_dir=exchange_dir, what="the server control variate")
        update["instructions"] = message.instructions.model_copy(
            update={"server_control": control.model_copy(update={"uri": uri})}
        )
    return message.model_copy(update=update) if update else message


def _check(envelope: SignedSiteJob, folder: Path, audit: AuditLog, now: datetime) -> Admitted:
    enrolment = load_enrolment(folder)
    message = verify(
        envelope,
        pinned=enrolment.coordinator,
        site=enrolment.site,
        nonces=NonceStore.in_folder(folder),
        now=now,
    )
    try:
        policy = load_policy(policy_path(folder))
    except ConfigError as error:
        raise RejectedJob(RejectReason.NOT_ENROLLED, str(error)) from None
    cohort = threshold = None
    if message.secagg is not None:
        context = context_from_json(message.secagg.context)
        cohort, threshold = len(context.participants), context.threshold
        if context.round != message.round:  # (its run id is the tracking run's)
            raise RejectedJob(
                RejectReason.MALFORMED,
                f"the secure round's context is for round {context.round}, the job for "
                f"round {message.round}",
            )
    check_job(
        policy,
        message.federation,
        stage=message.stage,
        round_num=message.round,
        key_id=envelope.key_id,
        task_code=message.task_code,
        installed_task_code=installed_task_code(),
        cohort=cohort,
        threshold=threshold,
        rounds_today=audit.rounds_today(now=now),
    )
    _check_task(policy, message)
    enforced = enforce(policy, message.federation)
    secagg = enforced.secure_aggregation.model_copy(update={"registry": enrolment.registry})
    enforced = enforced.model_copy(update={"secure_aggregation": secagg})
    message = _confined(message, enrolment.exchange_dir).model_copy(update={"federation": enforced})
    return Admitted(message=message, enrolment=enrolment, policy=policy)


def _check_task(policy: SitePolicy, message: SiteJobMessage) -> None:
    """The job's task is importable here, hashes as the coordinator's did, and is pinned."""
    if message.stage == "unmask":  # no model runs in stage 2
        return
    try:
        installed = task_identity(message.federation)
    except ConfigError as error:
        raise PolicyBreach("task", str(error)) from None
    check_task(
        policy,
        spec=installed.spec,
        job_sha256=None if message.task is None else message.task.sha256,
        installed_sha256=installed.sha256,
    )


def admit(
    envelope: SignedSiteJob, *, folder: str | os.PathLike[str], now: datetime | None = None
) -> Admitted:
    """Verify ``envelope`` at the site in ``folder`` and check it against the site's policy.

    Raises
    ------
    RejectedJob
        With the first check that failed (logged as ``refused``).
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    audit = AuditLog.in_folder(folder)
    received = _received(envelope)
    audit.append(AuditKind.RECEIVED, received, now=moment)
    try:
        admitted = _check(envelope, Path(folder), audit, moment)
    except RejectedJob as error:
        audit.append(
            AuditKind.REFUSED,
            {**received, "reason": str(error.reason), "detail": error.detail},
            now=moment,
        )
        raise
    audit.append(AuditKind.ACCEPTED, received, now=moment)
    return admitted


def answer_context(enrolment: SiteEnrolment, message: SiteJobMessage) -> AnswerContext:
    """Where this site's answer to ``message`` belongs (bound into its sealing)."""
    return AnswerContext(
        federation=enrolment.federation,
        run_id=message.run_id,
        round=message.round,
        stage=message.stage,
        site=enrolment.site,
    )


def answer_sink(enrolment: SiteEnrolment, message: SiteJobMessage) -> AnswerFileSink | None:
    """Where the answer's large fields go as sealed files, or None.

    This site's folder of the run's answers in the enrolled exchange folder (never one the
    job names); None for a run id that is not one plain folder name.
    """
    folder = answers_folder(enrolment.exchange_dir, message.run_id, enrolment.site)
    if folder is None:
        return None
    return AnswerFileSink(
        folder, context=answer_context(enrolment, message), threshold=file_threshold()
    )


def seal_answer(
    payload: dict[str, Any],
    *,
    enrolment: SiteEnrolment,
    message: SiteJobMessage,
    keys_dir: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    files: Sequence[SealedFileRef] = (),
) -> dict[str, Any]:
    """``payload`` sealed to the pinned coordinator key and signed by the site; logged.

    ``files``: the sealed files ``payload`` names (their size and hash go to the audit log).
    Returns ``{"sealed": <SealedAnswer>}``: what goes to result storage.
    """
    plaintext = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    context = answer_context(enrolment, message)
    sealed = seal(
        plaintext, context=context, recipient=enrolment.coordinator, sender=SiteKeys.load(keys_dir)
    )
    AuditLog.in_folder(folder).append(
        AuditKind.RELEASED,
        {
            "run_id": message.run_id,
            "round": message.round,
            "stage": message.stage,
            "answer": str(payload.get("stage", "")),
            "bytes": len(plaintext) + sum(ref.bytes for ref in files),
            "sha256": hashlib.sha256(plaintext).hexdigest(),
            "sealed_to": enrolment.coordinator.key_id,
            "files": [
                {"file": ref.file, "bytes": ref.bytes, "sha256": ref.sha256} for ref in files
            ],
        },
    )
    return {SEALED_KEY: sealed.model_dump(mode="json")}


def check_spend(admitted: Admitted, *, site: Site) -> None:
    """Refuse a DP-SGD round whose sigma or whose run's epsilon would break the policy.

    The sigma is the one the site itself derives (a ``target_epsilon`` job's too), and the
    run's epsilon is this coordinator run's entries in the site's ledger plus this round, at
    the enforced delta (:func:`fl_components.site.policy.check_round_spend`). Logged as a
    refusal like any other check.

    Raises
    ------
    PolicyBreach
        Naming ``privacy.min_noise_multiplier`` or ``privacy.max_epsilon_per_run``.
    """
    message = admitted.message
    config = message.federation
    floor = admitted.policy.privacy
    needed = floor.min_noise_multiplier is not None or floor.max_epsilon_per_run is not None
    if message.stage not in TRAINING_STAGES or not config.privacy.record_level or not needed:
        return
    examples = len(site.load().train)
    plan = plan_round(
        examples=examples, privacy=config.privacy, training=config.training, rounds=config.rounds
    )
    ledger = PrivacyLedger.open(site.folder, site=site.name, accountant=config.privacy.accountant)
    run = [
        (e.noise_multiplier, e.sample_rate, e.steps)
        for e in ledger.entries
        if e.mlflow_run_id == message.mlflow_run_id and e.federation == config.name
    ]
    after = epsilon_of(
        [*run, (plan.noise_multiplier, plan.sample_rate, plan.steps)],
        delta=plan.delta,
        accountant=config.privacy.accountant,
    )
    try:
        check_round_spend(
            admitted.policy, noise_multiplier=plan.noise_multiplier, epsilon_run_after=after
        )
    except RejectedJob as error:
        AuditLog.in_folder(site.folder).append(
            AuditKind.REFUSED,
            {
                "run_id": message.run_id,
                "round": message.round,
                "stage": message.stage,
                "reason": str(error.reason),
                "detail": error.detail,
            },
        )
        raise
