"""The work-pool backend: each site's stage runs as a flow run on the site's own work pool.

For site S, the task ``participant-S`` creates a run of the deployment
``federated-participant/S`` (on S's pool, served by S's worker) and waits for it with a
deadline. Runs are *created* one after another (a SQLite-backed Prefect server serializes
writes: concurrent creation measured up to 15 s) and *awaited* together. A site that fails,
crashes or misses the deadline becomes a :class:`Dropout` naming the reason, and its late
run is cancelled. Results are read back from the shared result storage as plain JSON: a
result stored with any other serializer is refused, never unpickled.

The model goes to the exchange folder once per wave: as ``<sha256>.safetensors``, or, with
``compression.download: delta``, as the round's delta and full downloads (``.fpmd``, each
written once and shared by the sites that get it; a site reads only the one it uses). A
training job carries the round's compression instruction; a compressed update comes back as
its wire message. ``bytes/down`` is the size of the file the site read.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled

from fl_components.compression.download import (
    DownloadKind,
    ModelDownloads,
    full_download,
)
from fl_components.config import FederationConfig
from fl_components.data.types import DatasetInfo
from fl_components.errors import FedpipeError, RoundError
from fl_components.exchange import (
    ExchangeError,
    parse_json_payload,
    site_pool_name,
    write_global_model,
    write_model_download,
)
from fl_components.federation import round_target
from fl_components.round.types import Dropout, DropoutKind, JobKind, SiteJob, SiteResult
from fl_components.secure_aggregation.protocol import Registry
from fl_components.secure_aggregation.site_stages import (
    context_to_json,
    load_registry,
    registry_path,
)
from fl_components.site.policy import installed_task_code
from fl_components.task.loading import task_identity
from fl_components.wire.answer_files import ANSWERS_FOLDER, AnswerFileSource, file_limit
from fl_components.wire.rejection import AnswerReason, RejectedAnswer
from fl_components.wire.sealed import AnswerContext, open_payload
from fl_components.wire.signing import CoordinatorIdentity, Signed, coordinator_keys_dir, sign
from fl_components.wire.site_answer import answer_from_payload, instructions_payload
from fl_components.wire.site_job import (
    InstructionsRef,
    ModelDownloadRef,
    ModelRef,
    SecureStageRef,
    SiteJobMessage,
    TaskRef,
)
from tasks.sites import SiteBackend, collect_answers, stream_answers
from tasks.tracking import artifact_key

log = logging.getLogger(__name__)
SignedSiteJob = Signed[SiteJobMessage]
# a signed job stays valid this long past the site's deadline (queueing, clock skew)
SIGNATURE_MARGIN = timedelta(minutes=5)

# one creation at a time per coordinator process (SQLite serializes writes anyway)
_CREATE_LOCK = threading.Lock()
# over-selection: a wave's (run id, round, stage) whose round closed with enough answers; its
# participant tasks still waiting cancel their runs (participation.over_select)
_CLOSED: dict[tuple[str, int, str], threading.Event] = {}
_CLOSED_LOCK = threading.Lock()
# participant runs paused for a site steward's approval, per (run id, round): site -> since
_AWAITING: dict[tuple[str, int], dict[str, str]] = {}
_AWAITING_LOCK = threading.Lock()


def _awaiting_approval(
    federation: str, run_id: str, round_num: int, site: str
) -> Callable[[bool], None]:
    """A callback that records whether ``site`` waits for approval; shows the round's list.

    The list is a Prefect artifact (``<federation>-approvals``): the sites this round waits
    on, updated as each pauses or goes on.
    """

    def note(waiting: bool) -> None:
        with _AWAITING_LOCK:
            sites = _AWAITING.setdefault((run_id, round_num), {})
            if waiting:
                sites[site] = time.strftime("%H:%M:%S", time.gmtime())
            else:
                sites.pop(site, None)
            listed = dict(sites)
        lines = [f"# Round {round_num} of {federation}: sites waiting for their steward"]
        lines += [f"- **{s}**: waiting since {since} UTC" for s, since in sorted(listed.items())]
        if not listed:
            lines.append("No site waits for approval.")
        try:
            create_markdown_artifact(
                markdown="\n".join(lines),
                key=artifact_key(federation, "approvals"),
                description=f"Round {round_num}: sites waiting for approval",
            )
        except Exception as error:  # the list is for the UI; the wait goes on without it
            log.debug("approval artifact not written: %s", error)
        try:
            logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
        except MissingContextError:
            logger = log
        if waiting:
            logger.warning(
                "round %d waits for site %s's data steward (approval asked at the site)",
                round_num,
                site,
            )

    return note


def _wave(run_id: str, round_num: int, stage: str) -> threading.Event:
    with _CLOSED_LOCK:
        return _CLOSED.setdefault((run_id, round_num, stage), threading.Event())


class ParticipantError(FedpipeError):
    """A site's flow run failed, crashed, was cancelled or missed its deadline."""

    def __init__(self, message: str, *, kind: DropoutKind = DropoutKind.FAILED) -> None:
        super().__init__(message)
        self.kind = kind


