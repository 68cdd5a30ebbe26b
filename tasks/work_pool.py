"""The work-pool backend: each site's stage runs as a flow run on the site's own work pool.

For site S, the task ``participant-S`` creates a run of the deployment
``federated-participant/S`` (on S's pool, served by S's worker) and waits for it with a
deadline. Runs are *created* one after another (a SQLite-backed Prefect server serializes
writes: concurrent creation measured up to 15 s) and *awaited* together. A site that fails,
crashes or misses the deadline becomes a :class:`Dropout` naming the reason, and its late
run is cancelled. Results are read back from the shared result storage as plain JSON: a
result stored with any other serializer is refused, never unpickled.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, Scheduled

from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo
from fl_components.errors import FedpipeError, RoundError
from fl_components.exchange import (
    ExchangeError,
    metrics_from_payload,
    site_pool_name,
    update_from_payload,
    write_global_model,
)
from fl_components.parameters import NDArrays
from fl_components.secagg import Registry, RoundContext
from fl_components.secure_round import (
    MaskedContribution,
    context_to_json,
    load_registry,
    registry_path,
)
from fl_components.training import Metrics
from tasks.participants import (
    Dropout,
    MaskedOutcome,
    ParticipantBackend,
    TrainingOutcome,
    UnmaskOutcome,
)
from tasks.secure_site import response_from_payload

log = logging.getLogger(__name__)

# one creation at a time per coordinator process (SQLite serializes writes anyway)
_CREATE_LOCK = threading.Lock()
# (API URL, participant deployment name) -> deployment id
_DEPLOYMENTS: dict[tuple[str, str], uuid.UUID] = {}


class ParticipantError(FedpipeError):
    """A site's flow run failed, crashed, was cancelled or missed its deadline."""


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
    raw = storage.read_path(metadata.storage_key)
    document = json.loads(raw)
    # stored either as the bare JSON result, or as a record {"metadata", "result": "<json>"}
    is_record = isinstance(document, dict) and set(document) == {"metadata", "result"}
    payload = json.loads(document["result"]) if is_record else document
    if not isinstance(payload, dict):
        raise ExchangeError(f"flow run {run.name}: result is not a JSON object")
    return payload


def _timeout_message(site: str, pool: str, timeout: float, state: str) -> str:
    """Why site ``site`` missed the deadline and what to do, by its flow run's last state."""
    head = f"site {site!r} timed out: no result within {timeout:g}s"
    if state in ("Running", "Retrying"):  # picked up, but too slow
        return (
            f"{head} (its flow run on pool {pool!r} was still {state}); the site is slower "
            "than the deadline: raise deployment.timeout_seconds or check the run's logs"
        )
    return (
        f"{head}: its flow run was still {state}, never picked up by a worker of pool "
        f"{pool!r}; its worker is not running or cannot reach this server. Check with "
        f"`fedpipe status`, then start it on the site: `prefect worker start --pool {pool}` "
        "(or `fedpipe up` for the local stack)"
    )


def _wait(run_id: uuid.UUID, *, site: str, pool: str, timeout: float, poll: float) -> FlowRun:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() >= deadline:
                state = run.state.name if run.state is not None else "unknown"
                client.set_flow_run_state(
                    run_id, Cancelled(message=f"no result within {timeout:g}s"), force=True
                )
                raise ParticipantError(_timeout_message(site, pool, timeout, state))
            time.sleep(poll)


def _deployment_id(name: str) -> uuid.UUID:
    """The participant deployment's id, read once per coordinator process.

    One API call less per site and stage; a clear error when the site was never onboarded.
    """
    key = (str(PREFECT_API_URL.value()), name)  # a name means another deployment on another server
    cached = _DEPLOYMENTS.get(key)
    if cached is not None:
        return cached
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            site = name.rsplit("/", 1)[-1]
            raise ParticipantError(
                f"site {site!r}: no deployment {name!r}; onboard the site with "
                f"`fedpipe site init {site} --data PATH` or start the stack with `fedpipe up`"
            ) from None
    _DEPLOYMENTS[key] = deployment.id
    return deployment.id


def _create_run(
    name: str, parameters: dict[str, Any], *, run_name: str, tags: list[str]
) -> FlowRun:
    """Create a run of deployment ``name``, shown in the UI under this participant task.

    What ``run_deployment(..., timeout=0)`` does, in one API call instead of three: the
    deployment id is cached and the run's parent is this task run itself, not an extra
    placeholder task run.
    """
    parent = TaskRunContext.get()
    with get_client(sync_client=True) as client:
        for attempt in (1, 2):
            try:
                return client.create_flow_run_from_deployment(
                    _deployment_id(name),
                    parameters=parameters,
                    state=Scheduled(),
                    name=run_name,
                    tags=tags,
                    parent_task_run_id=parent.task_run.id if parent is not None else None,
                )
            except ObjectNotFound:  # deleted since it was cached: look it up afresh, once
                _DEPLOYMENTS.pop((str(PREFECT_API_URL.value()), name), None)
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


