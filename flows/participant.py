"""The participant flow: one stage of one round, run by a site's own worker on its pool.

Its one parameter is the signed site job: a
:class:`~fl_components.wire.site_job.SiteJobMessage` (references only: the global model's
path in exchange storage and its SHA-256, the run id, the round and stage) inside the
coordinator's :class:`~fl_components.wire.signing.Signed` envelope. Before the site reads
any data it admits the job (:func:`fl_components.site.admission.admit`): the signature
against the coordinator key pinned at enrolment, the site it is for (the folder's enrolled
name, not the worker's environment), its expiry and nonce, the site's own policy, the model
paths inside the enrolled exchange folder; the audit log records the job, accepted or
refused. A refused job answers with a typed ``rejected`` refusal. Every answer leaves the
site sealed to the pinned coordinator key and signed by the site
(:func:`fl_components.site.admission.seal_answer`), persisted with Prefect's JSON
serializer (never pickle) to the result storage, where the coordinator reads it back;
another site reading that storage sees ciphertext.

With ``compression.download: delta`` the model comes as ``download``: the site applies the
delta to the model it holds when that hashes to the delta's base, else reads the full model
(:func:`fl_components.compression.download.receive_model`, as in-process). A training job's
``compression`` instruction makes the site send its update compressed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fl_components.compression.download import DownloadKind
from fl_components.exchange import PAYLOAD_VERSION, SITE_DIR_ENV, SITE_KEYS_ENV
from fl_components.federation import Site
from fl_components.round.types import SiteJob, SiteResult
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.site.admission import (
    Admitted,
    SignedSiteJob,
    admit,
    check_spend,
    seal_answer,
)
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.enrolment import load_enrolment
from fl_components.site.jobs import run_job, site_from_environment
from fl_components.site.receive import site_job_from_message
from fl_components.wire.rejection import RejectedJob
from fl_components.wire.site_answer import answer_payload
from flows.naming import participant_run_name


def keys_here(folder: Path) -> Path:
    """The served site's key folder: ``FEDPIPE_SITE_KEYS``, else ``<site folder>/keys``.

    ``fedpipe site init`` and ``fedpipe up`` start each site's worker with the variable set.
    """
    configured = os.environ.get(SITE_KEYS_ENV)
    return Path(configured) if configured else secure_round.site_keys_dir(folder)


def _charged(answer: SiteResult) -> float | None:
    """The epsilon this answer's DP-SGD charged to the site's ledger, if it trained with it."""
    source = answer.update if answer.update is not None else answer.masked
    value = (getattr(source, "extra", None) or {}).get("epsilon_round")
    return float(value) if isinstance(value, int | float) else None


@task(name="site_stage", task_run_name="{job.kind}-{job.site}-r{job.round}", cache_policy=NO_CACHE)
def site_stage(
    site: Site, job: SiteJob, admitted: Admitted, received: DownloadKind | None = None
) -> dict[str, Any]:
    """The admitted job, run on this site's own folder; the answer sealed to the coordinator.

    ``received``: which model download the flow used to get ``job.parameters``.
    """
    keys = keys_here(site.folder)
    answer = run_job(site, job, keys_dir=keys)
    epsilon = _charged(answer)
    if epsilon is not None:
        AuditLog.in_folder(site.folder).append(
            AuditKind.CHARGED,
            {"run_id": job.flow_run_id, "round": job.round, "epsilon_round": epsilon},
        )
    payload = answer_payload(
        replace(answer, received=received if received is not None else answer.received), job=job
    )
    return seal_answer(
        payload,
        enrolment=admitted.enrolment,
        message=admitted.message,
        keys_dir=keys,
        folder=site.folder,
    )


def rejected_answer(error: RejectedJob, *, folder: Path, job: SignedSiteJob) -> dict[str, Any]:
    """A typed ``rejected`` refusal: sealed when the site has a coordinator key to seal to."""
    message = job.message
    payload = {
        "version": PAYLOAD_VERSION,
        "stage": "refusal",
        "site": message.site,
        "round": message.round,
        "kind": "rejected",
        "reason": str(error),
        "epsilon_spent": None,
    }
    try:
        enrolment = load_enrolment(folder)
    except RejectedJob:
        return payload  # nothing pinned to seal to: the refusal alone, in the clear
    if enrolment.site != message.site:  # sealed for the job's site, it would not open
        return payload
    return seal_answer(
        payload, enrolment=enrolment, message=message, keys_dir=keys_here(folder), folder=folder
    )


@flow(
    name="federated-participant",
    flow_run_name=participant_run_name,
    result_serializer="json",
    persist_result=True,
    log_prints=True,
)
async def federated_participant(job: SignedSiteJob) -> dict[str, Any]:
    """Admit the signed job at this site, run it, and return its sealed answer.

    An ``async`` flow on purpose: a sync flow run costs ~1 s more at its end (measured:
    1.07 s against 0.15 s for a one-task flow), and every round dispatches this flow to
    every site. The site's work inside runs as an ordinary (sync) task.

    ``job`` is the coordinator's signed site job: the stage, the global model by reference
    and hash, the strategy's instructions, secure aggregation's context and request, the
    compression instruction. Nothing in it is used before :func:`admit` verified it.
    """
    logger = get_run_logger()
    folder = Path(os.environ.get(SITE_DIR_ENV) or ".")
    try:
        admitted = admit(job, folder=folder)
    except RejectedJob as error:
        logger.warning("site refused the job: %s", error)
        return rejected_answer(error, folder=folder, job=job)
    message = admitted.message
    participant = site_from_environment(message.federation, message.site)
    try:  # the sigma and the run's epsilon, as this site derives them from its own data
        check_spend(admitted, site=participant)
    except RejectedJob as error:
        logger.warning("site refused the job: %s", error)
        return rejected_answer(error, folder=folder, job=job)
    engine_job, received = site_job_from_message(message, folder=participant.folder)
    logger.info(
        "site %s run %s round %d: %s, global model %s verified%s",
        message.site,
        message.run_id,
        message.round,
        message.stage,
        message.model_sha256[:12] or "-",
        f" ({received.name.lower()} download)" if received is not None else "",
    )
    return site_stage(participant, engine_job, admitted, received)
