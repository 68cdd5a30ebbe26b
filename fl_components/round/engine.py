"""The round engine: one federated round, with no Prefect in it.

``state, report = run_round(state, plan, dispatch, strategy)`` is the whole round: the
strategy says what each site is sent (:meth:`Strategy.configure`), the ``dispatch`` (the
backend: Prefect tasks in-process, the sites' work pools, or a plain loop in a benchmark)
runs the site jobs and answers, per site, a :class:`SiteResult` or a typed
:class:`Dropout`; updates are validated, combined by the strategy (or, under secure
aggregation, unmasked as a sum) and applied. The coordinator flow calls this once per round
with Prefect tasks as the dispatch; the bare benchmark loop calls the very same function.

A round's federated evaluation travels with the next round's dispatch: the sites score the
model they receive (``SiteJob.evaluate_round``) before training from it, and sites not
training that round get an ``evaluate`` job in the same wave. So a round costs one dispatch
to the sites (two under secure aggregation: mask, then unmask).

With ``compression.download: delta`` (``RoundPlan.downloads``) the model goes to each site as
a delta against the broadcast model it already holds (verified by SHA-256 at the site), the
full model to a site that missed a round, is new, or holds another model; ``bytes/down`` is
what each site really received, framing included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fl_components.compression.download import (
    ModelDownload,
    ModelDownloads,
    full_download_nbytes,
)
from fl_components.compression.instruction import CompressionInstruction
from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, nbytes
from fl_components.round.types import (
    AggregatedUpdate,
    Dropout,
    DropoutKind,
    JobKind,
    LocalUpdate,
    Metrics,
    ServerState,
    SiteInstructions,
    SiteJob,
    SiteResult,
)
from fl_components.strategies.aggregation import MeanFold
from fl_components.strategies.base import Strategy

Dispatch = Callable[[Sequence[SiteJob]], Mapping[str, "SiteResult | Dropout"]]
"""Runs the jobs (one per site) and answers for every site: a result or a dropout.

A dispatch may also have ``stream(jobs)``: an iterator of ``(site, answer)`` pairs in the
order the answers arrive. When the round's rule is a mean, the engine then folds each
update as it arrives and drops it (streaming aggregation): the coordinator holds the running
sum and a bounded number of updates, not one per site.
"""


@dataclass(frozen=True)
class EvaluationRequest:
    """Score the model being sent (the state after round ``round``) on ``sites``."""

    round: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator decided for one round before dispatching it.

    Attributes
    ----------
    round : int
        The round number (state.round + 1).
    selected : tuple of str
        The sites drawn to train.
    seeds : Mapping[str, int]
        Each selected site's seed.
    min_participants : int
        Fewer valid updates than this aborts the round (the global model is untouched).
    evaluation : EvaluationRequest or None
        The previous model's federated evaluation, folded into this dispatch.
    max_update_norm : float or None
        Updates whose L2 norm exceeds this are rejected as invalid (None: no bound).
    secure : SecureAggregation or None
        Secure aggregation for this round (the coordinator learns only the sum).
    compression : CompressionInstruction or None
        How training sites compress their updates in the clear (None: float32).
    downloads : ModelDownloads or None
        The run's model-delta memory (``compression.download: delta``; None: every site gets
        the full model).
    target : int or None
        Over-selection (``participation.over_select``): the round closes with this many valid
        updates, the first in ``selected`` order; the other valid ones are ``surplus``
        dropouts (in the clear; under secure aggregation every masked update is summed).
        None: every valid update counts.
    """

    round: int
    selected: tuple[str, ...]
    seeds: Mapping[str, int]
    min_participants: int = 1
    evaluation: EvaluationRequest | None = None
    max_update_norm: float | None = None
    secure: SecureAggregation | None = None
    mlflow_run_id: str = ""
    flow_run_id: str = ""
    compression: CompressionInstruction | None = None
    downloads: ModelDownloads | None = None
    target: int | None = None