@task(
    name="participant",
    task_run_name="participant-{site}-r{round_num}-{stage}",
    cache_policy=NO_CACHE,
)
def run_participant(
    config: FederationConfig,
    *,
    site: str,
    round_num: int,
    stage: str,
    model_uri: str,
    model_sha256: str,
    run_id: str,
    secagg: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Dispatch one site's stage to its work pool and return its JSON payload.

    ``secagg`` (secure aggregation's ``mask``/``unmask`` stages) carries the round context
    and, for ``unmask``, the site's unmask request: small, and never an update.
    """
    pool = site_pool_name(config, site)
    name = f"{config.deployment.participant_deployment}/{site}"
    parameters = {
        "federation": config.model_dump(mode="json"),
        "site": site,
        "round_num": round_num,
        "stage": stage,
        "model_uri": model_uri,
        "model_sha256": model_sha256,
        "run_id": run_id,
        **({"secagg": secagg} if secagg is not None else {}),
    }
    started = time.perf_counter()
    with _CREATE_LOCK:
        created = _create_run(
            name,
            parameters,
            run_name=f"{site}-r{round_num}-{stage}",
            tags=["fedpipe", f"site:{site}", f"round:{round_num}"],
        )
    created_after = time.perf_counter() - started
    run = _wait(
        created.id,
        site=site,
        pool=pool,
        timeout=config.deployment.timeout_seconds,
        poll=config.deployment.poll_interval,
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state is not None else "unknown"
        message = run.state.message if run.state is not None else ""
        raise ParticipantError(f"site {site!r}: flow run {run.name} ended {state}: {message}")
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


class WorkPoolBackend(ParticipantBackend):
    """Sites run the participant flow on their own work pools, through a Prefect server."""

    def __init__(self, config: FederationConfig, info: DatasetInfo) -> None:
        if not PREFECT_API_URL.value():
            raise RoundError(
                "backend 'work-pool' needs a Prefect server: run `fedpipe up` and set "
                "PREFECT_API_URL to the address it prints (e.g. http://127.0.0.1:4200/api)"
            )
        self.config = config
        self.info = info
        self.run_id = str(flow_run.get_id() or uuid.uuid4())
        self.exchange = Path(config.deployment.exchange_dir).resolve() / self.run_id

    def _dispatch(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int, stage: str
    ) -> dict[str, dict[str, Any] | Exception]:
        uri, sha = write_global_model(parameters, self.exchange)
        futures = {
            site: run_participant.submit(
                self.config,
                site=site,
                round_num=round_num,
                stage=stage,
                model_uri=uri,
                model_sha256=sha,
                run_id=self.run_id,
            )
            for site in sites
        }
        results: dict[str, dict[str, Any] | Exception] = {}
        for site, future in futures.items():
            try:
                results[site] = future.result()
            except Exception as error:  # a site's failure must not sink the round
                results[site] = error
        return results

    def train(
        self, sites: tuple[str, ...], global_parameters: NDArrays, *, round_num: int
    ) -> TrainingOutcome:
        """Dispatch training to every selected site's pool; failures become dropouts."""
        outcome = TrainingOutcome(updates=[], dropouts=[])
        results = self._dispatch(sites, global_parameters, round_num=round_num, stage="train")
        for site, result in results.items():
            try:
                if isinstance(result, Exception):
                    raise result
                outcome.updates.append(update_from_payload(result, site=site, round_num=round_num))
            except Exception as error:
                log.warning("site %s dropped out of round %d: %s", site, round_num, error)
                outcome.dropouts.append(
                    Dropout(site=site, reason=f"{type(error).__name__}: {error}")
                )
        return outcome

    def registry(self) -> Registry:
        """The registry written by ``fedpipe site init`` (public keys only)."""
        return load_registry(registry_path(self.config), sites=self.config.site_names)

    def train_masked(
        self, sites: tuple[str, ...], global_parameters: NDArrays, ctx: RoundContext
    ) -> MaskedOutcome:
        """Stage ``mask`` on every selected site's pool; failures become dropouts."""
        uri, sha = write_global_model(global_parameters, self.exchange)
        context = {"context": context_to_json(ctx)}
        futures = {
            site: run_participant.submit(
                self.config,
                site=site,
                round_num=ctx.round,
                stage="mask",
                model_uri=uri,
                model_sha256=sha,
                run_id=self.run_id,
                secagg=context,
            )
            for site in sites
        }
        outcome = MaskedOutcome(contributions=[], dropouts=[])
        for site, future in futures.items():
            try:
                outcome.contributions.append(
                    MaskedContribution.from_payload(future.result(), site=site, round_num=ctx.round)
                )
            except Exception as error:  # a site's failure must not sink the round
                log.warning("site %s dropped out of round %d: %s", site, ctx.round, error)
                outcome.dropouts.append(
                    Dropout(site=site, reason=f"{type(error).__name__}: {error}")
                )
        return outcome

    def unmask(self, requests: dict[str, bytes], ctx: RoundContext) -> UnmaskOutcome:
        """Stage ``unmask`` on every survivor's pool (no model is sent)."""
        futures = {
            site: run_participant.submit(
                self.config,
                site=site,
                round_num=ctx.round,
                stage="unmask",
                model_uri="",
                model_sha256="",
                run_id=self.run_id,
                secagg={
                    "context": context_to_json(ctx),
                    "request": base64.b64encode(request).decode("ascii"),
                },
            )
            for site, request in requests.items()
        }
        outcome = UnmaskOutcome(responses={}, dropouts=[])
        for site, future in futures.items():
            try:
                outcome.responses[site] = response_from_payload(
                    future.result(), site=site, round_num=ctx.round
                )
            except Exception as error:
                log.warning("site %s failed to unmask round %d: %s", site, ctx.round, error)
                outcome.dropouts.append(
                    Dropout(site=site, reason=f"{type(error).__name__}: {error}")
                )
        return outcome

    def evaluate(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int
    ) -> dict[str, Metrics]:
        """Dispatch evaluation to every site's pool; a failing site is left out and logged."""
        scores: dict[str, Metrics] = {}
        results = self._dispatch(sites, parameters, round_num=round_num, stage="evaluate")
        for site, result in results.items():
            try:
                if isinstance(result, Exception):
                    raise result
                scores[site] = metrics_from_payload(result, site=site, round_num=round_num)
            except Exception as error:
                log.warning("site %s could not evaluate round %d: %s", site, round_num, error)
        return scores
