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

import asyncio
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Paused, Running

from fl_components.compression.download import DownloadKind
from fl_components.exchange import PAYLOAD_VERSION, SITE_DIR_ENV, SITE_KEYS_ENV
from fl_components.federation import Site
from fl_components.round.types import SiteJob, SiteResult
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.site.admission import (
    Admitted,
    SignedSiteJob,
    admit,
    answer_sink,
    check_spend,
    seal_answer,
)
from fl_components.site.approval import ApprovalRequest, Asked, Gate, projected_spend
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.enrolment import load_enrolment
from fl_components.site.jobs import run_job, site_from_environment
from fl_components.site.receive import site_job_from_message
from fl_components.wire.rejection import RejectedJob
from fl_components.wire.signing import digest_of
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
    # large fields (the update's arrays) go as sealed files in the run's exchange folder
    sink = answer_sink(admitted.enrolment, admitted.message)
    try:
        payload = answer_payload(
            replace(answer, received=received if received is not None else answer.received),
            job=job,
            sink=sink,
        )
        return seal_answer(
            payload,
            enrolment=admitted.enrolment,
            message=admitted.message,
            keys_dir=keys,
            folder=site.folder,
            files=sink.written if sink is not None else (),
        )
    except BaseException:
        if sink is not None:
            sink.discard()
        raise


def rejected_answer(error: RejectedJob, *, folder: Path, job: SignedSiteJob) -> dict[str, Any]:
    """A typed ``rejected`` refusal: sealed when the site has a coordinator key to seal to."""
    return refusal_answer("rejected", str(error), folder=folder, job=job)


def refusal_answer(kind: str, reason: str, *, folder: Path, job: SignedSiteJob) -> dict[str, Any]:
    """A typed refusal (``rejected``, or ``declined`` by the site's steward), sealed if it can."""
    message = job.message
    payload = {
        "version": PAYLOAD_VERSION,
        "stage": "refusal",
        "site": message.site,
        "round": message.round,
        "kind": kind,
        "reason": reason,
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


# how often a run waiting for approval looks for the steward's decision and its own state
APPROVAL_POLL_SECONDS = 1.0


async def _pause(client: Any, flow_run_id: Any, request: ApprovalRequest) -> None:
    """Show this run as Paused in the UI, with what is asked as the state's message."""
    seconds = max(1, int((request.expires_at - request.requested_at).total_seconds()) + 60)
    state: Any = Paused(
        timeout_seconds=seconds,
        pause_key=f"approval-{request.run_id}",
        message=f"waiting for site {request.site!r}'s data steward: "
        f"`fedpipe site approve {request.run_id}` on the site's host",
    )
    await client.set_flow_run_state(flow_run_id, state, force=True)


async def await_decision(gate: Gate, request: ApprovalRequest, config: Any) -> Asked | None:
    """Wait, paused, for the steward's signed decision on ``request``.

    Returns the decision, an ``Asked`` without a verdict at the timeout, or None when the
    coordinator cancelled the run meanwhile. A resume with no signed decision (a click in
    the shared UI) is logged as refused and the run pauses again.
    """
    logger = get_run_logger()
    context = FlowRunContext.get()
    flow_run_id = context.flow_run.id if context is not None and context.flow_run else None
    logger.warning(
        "site %s waits for its data steward's approval of run %s (until %s UTC)",
        request.site,
        request.run_id,
        f"{request.expires_at:%H:%M:%S}",
    )
    async with get_client() as client:
        if flow_run_id is not None:
            await _pause(client, flow_run_id, request)
            await acreate_markdown_artifact(
                markdown=request.describe(),
                key=f"approval-{request.run_id[:40].lower()}".replace("_", "-").replace(".", "-"),
                description=f"Site {request.site} asks its steward about run {request.run_id}",
            )
        try:
            while True:
                asked = gate.poll(request, config)
                if asked is not None:
                    return asked
                if datetime.now(UTC) >= request.expires_at:
                    return Asked(go=False, reason=gate.time_out(request))
                if flow_run_id is not None:
                    state = (await client.read_flow_run(flow_run_id)).state
                    if state is not None and (state.is_final() or state.is_cancelling()):
                        gate.withdraw(request)
                        return None
                    if state is not None and state.is_running():
                        asked = gate.poll(request, config)  # `site approve` writes, then resumes
                        if asked is not None:
                            return asked
                        gate.refuse_bare_resume(request)
                        logger.warning(
                            "resumed without a decision signed by site %s's key: still waiting",
                            request.site,
                        )
                        await _pause(client, flow_run_id, request)
                await asyncio.sleep(APPROVAL_POLL_SECONDS)
        finally:
            if flow_run_id is not None:
                state = (await client.read_flow_run(flow_run_id)).state
                if state is not None and state.is_paused():
                    await client.set_flow_run_state(flow_run_id, Running(), force=True)


async def approval(
    admitted: Admitted, job: SignedSiteJob, *, site: Site, folder: Path
) -> dict[str, Any] | None:
    """None when the job may run; else the typed ``declined`` answer (rejected, timed out).

    The gate (:class:`fl_components.site.approval.Gate`) follows the site's own policy,
    verifies decisions with the site's own key and logs every one in its audit trail.
    """
    message = admitted.message
    gate = Gate(
        folder, policy=admitted.policy, site=admitted.enrolment.site, keys_dir=keys_here(folder)
    )
    config_sha = digest_of(job.message.federation)  # the config as the coordinator signed it
    # the code that would touch the data: fedpipe's own task code and, where the config names
    # one, the user's task (its source hash): an approval holds for this code only
    code = message.task_code + (f"+{message.task.sha256}" if message.task is not None else "")
    asked = gate.check(
        federation=message.federation.name,
        run_id=message.run_id,
        stage=message.stage,
        config_sha256=config_sha,
        task_code=code,
    )
    if asked.go:
        return None
    if asked.verdict is None:  # no decision yet: ask the steward and wait
        context = FlowRunContext.get()
        projected, left, delta = projected_spend(site, message.federation)
        request = gate.ask(
            job.message.federation,
            run_id=message.run_id,
            mlflow_run_id=message.mlflow_run_id,
            flow_run_id=str(context.flow_run.id) if context and context.flow_run else "",
            requested_by=job.key_id,
            config_sha256=config_sha,
            task_code=code,
            stage=message.stage,
            round_num=message.round,
            projected_epsilon=projected,
            budget_left=left,
            delta=delta,
        )
        waited = await await_decision(gate, request, job.message.federation)
        if waited is None:
            raise RuntimeError(f"run {message.run_id} was cancelled while waiting for approval")
        if waited.go:
            return None
        asked = waited
    reason = (
        f"site {message.site!r}: its data steward rejected run {message.run_id}: "
        f"{asked.reason or '(no reason given)'}"
        if asked.verdict is not None
        else asked.reason
    )
    get_run_logger().warning("site declined the job: %s", reason)
    return refusal_answer("declined", reason, folder=folder, job=job)


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
    declined = await approval(admitted, job, site=participant, folder=folder)
    if declined is not None:
        return declined
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