class SecureAggregation:
    """The secure-aggregation seam the engine calls.

    See :mod:`fl_components.secure_aggregation.site_stages`.

    ``jobs`` turns the round's training jobs into ``mask`` jobs; ``aggregate`` receives the
    masked results, asks the survivors to unmask through ``dispatch`` and returns the
    combined update, the survivors' reports (metadata only), extra dropouts and metrics.
    """

    def jobs(self, jobs: Sequence[SiteJob]) -> list[SiteJob]:
        """The ``mask`` jobs for the round's training jobs."""
        raise NotImplementedError

    def receive(self, answer: SiteResult) -> SiteResult:
        """Take one selected site's masked answer as it arrives; what is kept of it.

        The default keeps all of it for :meth:`aggregate`; a streaming implementation
        verifies it and adds it to its running sum now, and keeps only the metadata.
        """
        return answer

    def aggregate(
        self,
        masked: Mapping[str, SiteResult],
        *,
        state: ServerState,
        strategy: Strategy,
        dispatch: Dispatch,
    ) -> tuple[AggregatedUpdate, list[LocalUpdate], list[Dropout], dict[str, float]]:
        """Unmask the sum of the masked updates; combine it with the strategy."""
        raise NotImplementedError


@dataclass
class MaskedStream:
    """A secure round's masked answers handed to secure aggregation one at a time.

    Each selected site's answer goes to :meth:`SecureAggregation.receive` as it arrives,
    so the coordinator holds the running masked sum and one message at a time, never the
    round's n masked vectors at once.
    """

    secure: SecureAggregation
    held: int = 0
    peak_held: int = 0

    def consume(
        self,
        arrivals: Iterator[tuple[str, SiteResult | Dropout]],
        plan: RoundPlan,
        like: NDArrays,
    ) -> dict[str, SiteResult | Dropout]:
        """Every answer, each selected site's masked one received as it came."""
        answers: dict[str, SiteResult | Dropout] = {}
        for site, answer in arrivals:
            if isinstance(answer, SiteResult) and site in plan.selected and answer.refusal is None:
                self.held += 1
                self.peak_held = max(self.peak_held, self.held)
                answer = self.secure.receive(answer)
                self.held -= 1
            answers[site] = answer
        return answers


class RoundAbortedError(RoundError):
    """The round could not complete; the state is unchanged. Carries what was learned.

    Attributes
    ----------
    evaluations : dict[str, Metrics]
        The folded evaluation of the previous model that came back with the dispatch (it
        is still that round's score, and is logged).
    dropouts : list[Dropout]
        Who gave nothing usable, and why (declines included).
    """

    def __init__(
        self, message: str, *, evaluations: dict[str, Metrics], dropouts: list[Dropout]
    ) -> None:
        super().__init__(message)
        self.evaluations = evaluations
        self.dropouts = dropouts


@dataclass(frozen=True)
class RoundReport:
    """What one round did: who trained, who dropped and why, scores, figures.

    ``updates`` hold each survivor's metadata (under secure aggregation their ``delta`` is
    empty: the coordinator never held it); ``evaluations`` are the folded evaluation of
    ``plan.evaluation.round``'s model.
    """

    round: int
    selected: tuple[str, ...]
    updates: list[LocalUpdate]
    dropouts: list[Dropout]
    evaluations: dict[str, Metrics]
    aggregated: AggregatedUpdate
    metrics: dict[str, float]
    seconds: float

    @property
    def rejected(self) -> list[Dropout]:
        """Updates refused before aggregation (invalid or failing a protocol check)."""
        return [d for d in self.dropouts if d.kind in (DropoutKind.INVALID, DropoutKind.REJECTED)]

    def released(self) -> RoundReport:
        """The report without its arrays: the aggregate's and the updates' (applied already).

        What a caller keeps while the next round runs: who, scores, figures and the privacy
        record, so no model-sized array of a round already applied stays alive.
        """
        return replace(
            self,
            updates=[replace(u, delta=[], control_delta=None) for u in self.updates],
            aggregated=replace(self.aggregated, delta=[], control_delta=None),
        )


