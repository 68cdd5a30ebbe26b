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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled

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
from fl_components.parameters import NDArrays, digest
from fl_components.secagg import Registry, RoundContext
from fl_components.secure_round import (
    MaskedContribution,
    context_to_json,
    load_registry,
    registry_path,
)
from fl_components.training import Metrics
from tasks.participants import (
    MaskedOutcome,
    ParticipantBackend,
    TrainingOutcome,
    UnmaskOutcome,
    collect_results,
)
from tasks.secure_site import response_from_payload

log = logging.getLogger(__name__)

# one creation at a time per coordinator process (SQLite serializes writes anyway)
_CREATE_LOCK = threading.Lock()


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


def _restart_advice(site: str, pool: str) -> str:
    """The commands that really bring a site's worker back (with its data, keys, executor)."""
    return (
        f"on the local stack: `fedpipe site restart {site}`; on the site's own host: run the "
        f"worker command `fedpipe site init {site}` printed (`fedpipe site worker --pool {pool}` "
        "with the site's FEDPIPE_SITE_* settings); check with `fedpipe status`"
    )


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


def _dead_site_message(site: str, pool: str, why: str, *, waited: float | None) -> str:
    when = "before dispatch" if waited is None else f"after {waited:.0f}s of waiting"
    return (
        f"site {site!r} skipped {when}: {why}, so its flow run cannot start; "
        f"{_restart_advice(site, pool)}"
    )


def _wait(
    run_id: uuid.UUID,
    *,
    site: str,
    pool: str,
    timeout: float,
    poll: float,
    liveness_every: float = 2.0,
) -> FlowRun:
    """Wait for a site's flow run to end; give up at the deadline or once its pool is dead.

    Raises
    ------
    ParticipantError
        At the deadline, or as soon as the site's pool has no live worker (the run is
        cancelled either way).
    """
    started = time.monotonic()
    deadline = started + timeout
    next_check = started + liveness_every
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            now = time.monotonic()
            why = None
            if now >= next_check:
                why = pool_not_serving(client, pool)
                next_check = now + liveness_every
            if now >= deadline or why is not None:
                state = run.state.name if run.state is not None else "unknown"
                reason = why or f"no result within {timeout:g}s"
                client.set_flow_run_state(run_id, Cancelled(message=reason), force=True)
                if why is not None:
                    raise ParticipantError(
                        _dead_site_message(site, pool, why, waited=now - started)
                    )
                raise ParticipantError(_timeout_message(site, pool, timeout, state))
            time.sleep(poll)


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
    evaluate_round: int | None = None,
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
        **({"evaluate_round": evaluate_round} if evaluate_round is not None else {}),
    }
    started = time.perf_counter()
    with get_client(sync_client=True) as client:
        why = pool_not_serving(client, pool)
    if why is not None:  # a dead site costs nothing: no run created, no deadline waited
        raise ParticipantError(_dead_site_message(site, pool, why, waited=None))
    with _CREATE_LOCK:
        try:
            created = run_deployment(
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
                f"`fedpipe site init {site} --data PATH` or start the stack with `fedpipe up`"
            ) from None
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


@dataclass
class _PendingEvaluation:
    """A requested federated evaluation, waiting to ride along with the next dispatch."""

    sites: tuple[str, ...]
    parameters: NDArrays
    round_num: int
    sha: str
    dispatched: bool = False
    scores: dict[str, Metrics] = field(default_factory=dict)


