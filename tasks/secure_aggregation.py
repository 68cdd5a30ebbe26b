"""The coordinator's secure-aggregation round: two dispatches, one sum, one mean update.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482). The coordinator receives masked, signed messages (a
rejected one turns its site into a dropout), asks the survivors to unmask, and gets back
only the sum; below the threshold the round aborts and the global model is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components.config import FederationConfig
from fl_components.errors import RoundError
from fl_components.parameters import NDArrays
from fl_components.privacy.dp_fedavg import DPAggregate
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.secagg import AggregateResult, ProtocolError, SecAggCoordinator
from fl_components.secagg.errors import ThresholdNotMetError
from fl_components.secure_round import (
    mean_update,
    noise_fits_clip_range,
    round_context,
    secagg_metrics,
)
from tasks.participants import Dropout, ParticipantBackend, TrainingOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureRound:
    """A securely aggregated round, as the coordinator flow uses it.

    Attributes
    ----------
    outcome : TrainingOutcome
        The survivors' reports (metadata only: every ``delta`` is empty) and the dropouts,
        including sites whose masked message was rejected.
    mean_update : NDArrays
        The FedAvg (or DP-FedAvg) mean update, from the unmasked sum.
    dp_result : DPAggregate or None
        The participant-level DP record (already accounted), or None without it.
    metrics : dict[str, float]
        ``secagg/...`` metrics and the real ``bytes/up``.
    """

    outcome: TrainingOutcome
    mean_update: NDArrays
    dp_result: DPAggregate | None
    metrics: dict[str, float]


@task(name="secure_aggregate", task_run_name="secure_aggregate-r{round_num}", cache_policy=NO_CACHE)
def secure_aggregate(
    coordinator: SecAggCoordinator, responses: list[bytes], *, round_num: int
) -> AggregateResult:
    """Rebuild the masks from the survivors' responses and unmask the sum (no retries)."""
    return coordinator.finish(responses)


def _abort(round_num: int, error: ProtocolError) -> RoundError:
    return RoundError(
        f"round {round_num}: secure aggregation aborted: {error}. The global model was left "
        "unchanged; retry the round (or run) once enough sites are back"
    )


def secure_round(
    config: FederationConfig,
    backend: ParticipantBackend,
    privacy: PrivacyRounds,
    selected: tuple[str, ...],
    global_parameters: NDArrays,
    *,
    run_id: str,
    round_num: int,
) -> SecureRound:
    """Train the selected sites and aggregate their masked updates; learn only the sum.

    Raises
    ------
    RoundError
        When fewer than ``threshold`` sites survive or answer (the round aborts).
    """
    ctx = round_context(
        config,
        run_id=run_id,
        round_num=round_num,
        participants=selected,
        dimension=sum(int(p.size) for p in global_parameters),
    )
    if not noise_fits_clip_range(config, ctx.threshold):
        log.warning(
            "secure_aggregation.clip_range=%g is small for DP noise of std %g per site: "
            "noise will be clipped; raise clip_range",
            config.secure_aggregation.clip_range,
            config.privacy.client_noise_multiplier * config.privacy.clip_norm,
        )
    coordinator = SecAggCoordinator(ctx, backend.registry())
    masked = backend.train_masked(selected, global_parameters, ctx)
    dropouts = list(masked.dropouts)
    reports = []
    for contribution in masked.contributions:
        try:
            coordinator.receive(contribution.payload)
        except ProtocolError as error:  # logged by the coordinator; the round goes on
            dropouts.append(
                Dropout(site=contribution.site, reason=f"rejected: {type(error).__name__}: {error}")
            )
            continue
        reports.append(contribution.report())
    try:
        requests = coordinator.unmask_requests()
        unmasked = backend.unmask({s: r.to_bytes() for s, r in requests.items()}, ctx)
        result = secure_aggregate(
            coordinator, list(unmasked.responses.values()), round_num=round_num
        )
    except ThresholdNotMetError as error:
        raise _abort(round_num, error) from None
    except ProtocolError as error:  # a wrong share or seed: abort, never a corrupted sum
        raise _abort(round_num, error) from None
    mean = mean_update(config, result, global_parameters)
    dp_result = None
    if config.privacy.participant_level:
        dp_result = DPAggregate(
            mean_update=mean,
            clip_norm=config.privacy.clip_norm,
            noise_std=config.privacy.client_noise_multiplier * config.privacy.clip_norm,
            clipped=0,  # per-site norms stay at the sites under secure aggregation
            norms=(),
        )
        privacy.account(dp_result, participants=result.survivors)
    metrics = secagg_metrics(result)
    metrics["secagg/unmask_failures"] = float(len(unmasked.dropouts))
    return SecureRound(
        outcome=TrainingOutcome(updates=reports, dropouts=dropouts),
        mean_update=mean,
        dp_result=dp_result,
        metrics=metrics,
    )