@dataclass
class UpdateStream:
    """The round's training updates folded into the strategy's mean as they arrive.

    :meth:`take` validates one answer's update, folds it and returns the answer with its
    delta emptied (metadata only), so nothing keeps the arrays once the fold has them.

    Attributes
    ----------
    fold : MeanFold
        The running example-weighted sum.
    updates : list of LocalUpdate
        Each folded update's metadata (its ``delta`` empty).
    rejected : list of Dropout
        Updates refused by :func:`validate_update`.
    bytes_up : dict
        What each site's answer weighed on the wire (or its float32 update).
    held, peak_held : int
        Updates being folded now, and the most at once this round.
    """

    fold: MeanFold
    updates: list[LocalUpdate] = field(default_factory=list)
    rejected: list[Dropout] = field(default_factory=list)
    bytes_up: dict[str, int] = field(default_factory=dict)
    held: int = 0
    peak_held: int = 0

    def take(
        self, answer: SiteResult | Dropout, plan: RoundPlan, like: NDArrays
    ) -> SiteResult | Dropout:
        """Fold ``answer``'s update if it is a selected site's training update; strip it."""
        if not isinstance(answer, SiteResult) or answer.site not in plan.selected:
            return answer
        update = answer.update
        if answer.refusal is not None or update is None:
            return answer
        self.held += 1
        self.peak_held = max(self.peak_held, self.held)
        try:
            self.bytes_up[answer.site] = answer.bytes_up or nbytes(update.delta)
            refusal = validate_update(update, like, max_norm=plan.max_update_norm)
            if refusal is not None:
                self.rejected.append(refusal)
            else:
                self.fold.add(update)
                self.updates.append(replace(update, delta=[]))
        finally:
            self.held -= 1
        return replace(answer, update=replace(update, delta=[]))

    def consume(
        self, arrivals: Iterable[tuple[str, SiteResult | Dropout]], plan: RoundPlan, like: NDArrays
    ) -> dict[str, SiteResult | Dropout]:
        """Fold every arrival in turn; the answers, stripped of their deltas."""
        answers: dict[str, SiteResult | Dropout] = {}
        for site, answer in arrivals:
            answers[site] = self.take(answer, plan, like)
            del answer  # the fold has it: drop the arrays before the next one arrives
        return answers


def _streamed_answers(
    dispatch: Dispatch,
    jobs: Sequence[SiteJob],
    stream: UpdateStream | MaskedStream | None,
    plan: RoundPlan,
    like: NDArrays,
) -> Mapping[str, SiteResult | Dropout]:
    """The dispatch's answers; with ``stream``, each consumed as it arrives.

    In the clear an update is folded into the mean; under secure aggregation a masked
    update is received into the running masked sum.
    """
    if stream is None:
        return dispatch(jobs)
    streaming = getattr(dispatch, "stream", None)
    # a plain dispatch answers all at once: fold those answers, then let them go
    arrivals: Iterator[tuple[str, SiteResult | Dropout]] = (
        streaming(jobs) if callable(streaming) else iter(dispatch(jobs).items())
    )
    return stream.consume(arrivals, plan, like)


def update_stream(plan: RoundPlan, state: ServerState, strategy: Strategy) -> UpdateStream | None:
    """Streaming aggregation for this round, or None.

    Only in the clear (secure aggregation sums masked vectors on its own), without
    over-selection (which keeps the first valid updates in selection order, not arrival
    order), and when the strategy's rule is a mean (:meth:`Strategy.fold`).
    """
    if plan.secure is not None or plan.target is not None:
        return None
    fold = strategy.fold(state)
    return UpdateStream(fold) if fold is not None else None


