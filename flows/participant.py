"""The participant flow: one stage of one round, run by a site's own worker on its pool.

Its one parameter is the typed site job
(:class:`~fl_components.wire.site_job.SiteJobMessage`): references only (the global model's
path in exchange storage and its SHA-256, the run id, the round and stage). The site
verifies the hash, works on its own folder (from its worker's environment) and returns a
JSON-safe payload, persisted with Prefect's JSON serializer (never pickle) to the result
storage the workers are configured with, where the coordinator reads it back.

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
from fl_components.exchange import SITE_KEYS_ENV
from fl_components.federation import Site
from fl_components.round.types import SiteJob
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.site.jobs import run_job, site_from_environment
from fl_components.site.receive import site_job_from_message
from fl_components.wire.site_answer import answer_payload
from fl_components.wire.site_job import SiteJobMessage
from flows.naming import participant_run_name


def keys_here(site: Site) -> Path:
    """The served site's key folder: ``FEDPIPE_SITE_KEYS``, else ``<site folder>/keys``.

    ``fedpipe site init`` and ``fedpipe up`` start each site's worker with the variable set.
    """
    configured = os.environ.get(SITE_KEYS_ENV)
    return Path(configured) if configured else secure_round.site_keys_dir(site.folder)


@task(name="site_job", task_run_name="{job.kind}-{job.site}-r{job.round}", cache_policy=NO_CACHE)
def site_job(site: Site, job: SiteJob, received: DownloadKind | None = None) -> dict[str, Any]:
    """The job, run on this site's own folder; the answer as one JSON-safe payload.

    ``received``: which model download the flow used to get ``job.parameters``.
    """
    answer = run_job(site, job, keys_dir=keys_here(site))
    return answer_payload(
        replace(answer, received=received if received is not None else answer.received), job=job
    )


@flow(
    name="federated-participant",
    flow_run_name=participant_run_name,
    result_serializer="json",
    persist_result=True,
    log_prints=True,
)
async def federated_participant(job: SiteJobMessage) -> dict[str, Any]:
    """Run one stage of one round at this site and return its JSON-safe payload.

    An ``async`` flow on purpose: a sync flow run costs ~1 s more at its end (measured:
    1.07 s against 0.15 s for a one-task flow), and every round dispatches this flow to
    every site. The site's work inside runs as an ordinary (sync) task.

    ``job`` is the typed site job (:class:`~fl_components.wire.site_job.SiteJobMessage`):
    the stage, the global model by reference and hash, the strategy's instructions, secure
    aggregation's context and request, the compression instruction.
    """
    participant = site_from_environment(job.federation, job.site)
    site_job_, received = site_job_from_message(job, folder=participant.folder)
    get_run_logger().info(
        "site %s run %s round %d: %s, global model %s verified%s",
        job.site,
        job.run_id,
        job.round,
        job.stage,
        job.model_sha256[:12] or "-",
        f" ({received.name.lower()} download)" if received is not None else "",
    )
    return site_job(participant, site_job_, received)