def read_json_result(run: FlowRun) -> dict[str, Any]:
    """Read a finished flow run's persisted result as plain JSON (never unpickled).

    Raises
    ------
    ExchangeError
        If the result was not persisted, or not with the JSON serializer.
    """
    from prefect._internal.result_records import ResultRecordMetadata
    from prefect.results import resolve_result_storage

    metadata = run.state.data if run.state is not None else None
    if not isinstance(metadata, ResultRecordMetadata) or metadata.storage_key is None:
        raise ExchangeError(
            f"flow run {run.name}: no persisted result; start the site's worker with "
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT=true and PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK "
            "set to the shared result storage (fedpipe up does)"
        )
    if metadata.serializer.type != "json":
        raise ExchangeError(
            f"flow run {run.name}: result serialized as {metadata.serializer.type!r}; only "
            "'json' is accepted across the site boundary"
        )
    if metadata.storage_block_id is None:
        raise ExchangeError(f"flow run {run.name}: result has no storage block")
    storage = resolve_result_storage(metadata.storage_block_id)
    # prefect types both as async (async_dispatch; WritableFileSystem.read_path is declared
    # async), but called from sync code they run and return the value
    raw: bytes = storage.read_path(metadata.storage_key)  # type: ignore[union-attr,assignment]
    what = f"flow run {run.name} result"
    document = parse_json_payload(raw, what=what)  # size-bounded before it is parsed
    # stored either as the bare JSON result, or as a record {"metadata", "result": "<json>"}
    is_record = isinstance(document, dict) and set(document) == {"metadata", "result"}
    payload = parse_json_payload(document["result"], what=what) if is_record else document
    if not isinstance(payload, dict):
        raise ExchangeError(f"flow run {run.name}: result is not a JSON object")
    return payload


def _restart_advice(site: str, pool: str) -> str:
    """The commands that really bring a site's worker back (with its data, keys, executor)."""
    return (
        f"on the local stack: `fedpipe site restart {site}`; on the site's own host: run the "
        f"worker command `fedpipe site init {site}` printed (`fedpipe site worker --pool {pool}` "
        "with the site's FEDPIPE_SITE_* settings); check with `fedpipe status`"
    )


def _timeout_message(site: str, pool: str, timeout: float, state: str | None) -> str:
    """Why site ``site`` missed the deadline and what to do, by its flow run's last state."""
    head = f"site {site!r} timed out: no result within {timeout:g}s"
    if state in ("Running", "Retrying"):  # picked up, but too slow
        return (
            f"{head} (its flow run on pool {pool!r} was still {state}); the site is slower "
            "than the deadline: raise deployment.timeout_seconds or check the run's logs"
        )
    if state in ("Pending", "Submitting"):  # handed to the worker, but it never started
        return (
            f"{head}: its flow run was handed to a worker of pool {pool!r} but never started "
            f"(still {state}); the site's warm executor or its host is stuck or overloaded. "
            f"Check `fedpipe doctor`, or restart it: {_restart_advice(site, pool)}"
        )
    return (
        f"{head}: its flow run was still {state}, never picked up by a worker of pool "
        f"{pool!r}; its worker is not running or cannot reach this server. Start it again: "
        f"{_restart_advice(site, pool)}"
    )


def pool_not_serving(client: Any, pool: str) -> str | None:
    """Why ``pool`` cannot run a flow run now (paused, missing, no live worker), or None.

    A worker is live while its heartbeats are recent (the server judges each read by the
    worker's own heartbeat interval), so a dead worker shows here before the server's
    periodic check marks the pool NOT_READY.
    """
    from prefect.client.schemas.objects import WorkerStatus

    try:
        work_pool = client.read_work_pool(pool)
    except ObjectNotFound:
        return f"work pool {pool!r} does not exist"
    if work_pool.is_paused:
        return f"work pool {pool!r} is paused (resume it: `prefect work-pool resume {pool}`)"
    workers = client.read_workers_for_work_pool(pool)
    if not any(w.status == WorkerStatus.ONLINE for w in workers):
        status = work_pool.status.value if work_pool.status is not None else "unknown"
        return f"work pool {pool!r} has no live worker (pool {status})"
    return None