def validate_update(
    update: LocalUpdate, like: NDArrays, *, max_norm: float | None
) -> Dropout | None:
    """Refuse an update of the wrong shape or dtype, with NaN/Inf, or beyond the norm bound.

    Nothing invalid ever reaches the strategy: the round goes on without it.
    """

    def fail(reason: str) -> Dropout:
        return Dropout(update.site, DropoutKind.INVALID, reason)

    if len(update.delta) != len(like):
        return fail(f"update has {len(update.delta)} arrays, the model has {len(like)}")
    for index, (delta, ref) in enumerate(zip(update.delta, like, strict=True)):
        if delta.shape != ref.shape:
            return fail(f"array {index}: shape {delta.shape}, the model's is {ref.shape}")
        if delta.dtype != np.float32:
            return fail(f"array {index}: dtype {delta.dtype}, expected float32")
        if not np.isfinite(delta).all():
            return fail(f"array {index}: contains NaN or Inf")
    if update.num_examples < 1:
        return fail(f"num_examples is {update.num_examples}; a site trains on at least one")
    if max_norm is not None:
        norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in update.delta))
        if norm > max_norm:
            return fail(f"L2 norm {norm:.4g} exceeds the round's bound {max_norm:.4g}")
    return None


def round_jobs(plan: RoundPlan, state: ServerState, strategy: Strategy) -> list[SiteJob]:
    """The round's jobs: train each selected site (with its instructions), evaluate the rest.

    With ``plan.downloads`` every job carries the round's broadcast model B_r and the
    download that rebuilds it at its site (a delta, or the full model).
    """
    instructions = strategy.configure(plan.round, state, plan.selected)
    evaluate_round = plan.evaluation.round if plan.evaluation is not None else None
    model = state.parameters
    if plan.downloads is not None:
        model = plan.downloads.broadcast(state.parameters, round=plan.round).model

    def download(site: str) -> ModelDownload | None:
        return plan.downloads.for_site(site) if plan.downloads is not None else None

    jobs = [
        SiteJob(
            site=site,
            kind=JobKind.TRAIN,
            round=plan.round,
            parameters=model,
            seed=plan.seeds[site],
            instructions=instructions.get(site, SiteInstructions()),
            evaluate_round=evaluate_round,
            mlflow_run_id=plan.mlflow_run_id,
            flow_run_id=plan.flow_run_id,
            compression=plan.compression,
            download=download(site),
        )
        for site in plan.selected
    ]
    if plan.secure is not None:
        jobs = plan.secure.jobs(jobs)
    if plan.evaluation is not None:
        jobs += [
            SiteJob(
                site=site,
                kind=JobKind.EVALUATE,
                round=plan.evaluation.round,
                parameters=model,
                download=download(site),
            )
            for site in plan.evaluation.sites
            if site not in plan.selected
        ]
    return jobs


def download_bytes(
    plan: RoundPlan, jobs: Sequence[SiteJob], answers: Mapping[str, SiteResult | Dropout]
) -> dict[str, int]:
    """What each answering site received this dispatch, in bytes; record what it now holds.

    A site that used its delta received ``download.nbytes``, one that fell back (or was sent
    the full model) the full model's; without downloads, the float32 model. SCAFFOLD's
    control variate counts too. A backend that measured the transfer (``bytes_down``) wins.
    Sites that gave no answer are not counted (nothing says what reached them).
    """
    sizes: dict[str, int] = {}
    for job in jobs:
        answer = answers.get(job.site)
        if not isinstance(answer, SiteResult) or job.parameters is None:
            continue
        size = nbytes(job.parameters)
        if job.download is not None:
            used = answer.received if answer.received is not None else job.download.kind
            size = (
                job.download.nbytes
                if used is job.download.kind
                else full_download_nbytes(sum(int(p.size) for p in job.parameters))
            )
            if answer.received is not None and plan.downloads is not None:
                plan.downloads.received(job.site, job.download.target_sha)
        if answer.bytes_down:
            size = answer.bytes_down
        control = job.instructions.server_control
        sizes[job.site] = size + (nbytes(control) if control is not None else 0)
    return sizes


