"""What a site does with a job message before any work: read and verify the model it names.

The participant flow hands the :class:`~fl_components.wire.site_job.SiteJobMessage` it was
given here and gets back the engine's :class:`~fl_components.round.types.SiteJob`, with the
global model read from exchange storage and verified against its SHA-256 (or rebuilt from a
delta when the site holds the delta's base), the strategy's instructions read the same way,
and secure aggregation's context and request decoded.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from fl_components.compression.download import DownloadKind, receive_model
from fl_components.compression.instruction import CompressionInstruction
from fl_components.exchange import read_global_model, read_model_download
from fl_components.parameters import NDArrays
from fl_components.round.types import JobKind, SiteJob
from fl_components.secure_aggregation.site_stages import context_from_json
from fl_components.site.training import seed_for
from fl_components.wire.site_answer import instructions_from_payload
from fl_components.wire.site_job import ModelDownloadRef, SiteJobMessage


def receive_download(folder: Path, download: ModelDownloadRef) -> tuple[NDArrays, DownloadKind]:
    """The model from a download: the delta if this site holds its base, else the full one."""
    like = [np.zeros(tuple(shape), dtype=np.float32) for shape in download.shapes]
    return receive_model(
        folder,
        base_sha=download.base_sha256 if download.delta_uri else "",
        apply_delta=lambda held: read_model_download(
            download.delta_uri, sha256=download.sha256, held=held, like=held
        ),
        fetch_full=lambda: read_model_download(
            download.full_uri, sha256=download.sha256, held=None, like=like
        ),
    )


def site_job_from_message(
    message: SiteJobMessage, *, folder: Path
) -> tuple[SiteJob, DownloadKind | None]:
    """The engine's job this message describes, its model read and verified.

    Also which model download was used (``None`` when the model came as one file). The
    download's delta is applied to the model held in ``folder`` (the site's own).
    """
    federation = message.federation
    parameters: NDArrays | None = None
    received: DownloadKind | None = None
    if message.download is not None:
        parameters, received = receive_download(folder, message.download)
    elif message.model is not None:
        parameters = read_global_model(message.model.uri, sha256=message.model.sha256)
    secagg = message.secagg
    job = SiteJob(
        site=message.site,
        kind=JobKind(message.stage),
        round=message.round,
        parameters=parameters,
        seed=seed_for(
            base=federation.seed,
            round_num=message.round,
            site_index=federation.site_names.index(message.site),
        ),
        instructions=instructions_from_payload(message.instructions.model_dump()),
        evaluate_round=message.evaluate_round,
        secagg=context_from_json(secagg.context) if secagg is not None else None,
        unmask_request=(
            base64.b64decode(secagg.request, validate=True)
            if secagg is not None and secagg.request
            else None
        ),
        compression=(
            CompressionInstruction.from_dict(message.compression) if message.compression else None
        ),
        mlflow_run_id=message.mlflow_run_id,
        flow_run_id=message.run_id,
    )
    return job, received