# a dispatched site's pool that reads dead is given this long to read live again before its
# run is cancelled: after a Prefect server restart every worker reads offline until its next
# heartbeat gets through (its client backs off 2, 4, 8 s), although none of them died
LIVENESS_GRACE_SECONDS = 30.0


class _Liveness:
    """Whether a site's pool has read not serving for longer than the grace, while it works."""

    def __init__(self, pool: str, *, grace: float = LIVENESS_GRACE_SECONDS) -> None:
        self.pool = pool
        self.grace = grace
        self.since: float | None = None

    def dead(self, client: Any, now: float) -> str | None:
        """Why the pool cannot serve, once it has read so for ``grace`` seconds; else None."""
        why = pool_not_serving(client, self.pool)
        if why is None:
            self.since = None
            return None
        self.since = now if self.since is None else self.since
        return why if now - self.since >= self.grace else None


def _dead_site_message(
    site: str, pool: str, why: str, *, waited: float | None, running: bool = False
) -> str:
    when = "before dispatch" if waited is None else f"after {waited:.0f}s of waiting"
    # a run the site had started: its worker (or the link to it) went away mid-run
    consequence = (
        "so its running flow run cannot report back (the worker stopped, or the site is cut off)"
        if running
        else "so its flow run cannot start"
    )
    return f"site {site!r} skipped {when}: {why}, {consequence}; {_restart_advice(site, pool)}"


def _wait(
    run_id: uuid.UUID,
    *,
    site: str,
    pool: str,
    timeout: float,
    poll: float,
    liveness_every: float = 2.0,
    closed: threading.Event | None = None,
    paused: Callable[[bool], None] | None = None,
) -> FlowRun:
    """Wait for a site's flow run to end; give up at the deadline or once its pool is dead.

    Raises
    ------
    ParticipantError
        At the deadline, once the site's pool has had no live worker for
        ``LIVENESS_GRACE_SECONDS``, or once ``closed`` is set (over-selection: the round has
        enough answers); the run is cancelled in each case.

    ``paused`` is told when the site's run pauses for its steward's approval, and when it
    goes on.
    """
    started = time.monotonic()
    was_paused = False
    deadline = started + timeout
    next_check = started + liveness_every
    liveness = _Liveness(pool)
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            is_paused = run.state is not None and run.state.is_paused()
            if paused is not None and is_paused != was_paused:
                paused(is_paused)
            was_paused = is_paused
            if run.state is not None and run.state.is_final():
                if was_paused and paused is not None:
                    paused(False)
                return run
            now = time.monotonic()
            if closed is not None and closed.is_set():
                _cancel_surplus(client, run_id, site=site)
            why = None
            if now >= next_check:
                why = liveness.dead(client, now)
                next_check = now + liveness_every
            if now >= deadline or why is not None:
                _cancel_abandoned(
                    client,
                    run,
                    site=site,
                    pool=pool,
                    why=why,
                    timeout=timeout,
                    waited=now - started,
                )
            time.sleep(poll)


def _cancel_surplus(client: SyncPrefectClient, run_id: uuid.UUID, *, site: str) -> NoReturn:
    """Cancel an over-selected site's run: the round closed with enough answers."""
    reason = "over-selected: the round closed with enough answers"
    client.set_flow_run_state(run_id, Cancelled(message=reason), force=True)
    raise ParticipantError(
        f"site {site!r}: {reason} (participation.over_select); its run was cancelled",
        kind=DropoutKind.SURPLUS,
    )


def _cancel_abandoned(
    client: SyncPrefectClient,
    run: FlowRun,
    *,
    site: str,
    pool: str,
    why: str | None,
    timeout: float,
    waited: float,
) -> NoReturn:
    """Cancel a site's run given up on: its pool is dead (``why``), or the deadline passed."""
    state = run.state.name if run.state is not None else "unknown"
    reason = why or f"no result within {timeout:g}s"
    client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
    if why is not None:
        raise ParticipantError(
            _dead_site_message(
                site,
                pool,
                why,
                waited=waited,
                running=run.state is not None and run.state.is_running(),
            ),
            kind=DropoutKind.UNREACHABLE,
        )
    raise ParticipantError(_timeout_message(site, pool, timeout, state), kind=DropoutKind.TIMEOUT)