def _split(
    answers: Mapping[str, SiteResult | Dropout], plan: RoundPlan
) -> tuple[dict[str, SiteResult], list[Dropout], dict[str, Metrics]]:
    """Training answers of the selected sites, their dropouts, and every evaluation."""
    results: dict[str, SiteResult] = {}
    dropouts: list[Dropout] = []
    evaluations: dict[str, Metrics] = {}
    for site, answer in answers.items():
        if isinstance(answer, Dropout):
            if site in plan.selected:
                dropouts.append(answer)
            continue
        if answer.evaluation is not None:
            evaluations[site] = answer.evaluation
        if site in plan.selected and answer.refusal is not None:
            dropouts.append(answer.refusal)
        elif site in plan.selected:
            results[site] = answer
    missing = [s for s in plan.selected if s not in answers]
    dropouts += [Dropout(s, DropoutKind.FAILED, "the backend gave no answer") for s in missing]
    return results, dropouts, evaluations


def _close_at_target(
    plan: RoundPlan, updates: list[LocalUpdate], dropouts: list[Dropout]
) -> list[LocalUpdate]:
    """Over-selection: keep the first ``plan.target`` valid updates in selection order.

    The others join ``dropouts`` as ``surplus``.
    """
    if plan.target is None or len(updates) <= plan.target:
        return updates
    order = {site: i for i, site in enumerate(plan.selected)}
    ranked = sorted(updates, key=lambda u: order.get(u.site, len(order)))
    kept, extra = ranked[: plan.target], ranked[plan.target :]
    dropouts += [
        Dropout(
            u.site,
            DropoutKind.SURPLUS,
            f"over-selected: the round closed with {plan.target} updates "
            "(participation.over_select)",
        )
        for u in extra
    ]
    return kept


def require_quorum(plan: RoundPlan, valid: int, dropouts: Sequence[Dropout]) -> None:
    """Abort the round, global model untouched, when too few valid updates came back."""
    if valid >= plan.min_participants:
        return
    reasons = "; ".join(f"{d.site}: {d}" for d in dropouts)
    raise RoundError(
        f"round {plan.round}: only {valid} of {len(plan.selected)} sites returned a valid "
        f"update, participation.min_participants is {plan.min_participants} ({reasons}); "
        "the global model was left unchanged"
    )


def run_round(
    state: ServerState, plan: RoundPlan, dispatch: Dispatch, strategy: Strategy
) -> tuple[ServerState, RoundReport]:
    """Run one round: dispatch, validate, aggregate, apply.

    Raises
    ------
    RoundError
        When fewer than ``plan.min_participants`` valid updates come back, or secure
        aggregation cannot unmask; the state is then left as it was.
    """
    started = time.perf_counter()
    strategy.check_memory(len(plan.selected), state)
    jobs = round_jobs(plan, state, strategy)
    stream = update_stream(plan, state, strategy)
    masked = MaskedStream(plan.secure) if plan.secure is not None else None
    answers = _streamed_answers(dispatch, jobs, stream or masked, plan, state.parameters)
    down = download_bytes(plan, jobs, answers)
    results, dropouts, evaluations = _split(answers, plan)
    del answers
    try:
        return _finish_round(
            state,
            plan,
            dispatch,
            strategy,
            results,
            dropouts,
            evaluations,
            started=started,
            down=down,
            stream=stream,
        )
    except RoundAbortedError:
        raise
    except RoundError as error:
        raise RoundAbortedError(str(error), evaluations=evaluations, dropouts=dropouts) from None


def _bytes_up_metrics(per_site: Mapping[str, int]) -> dict[str, float]:
    metrics = {"bytes/up": float(sum(per_site.values()))}
    metrics.update({f"bytes/up/site/{site}": float(b) for site, b in per_site.items()})
    return metrics


def _aggregate_streamed(
    state: ServerState,
    plan: RoundPlan,
    strategy: Strategy,
    results: dict[str, SiteResult],
    dropouts: list[Dropout],
    stream: UpdateStream,
) -> tuple[AggregatedUpdate, list[LocalUpdate], dict[str, float]]:
    """The mean the stream folded (its refusals join ``dropouts``)."""
    dropouts += [
        Dropout(r.site, DropoutKind.REJECTED, "no update returned")
        for r in results.values()
        if r.update is None
    ]
    dropouts += stream.rejected
    require_quorum(plan, len(stream.updates), dropouts)
    aggregated = strategy.aggregate_folded(stream.fold, state)
    metrics = _bytes_up_metrics(stream.bytes_up)
    metrics["aggregation/peak_updates_held"] = float(stream.peak_held)
    return aggregated, stream.updates, metrics


