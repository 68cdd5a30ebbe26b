"""The participant flow: one stage of one round, run by a site's own worker on its pool.

Parameters are references only: the federation config, the site's name, the round, the
stage, the global model's path in shared exchange storage and its SHA-256, the run id. The
site verifies the hash, works on its own folder (from its worker's environment) and returns
a JSON-safe payload, persisted with Prefect's JSON serializer (never pickle) to the result
storage the workers are configured with, where the coordinator reads it back.

With ``compression.download: delta`` the model comes as ``download``: the site applies the
delta to the model it holds when that hashes to the delta's base, else reads the full model
(:func:`fl_components.compression.download.receive_model`, as in-process). A training job's
``compression`` instruction makes the site send its update compressed.
"""

from __future__ import annotations

import base64
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fl_components.compression.download import DownloadKind, receive_model
from fl_components.compression.instruction import CompressionInstruction
from fl_components.config import FederationConfig
from fl_components.exchange import SITE_KEYS_ENV, read_global_model, read_model_download
from fl_components.federation import Site
from fl_components.round.types import JobKind, SiteJob
from fl_components.secure_aggregation import site_stages as secure_round
from fl_components.secure_aggregation.site_stages import context_from_json
from fl_components.site.jobs import run_job, site_from_environment
from fl_components.site.training import seed_for
from fl_components.wire.site_answer import answer_payload, instructions_from_payload
from flows.naming import participant_run_name

Stage = Literal["train", "mask", "unmask", "evaluate"]


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


def receive_download(
    folder: Path, download: dict[str, Any]
) -> tuple[list[np.ndarray], DownloadKind]:
    """The model from the ``download`` parameter: the delta if this site holds its base."""
    sha = str(download["sha256"])
    shapes = [tuple(int(d) for d in shape) for shape in download["shapes"]]
    like = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    return receive_model(
        folder,
        base_sha=str(download.get("base_sha256") or "") if download.get("delta_uri") else "",
        apply_delta=lambda held: read_model_download(
            str(download["delta_uri"]), sha256=sha, held=held, like=held
        ),
        fetch_full=lambda: read_model_download(
            str(download["full_uri"]), sha256=sha, held=None, like=like
        ),
    )


def _job(
    federation: FederationConfig,
    *,
    site: str,
    round_num: int,
    stage: Stage,
    model_uri: str,
    model_sha256: str,
    secagg: dict[str, str] | None,
    evaluate_round: int | None,
    instructions: dict[str, Any] | None,
    compression: dict[str, Any] | None = None,
    download: dict[str, Any] | None = None,
    folder: Path | None = None,
) -> tuple[SiteJob, DownloadKind | None]:
    """The :class:`SiteJob` these flow parameters describe (the model read and verified).

    Also which model download was used (``download``: rebuilt in ``folder``, the site's).
    """
    kind = JobKind(stage)
    if kind in (JobKind.MASK, JobKind.UNMASK) and not (secagg and "context" in secagg):
        raise ValueError(f"stage {stage!r} needs the secagg parameter with the round context")
    ctx = context_from_json(secagg["context"]) if secagg and "context" in secagg else None
    request = secagg.get("request") if secagg else None
    parameters = None
    received = None
    if kind is not JobKind.UNMASK and download is not None:
        if folder is None:
            raise ValueError("a model download needs the site's folder")
        parameters, received = receive_download(folder, download)
    elif kind is not JobKind.UNMASK:
        parameters = read_global_model(model_uri, sha256=model_sha256)
    job = SiteJob(
        site=site,
        kind=kind,
        round=round_num,
        parameters=parameters,
        seed=seed_for(
            base=federation.seed, round_num=round_num, site_index=federation.site_names.index(site)
        ),
        instructions=instructions_from_payload(instructions),
        evaluate_round=evaluate_round,
        secagg=ctx,
        unmask_request=base64.b64decode(request, validate=True) if request else None,
        compression=CompressionInstruction.from_dict(compression) if compression else None,
    )
    return job, received


@flow(
    name="federated-participant",
    flow_run_name=participant_run_name,
    result_serializer="json",
    persist_result=True,
    log_prints=True,
)
async def federated_participant(
    federation: FederationConfig,
    site: str,
    round_num: int,
    stage: Stage,
    model_uri: str,
    model_sha256: str,
    run_id: str,
    secagg: dict[str, str] | None = None,
    evaluate_round: int | None = None,
    instructions: dict[str, Any] | None = None,
    mlflow_run_id: str = "",
    compression: dict[str, Any] | None = None,
    download: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``stage`` of round ``round_num`` at ``site`` and return its JSON-safe payload.

    An ``async`` flow on purpose: a sync flow run costs ~1 s more at its end (measured:
    1.07 s against 0.15 s for a one-task flow), and every round dispatches this flow to
    every site. The site's work inside runs as an ordinary (sync) task.

    Secure aggregation's stages take ``secagg``: ``{"context": <RoundContext JSON>}`` for
    ``mask`` (train, then return the masked, signed update) and, for ``unmask``, also
    ``"request"``: the base64 unmask request (survivors, dropped, encrypted shares).
    ``evaluate_round`` (``train``/``mask``): first score the received global model as the
    federated evaluation of that round (returned under ``"evaluation"``). ``instructions``:
    what the strategy sends (FedProx's μ, a reference to SCAFFOLD's control variate).
    ``compression``: the round's compression instruction (train in the clear).
    ``download``: the model as a delta against the one this site holds, and in full
    (``{"sha256", "base_sha256", "delta_uri", "full_uri", "shapes"}``; ``model_uri`` empty).
    """
    participant = site_from_environment(federation, site)
    job, received = _job(
        federation,
        site=site,
        round_num=round_num,
        stage=stage,
        model_uri=model_uri,
        model_sha256=model_sha256,
        secagg=secagg,
        evaluate_round=evaluate_round,
        instructions=instructions,
        compression=compression,
        download=download,
        folder=participant.folder,
    )
    # the coordinator's runs, named in the site's privacy ledger with what the round spends
    job = replace(job, mlflow_run_id=mlflow_run_id, flow_run_id=run_id)
    get_run_logger().info(
        "site %s run %s round %d: %s, global model %s verified%s",
        site,
        run_id,
        round_num,
        stage,
        (download["sha256"] if download else model_sha256)[:12] or "-",
        f" ({received.name.lower()} download)" if received is not None else "",
    )
    return site_job(participant, job, received)