def signed_parameters(job: SignedSiteJob) -> dict[str, Any]:
    """The participant flow run's parameters: ``{"job": <the signed job as JSON>}``.

    The federation config inside travels as the fields that were set (see
    :meth:`SiteJobMessage.to_parameters`); the signature covers the parsed message, so the
    site verifies exactly what it will act on.
    """
    body = job.model_dump(mode="json", exclude={"message"})
    body["message"] = job.message.to_parameters()["job"]
    return {"job": body}


def _create_site_run(
    name: str,
    parameters: dict[str, Any],
    *,
    site: str,
    round_num: int,
    stage: str,
    run_id: str,
) -> FlowRun:
    """Create the site's participant flow run from its deployment (not waiting for it)."""
    with _CREATE_LOCK:
        try:
            # prefect's async_dispatch types it FlowRun | Coroutine; a sync caller gets the run
            created: FlowRun = run_deployment(  # type: ignore[assignment]
                name,
                parameters=parameters,
                timeout=0,
                # the coordinator run's short id: runs of different trainings tell apart
                flow_run_name=f"{site}-r{round_num}-{stage}-{run_id[:8]}",
                tags=["fedpipe", f"site:{site}", f"round:{round_num}"],
            )
        except ObjectNotFound:
            raise ParticipantError(
                f"site {site!r}: no deployment {name!r}; onboard the site with "
                f"`fedpipe site init {site} --data PATH` or start the stack with `fedpipe up`",
                kind=DropoutKind.UNREACHABLE,
            ) from None
    return created