class WorkPoolBackend(ParticipantBackend):
    """Sites run the participant flow on their own work pools, through a Prefect server.

    One dispatch per round where it can: a round's federated evaluation is folded into the
    next round's training dispatch (the ``train``/``mask`` stage scores the model it receives
    before training from it, and sites not training that round get an ``evaluate`` stage in
    the same wave), so a round costs one flow run per site instead of two.
    """

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
        self._pending: _PendingEvaluation | None = None

    # --------------------------------------------------------------- evaluation folding

    def request_evaluation(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int
    ) -> None:
        """Hold the evaluation for the next dispatch of the same model (see the class)."""
        self._pending = _PendingEvaluation(tuple(sites), parameters, round_num, digest(parameters))

    def collect_evaluation(self) -> dict[str, Metrics]:
        """The folded scores, or (nothing was dispatched since the request) a wave of its own."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("collect_evaluation() without request_evaluation()")
        if not pending.dispatched:
            return self.evaluate(pending.sites, pending.parameters, round_num=pending.round_num)
        for site in pending.sites:
            if site not in pending.scores:
                log.warning("site %s could not evaluate round %d", site, pending.round_num)
        return pending.scores

    def _fold(self, sha: str, wave: tuple[str, ...]) -> tuple[int | None, tuple[str, ...]]:
        """If an evaluation of this very model waits: its round and the sites outside ``wave``."""
        pending = self._pending
        if pending is None or pending.dispatched or pending.sha != sha:
            return None, ()
        pending.dispatched = True
        return pending.round_num, tuple(s for s in pending.sites if s not in wave)

    def _take_evaluation(self, site: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Move a folded ``"evaluation"`` out of ``payload`` into the pending scores."""
        evaluation = payload.pop("evaluation", None)
        pending = self._pending
        if evaluation is not None and pending is not None:
            try:
                pending.scores[site] = metrics_from_payload(
                    evaluation, site=site, round_num=pending.round_num
                )
            except ExchangeError as error:
                log.warning("site %s: folded evaluation refused: %s", site, error)
        return payload

    def _collect_evaluate_only(self, futures: dict[str, Any]) -> None:
        pending = self._pending
        if pending is not None:
            scores, _ = collect_results(
                futures,
                what="evaluation",
                round_num=pending.round_num,
                parse=lambda site, result: metrics_from_payload(
                    result, site=site, round_num=pending.round_num
                ),
            )
            pending.scores.update(scores)

    # --------------------------------------------------------------- dispatch

    def _submit(
        self,
        site: str,
        stage: str,
        *,
        round_num: int,
        model: tuple[str, str],
        secagg: dict[str, str] | None = None,
        evaluate_round: int | None = None,
    ) -> Any:
        uri, sha = model
        return run_participant.submit(
            self.config,
            site=site,
            round_num=round_num,
            stage=stage,
            model_uri=uri,
            model_sha256=sha,
            run_id=self.run_id,
            secagg=secagg,
            evaluate_round=evaluate_round,
        )

    def _training_wave(
        self,
        sites: tuple[str, ...],
        parameters: NDArrays,
        *,
        stage: str,
        round_num: int,
        secagg: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Submit ``stage`` to ``sites`` (plus any evaluation folded in); return both futures."""
        model = write_global_model(parameters, self.exchange)
        evaluate_round, others = self._fold(model[1], sites)
        futures = {
            site: self._submit(
                site,
                stage,
                round_num=round_num,
                model=model,
                secagg=secagg,
                evaluate_round=evaluate_round,
            )
            for site in sites
        }
        evaluate_only = {
            site: self._submit(site, "evaluate", round_num=evaluate_round, model=model)
            for site in others
            if evaluate_round is not None
        }
        return futures, evaluate_only

    def train(
        self, sites: tuple[str, ...], global_parameters: NDArrays, *, round_num: int
    ) -> TrainingOutcome:
        """Dispatch training to every selected site's pool; failures become dropouts."""
        futures, evaluate_only = self._training_wave(
            sites, global_parameters, stage="train", round_num=round_num
        )
        updates, dropouts = collect_results(
            futures,
            what="training",
            round_num=round_num,
            parse=lambda site, payload: update_from_payload(
                self._take_evaluation(site, payload), site=site, round_num=round_num
            ),
        )
        self._collect_evaluate_only(evaluate_only)
        return TrainingOutcome(updates=list(updates.values()), dropouts=dropouts)

    def registry(self) -> Registry:
        """The registry written by ``fedpipe site init`` (public keys only)."""
        return load_registry(registry_path(self.config), sites=self.config.site_names)

    def train_masked(
        self, sites: tuple[str, ...], global_parameters: NDArrays, ctx: RoundContext
    ) -> MaskedOutcome:
        """Stage ``mask`` on every selected site's pool; failures become dropouts."""
        futures, evaluate_only = self._training_wave(
            sites,
            global_parameters,
            stage="mask",
            round_num=ctx.round,
            secagg={"context": context_to_json(ctx)},
        )
        contributions, dropouts = collect_results(
            futures,
            what="masking",
            round_num=ctx.round,
            parse=lambda site, payload: MaskedContribution.from_payload(
                self._take_evaluation(site, payload), site=site, round_num=ctx.round
            ),
        )
        self._collect_evaluate_only(evaluate_only)
        return MaskedOutcome(contributions=list(contributions.values()), dropouts=dropouts)

    def unmask(self, requests: dict[str, bytes], ctx: RoundContext) -> UnmaskOutcome:
        """Stage ``unmask`` on every survivor's pool (no model is sent)."""
        futures = {
            site: self._submit(
                site,
                "unmask",
                round_num=ctx.round,
                model=("", ""),
                secagg={
                    "context": context_to_json(ctx),
                    "request": base64.b64encode(request).decode("ascii"),
                },
            )
            for site, request in requests.items()
        }
        responses, dropouts = collect_results(
            futures,
            what="unmasking",
            round_num=ctx.round,
            parse=lambda site, payload: response_from_payload(
                payload, site=site, round_num=ctx.round
            ),
        )
        return UnmaskOutcome(responses=responses, dropouts=dropouts)

    def evaluate(
        self, sites: tuple[str, ...], parameters: NDArrays, *, round_num: int
    ) -> dict[str, Metrics]:
        """Dispatch evaluation to every site's pool; a failing site is left out and logged."""
        model = write_global_model(parameters, self.exchange)
        futures = {
            site: self._submit(site, "evaluate", round_num=round_num, model=model) for site in sites
        }
        scores, _ = collect_results(
            futures,
            what="evaluation",
            round_num=round_num,
            parse=lambda site, payload: metrics_from_payload(
                payload, site=site, round_num=round_num
            ),
        )
        return scores