def _aggregate_in_clear(
    state: ServerState,
    plan: RoundPlan,
    strategy: Strategy,
    results: dict[str, SiteResult],
    dropouts: list[Dropout],
) -> tuple[AggregatedUpdate, list[LocalUpdate], dict[str, float]]:
    """Validate each update (refusals join ``dropouts``), then let the strategy combine them."""
    updates = []
    for result in results.values():
        if result.update is None:
            dropouts.append(Dropout(result.site, DropoutKind.REJECTED, "no update returned"))
            continue
        refusal = validate_update(result.update, state.parameters, max_norm=plan.max_update_norm)
        if refusal is not None:
            dropouts.append(refusal)
        else:
            updates.append(result.update)
    updates = _close_at_target(plan, updates, dropouts)
    require_quorum(plan, len(updates), dropouts)
    aggregated = strategy.aggregate(updates, state)
    per_site = {
        r.site: r.bytes_up or nbytes(r.update.delta)
        for r in results.values()
        if r.update is not None
    }
    return aggregated, updates, _bytes_up_metrics(per_site)


def _finish_round(
    state: ServerState,
    plan: RoundPlan,
    dispatch: Dispatch,
    strategy: Strategy,
    results: dict[str, SiteResult],
    dropouts: list[Dropout],
    evaluations: dict[str, Metrics],
    *,
    started: float,
    down: Mapping[str, int],
    stream: UpdateStream | None = None,
) -> tuple[ServerState, RoundReport]:
    """Validate and aggregate the round's answers, apply the update, report.

    ``down``: each site's model download (bytes); under secure aggregation the unmask
    requests the coordinator sent (``bytes/down/site/*`` from the seam) are added.
    """
    metrics: dict[str, float] = {}
    if plan.secure is not None:
        require_quorum(plan, len(results), dropouts)
        aggregated, updates, rejected, metrics = plan.secure.aggregate(
            results, state=state, strategy=strategy, dispatch=dispatch
        )
        dropouts += rejected
    elif stream is not None:
        aggregated, updates, metrics = _aggregate_streamed(
            state, plan, strategy, results, dropouts, stream
        )
    else:
        aggregated, updates, metrics = _aggregate_in_clear(state, plan, strategy, results, dropouts)
    next_state = strategy.apply(state, aggregated)
    examples = sum(u.num_examples for u in updates)
    for site, size in down.items():
        key = f"bytes/down/site/{site}"
        metrics[key] = metrics.get(key, 0.0) + float(size)
    metrics["bytes/down"] = sum(v for k, v in metrics.items() if k.startswith("bytes/down/site/"))
    metrics.update(
        {
            "participants": float(len(updates)),
            "selected": float(len(plan.selected)),
            "dropouts": float(len(dropouts)),
            "rejected": float(sum(d.kind is DropoutKind.INVALID for d in dropouts)),
            "train/loss": sum(u.train_loss * u.num_examples for u in updates) / max(1, examples),
            "secagg/enabled": float(plan.secure is not None),
            **aggregated.metrics,
        }
    )
    report = RoundReport(
        round=plan.round,
        selected=plan.selected,
        updates=updates,
        dropouts=dropouts,
        evaluations=evaluations,
        aggregated=aggregated,
        metrics=metrics,
        seconds=time.perf_counter() - started,
    )
    return next_state, report


def evaluate_sites(
    parameters: NDArrays, request: EvaluationRequest, dispatch: Dispatch
) -> dict[str, Metrics]:
    """A dispatch of its own for an evaluation (the last round's model); failures left out."""
    jobs = [
        SiteJob(site=site, kind=JobKind.EVALUATE, round=request.round, parameters=parameters)
        for site in request.sites
    ]
    answers = dispatch(jobs)
    return {
        site: answer.evaluation
        for site, answer in answers.items()
        if isinstance(answer, SiteResult) and answer.evaluation is not None
    }