@task(
    name="participant",
    task_run_name="participant-{job.audience}-r{job.message.round}-{job.message.stage}",
    cache_policy=NO_CACHE,
)
def run_participant(job: SignedSiteJob) -> dict[str, Any]:
    """Dispatch one site's signed stage to its work pool; its stored (sealed) JSON payload."""
    message = job.message
    config, site, round_num, stage = message.federation, message.site, message.round, message.stage
    run_id = message.run_id
    pool = site_pool_name(config, site)
    name = f"{config.deployment.participant_deployment}/{site}"
    parameters = signed_parameters(job)
    started = time.perf_counter()
    with get_client(sync_client=True) as client:
        why = pool_not_serving(client, pool)
    if why is not None:  # a dead site costs nothing: no run created, no deadline waited
        raise ParticipantError(
            _dead_site_message(site, pool, why, waited=None), kind=DropoutKind.UNREACHABLE
        )
    created = _create_site_run(
        name, parameters, site=site, round_num=round_num, stage=stage, run_id=run_id
    )
    created_after = time.perf_counter() - started
    run = _wait(
        created.id,
        site=site,
        pool=pool,
        timeout=config.deployment.timeout_seconds,
        poll=config.deployment.poll_interval,
        closed=_wave(run_id, round_num, stage)
        if config.participation.over_select and stage in ("train", "mask")
        else None,
        paused=_awaiting_approval(config.name, run_id, round_num, site),
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state is not None else "unknown"
        detail = run.state.message if run.state is not None else ""
        raise ParticipantError(f"site {site!r}: flow run {run.name} ended {state}: {detail}")
    payload = read_json_result(run)
    try:
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
    except MissingContextError:  # called outside a flow (the dispatch benchmark)
        logger = log
    logger.info(
        "site %s %s: flow run %s created in %.2fs, result in %.2fs",
        site,
        stage,
        run.name,
        created_after,
        time.perf_counter() - started,
    )
    return payload


class WorkPoolBackend(SiteBackend):
    """Sites run the participant flow on their own work pools, through a Prefect server.

    One flow run per site per wave: a round's federated evaluation rides with the next
    round's training jobs (``SiteJob.evaluate_round``), so a round costs one dispatch (two
    under secure aggregation). The model, and SCAFFOLD's control variate, go to the exchange
    folder once per wave, as files named by their hash.
    """

    def __init__(self, config: FederationConfig, info: DatasetInfo, *, run_id: str) -> None:
        if not PREFECT_API_URL.value():
            raise RoundError(
                "backend 'work-pool' needs a Prefect server: run `fedpipe up` and set "
                "PREFECT_API_URL to the address it prints (e.g. http://127.0.0.1:4200/api)"
            )
        self.config = config
        self.info = info
        self.run_id = run_id
        self.exchange = Path(config.deployment.exchange_dir).resolve() / run_id
        # the coordinator's identity: it signs every job and opens every sealed answer
        self.identity = CoordinatorIdentity.load(
            coordinator_keys_dir(config.deployment.exchange_dir)
        )
        self._answer_registry: Registry | None = None
        self.downloads = ModelDownloads.from_config(config)  # the run's model-delta memory

    def _model_ref(self, job: SiteJob, written: dict[int, tuple[str, str]]) -> ModelRef | None:
        if job.parameters is None or job.download is not None:
            return None
        key = id(job.parameters)
        if key not in written:  # one file per distinct model in the wave
            written[key] = write_global_model(job.parameters, self.exchange)
        uri, sha = written[key]
        return ModelRef(uri=uri, sha256=sha)

    def _download_ref(
        self, job: SiteJob, written: dict[tuple[str, str], tuple[str, int]]
    ) -> tuple[ModelDownloadRef | None, dict[DownloadKind, int]]:
        """The job's download files (each written once per wave) and their sizes by kind."""
        download = job.download
        if download is None or job.parameters is None:
            return None, {}
        full_key = (download.target_sha, "full")
        if full_key not in written:
            written[full_key] = write_model_download(full_download(job.parameters), self.exchange)
        refs = {DownloadKind.FULL: written[full_key]}
        if download.kind is DownloadKind.DELTA:
            delta_key = (download.target_sha, download.base_sha)
            if delta_key not in written:
                written[delta_key] = write_model_download(download, self.exchange)
            refs[DownloadKind.DELTA] = written[delta_key]
        reference = ModelDownloadRef(
            sha256=download.target_sha,
            base_sha256=download.base_sha,
            full_uri=refs[DownloadKind.FULL][0],
            delta_uri=refs[DownloadKind.DELTA][0] if DownloadKind.DELTA in refs else "",
            shapes=[list(p.shape) for p in job.parameters],
        )
        return reference, {kind: size for kind, (_, size) in refs.items()}

    def _secagg(self, job: SiteJob) -> SecureStageRef | None:
        if job.secagg is None:
            return None
        request = job.unmask_request
        return SecureStageRef(
            context=context_to_json(job.secagg),
            request=base64.b64encode(request).decode("ascii") if request is not None else None,
        )

    def message(
        self,
        job: SiteJob,
        *,
        model: ModelRef | None,
        download: ModelDownloadRef | None,
    ) -> SiteJobMessage:
        """The typed site job for ``job`` (its model already written to the exchange)."""
        return SiteJobMessage(
            federation=self.config,
            site=job.site,
            run_id=self.run_id,
            mlflow_run_id=job.mlflow_run_id,
            round=job.round,
            stage=str(job.kind),  # type: ignore[arg-type]
            model=model,
            download=download,
            secagg=self._secagg(job),
            evaluate_round=job.evaluate_round,
            instructions=InstructionsRef.model_validate(
                instructions_payload(job.instructions, exchange=self.exchange)
            ),
            compression=job.compression.to_dict() if job.compression is not None else None,
            task_code=installed_task_code(),
            task=TaskRef.model_validate(task_identity(self.config).as_dict()),
        )

    def signed(self, message: SiteJobMessage) -> SignedSiteJob:
        """``message`` signed for its site, valid until its deadline (plus a margin)."""
        lifetime = timedelta(seconds=self.config.deployment.timeout_seconds) + SIGNATURE_MARGIN
        return sign(
            message,
            identity=self.identity,
            audience=message.site,
            lifetime=min(lifetime, timedelta(hours=24)),
        )

    def _context(self, site: str, job: SiteJob) -> AnswerContext:
        return AnswerContext(
            federation=self.config.name,
            run_id=self.run_id,
            round=job.round,
            stage=str(job.kind),
            site=site,
        )

    def files(self, site: str, job: SiteJob) -> AnswerFileSource:
        """Where the coordinator opens the sealed files of ``site``'s answer to ``job``.

        Only bare names in that site's folder of this run's answers, each at most what this
        model's answer can need (:func:`fl_components.wire.answer_files.file_limit`).
        """
        values = sum(int(p.size) for p in job.parameters) if job.parameters is not None else 0
        return AnswerFileSource(
            self.exchange / ANSWERS_FOLDER / site,  # only the answering site's own folder
            context=self._context(site, job),
            limit=file_limit(values),
        )

    def open(self, site: str, job: SiteJob, payload: Any) -> dict[str, Any]:
        """The site's answer inside its stored payload, verified against its enrolled key.

        Raises
        ------
        RejectedAnswer
            If it is not sealed to this coordinator, not signed by the site, or for another
            run, round or stage.
        """
        if not isinstance(payload, dict):
            raise RejectedAnswer(AnswerReason.MALFORMED, f"site {site!r}: not a JSON object")
        if self._answer_registry is None or site not in self._answer_registry:
            # the sites' public keys as enrolled (read again for a site enrolled since)
            self._answer_registry = load_registry(registry_path(self.config))
        return open_payload(
            payload,
            expected=self._context(site, job),
            identity=self.identity,
            registry=self._answer_registry,
        )

    def _submit(
        self, jobs: Sequence[SiteJob]
    ) -> tuple[dict[str, Any], Callable[[str, dict[str, Any]], SiteResult]]:
        """Create every site's flow run; the futures, and how to open and read an answer."""
        written: dict[int, tuple[str, str]] = {}
        files: dict[tuple[str, str], tuple[str, int]] = {}
        by_site = {job.site: job for job in jobs}
        sizes: dict[str, dict[DownloadKind | None, int]] = {}
        futures = {}
        for job in jobs:
            model = self._model_ref(job, written)
            download, download_sizes = self._download_ref(job, files)
            model_size = os.path.getsize(model.uri) if model is not None else 0
            sizes[job.site] = {None: model_size} | download_sizes
            message = self.message(job, model=model, download=download)
            futures[job.site] = run_participant.submit(self.signed(message))

        def parse(site: str, payload: dict[str, Any]) -> SiteResult:
            size = len(json.dumps(payload))  # what crossed result storage (sealed)
            opened = self.open(site, by_site[site], payload)
            files = self.files(site, by_site[site])
            answer = answer_from_payload(opened, job=by_site[site], size=size, source=files)
            answer = replace(answer, bytes_up=size + files.taken)  # its sealed files too
            # what the site read from the exchange: the npz, or the download it used
            read = sizes[site].get(answer.received, sizes[site][None])
            return replace(answer, bytes_down=read)

        return futures, parse

    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        """Create every site's flow run, then await them together; failures are dropouts."""
        futures, parse = self._submit(jobs)
        self._close_when_enough(jobs, futures)
        return collect_answers(
            futures,
            parse=parse,
            kind_of=lambda error: getattr(error, "kind", DropoutKind.FAILED),
        )

    def stream(self, jobs: Sequence[SiteJob]) -> Iterator[tuple[str, SiteResult | Dropout]]:
        """As :meth:`__call__`, each answer opened as it arrives (streaming aggregation).

        With ``participation.over_select`` the answers come all at once, as there.
        """
        if self.config.participation.over_select:
            yield from self(jobs).items()
            return
        futures, parse = self._submit(jobs)
        yield from stream_answers(
            futures,
            parse=parse,
            kind_of=lambda error: getattr(error, "kind", DropoutKind.FAILED),
        )

    def _close_when_enough(self, jobs: Sequence[SiteJob], futures: dict[str, Any]) -> None:
        """Over-selection: stop waiting once enough sites have answered.

        Once the round's count of sites has answered its training (or masking) stage, the
        ones still out are cancelled (``surplus``), not waited for.
        """
        training = [j for j in jobs if j.kind in (JobKind.TRAIN, JobKind.MASK)]
        participation = self.config.participation
        if not participation.over_select or not training:
            return
        key = (self.run_id, training[0].round, str(training[0].kind))
        need = round_target(
            len(self.config.sites),
            fraction=participation.fraction,
            minimum=participation.min_participants,
        )
        try:
            if len(training) <= need:  # nobody over-selected (fraction 1: all are needed)
                return
            answered = 0
            for future in as_completed([futures[j.site] for j in training]):
                try:  # the task's own outcome (its state on the server may lag behind)
                    future.result()
                except Exception:  # a failed site: it is no answer (collected as a dropout)
                    continue
                answered += 1
                if answered >= need:
                    _wave(*key).set()  # the others' tasks cancel their runs at their next poll
                    break
            for job in training:  # the rest end within a poll (or at their own deadline)
                futures[job.site].wait()
        finally:
            with _CLOSED_LOCK:
                _CLOSED.pop(key, None)

    def registry(self) -> Registry:
        """The registry written by ``fedpipe site init`` (public keys only)."""
        return load_registry(registry_path(self.config), sites=self.config.site_names)
