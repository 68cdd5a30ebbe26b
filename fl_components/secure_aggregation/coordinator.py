"""The coordinator's side of a securely aggregated round, as the round engine calls it.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482). The training jobs become ``mask`` jobs; the coordinator
receives masked, signed messages (a rejected one turns its site into a ``rejected``
dropout), asks the survivors to unmask through the same dispatch, and learns only the sum,
which the strategy turns into the round's update (:meth:`Strategy.aggregate_sum`). Below the
threshold the round aborts and the global model is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_components.compression.secure import scatter_secure_sum
from fl_components.config import FederationConfig
from fl_components.errors import RoundError
from fl_components.parameters import NDArrays
from fl_components.round.engine import Dispatch, SecureAggregation
from fl_components.round.types import (
    AggregatedUpdate,
    Dropout,
    DropoutKind,
    JobKind,
    LocalUpdate,
    MaskedContribution,
    ServerState,
    SiteJob,
    SiteResult,
)
from fl_components.secure_aggregation.protocol import (
    ProtocolError,
    Registry,
    RoundContext,
    SecAggCoordinator,
)
from fl_components.secure_aggregation.site_stages import (
    MIN_SECURE_PARTICIPANTS,
    NOISE_CLIP_TAIL,
    round_context,
    secagg_metrics,
    weight_scale,
)
from fl_components.strategies.base import Strategy

log = logging.getLogger(__name__)


def _abort(round_num: int, error: ProtocolError) -> RoundError:
    return RoundError(
        f"round {round_num}: secure aggregation aborted: {error}. The global model was left "
        "unchanged; retry the round (or run) once enough sites are back"
    )


class SecureSum(SecureAggregation):
    """Secure aggregation of one round: mask jobs out, one sum back.

    Parameters
    ----------
    config : FederationConfig
        The federation (weighting and clip range of secure aggregation).
    ctx : RoundContext
        The round's protocol context (participants, threshold, dimension, ...).
    registry : Registry
        The federation's public keys.
    """

    def __init__(self, config: FederationConfig, ctx: RoundContext, registry: Registry) -> None:
        self.config = config
        self.ctx = ctx
        self.registry = registry
        # this round's protocol state: the running masked sum, and each site received
        self._coordinator = SecAggCoordinator(ctx, registry)
        self._received: dict[str, LocalUpdate | Dropout] = {}

    @classmethod
    def for_round(
        cls,
        config: FederationConfig,
        registry: Registry,
        *,
        run_id: str,
        round_num: int,
        selected: tuple[str, ...],
        like: NDArrays,
    ) -> SecureSum:
        """The round's context from ``config.secure_aggregation``.

        Under participant-level DP the clip range is widened, where needed, so that the
        noise shares are not clipped (:func:`.site_stages.dp_clip_range`).
        """
        ctx = round_context(
            config,
            run_id=run_id,
            round_num=round_num,
            participants=selected,
            dimension=sum(int(p.size) for p in like),
        )
        if ctx.clip_range > config.secure_aggregation.clip_range:
            log.info(
                "round %d: secure_aggregation.clip_range %g widened to %.4g so that no site's "
                "DP noise share (std %.4g = z C / sqrt(t), t = %d) is clipped but with "
                "probability %g",
                round_num,
                config.secure_aggregation.clip_range,
                ctx.clip_range,
                config.privacy.client_noise_multiplier
                * config.privacy.clip_norm
                / ctx.threshold**0.5,
                ctx.threshold,
                NOISE_CLIP_TAIL,
            )
        return cls(config, ctx, registry)

    def jobs(self, jobs: Sequence[SiteJob]) -> list[SiteJob]:
        """Every training job becomes a ``mask`` job carrying the round context."""
        return [replace(job, kind=JobKind.MASK, secagg=self.ctx) for job in jobs]

    def receive(self, answer: SiteResult) -> SiteResult:
        """Verify one site's masked message and add it to the running sum, as it arrives.

        What is kept is the answer without its masked vector (metadata, bytes sent): the
        coordinator never holds more than the sum and the message in hand.
        """
        self._received[answer.site] = self._receive_one(answer)
        if isinstance(answer.masked, MaskedContribution):
            return replace(answer, masked=replace(answer.masked, payload=b""))
        return answer

    def _receive_one(self, result: SiteResult) -> LocalUpdate | Dropout:
        contribution = result.masked
        if not isinstance(contribution, MaskedContribution):
            return Dropout(result.site, DropoutKind.REJECTED, "no masked update returned")
        try:
            self._coordinator.receive(contribution.payload)
        except ProtocolError as error:  # logged by the coordinator; the round goes on
            return Dropout(result.site, DropoutKind.REJECTED, f"{type(error).__name__}: {error}")
        return contribution.report()

    def _receive(self, masked: Mapping[str, SiteResult]) -> tuple[list[LocalUpdate], list[Dropout]]:
        """Each site's outcome in ``masked`` order; those not streamed in are received now."""
        reports, dropouts = [], []
        for site, result in masked.items():
            if site not in self._received:
                self._received[site] = self._receive_one(result)
            outcome = self._received[site]
            if isinstance(outcome, Dropout):
                dropouts.append(outcome)
            else:
                reports.append(outcome)
        return reports, dropouts

    def _unflatten(
        self, flat_sum: npt.NDArray[Any], state: ServerState
    ) -> list[npt.NDArray[np.float64]]:
        """The unmasked sum in the model's shapes, random-k's values back at their places.

        Float64 until divided by the weight: a sum of many updates loses bits in float32.
        """
        ctx = self.ctx
        bounds = np.cumsum([p.size for p in state.parameters])[:-1]
        flat = scatter_secure_sum(
            flat_sum,
            config=self.config.compression,
            run_id=ctx.run_id,
            round=ctx.round,
            dimension=sum(int(p.size) for p in state.parameters),
        )
        pieces = np.split(flat, bounds)
        return [piece.reshape(p.shape) for piece, p in zip(pieces, state.parameters, strict=True)]

    def aggregate(
        self,
        masked: Mapping[str, SiteResult],
        *,
        state: ServerState,
        strategy: Strategy,
        dispatch: Dispatch,
    ) -> tuple[AggregatedUpdate, list[LocalUpdate], list[Dropout], dict[str, float]]:
        """Receive, ask the survivors to unmask, learn the sum; the strategy combines it.

        Raises
        ------
        RoundError
            When fewer than ``threshold`` sites survive or answer, or a share is wrong.
        """
        ctx = self.ctx
        coordinator = self._coordinator
        reports, dropouts = self._receive(masked)
        if len(reports) < MIN_SECURE_PARTICIPANTS:  # before anyone is asked to unmask
            raise RoundError(
                f"round {ctx.round}: secure aggregation aborted: {len(reports)} masked "
                f"update(s) survived ({', '.join(r.site for r in reports) or 'none'}); a sum of "
                f"fewer than {MIN_SECURE_PARTICIPANTS} tells each survivor the other's update, "
                "so nobody was asked to unmask. The global model was left unchanged"
            )
        try:
            requests = {site: r.to_bytes() for site, r in coordinator.unmask_requests().items()}
            answers = dispatch(
                [
                    SiteJob(
                        site=site,
                        kind=JobKind.UNMASK,
                        round=ctx.round,
                        secagg=ctx,
                        unmask_request=request,
                    )
                    for site, request in requests.items()
                ]
            )
            responses = [
                a.unmask_response
                for a in answers.values()
                if isinstance(a, SiteResult) and a.unmask_response is not None
            ]
            result = coordinator.finish(responses)
        except ProtocolError as error:  # too few, or a wrong share: never a corrupted sum
            raise _abort(ctx.round, error) from None
        total = self._unflatten(result.total, state)
        aggregated = strategy.aggregate_sum(
            total,
            weight=result.total_examples / weight_scale(self.config),
            participants=len(result.survivors),
            state=state,
        )
        metrics = secagg_metrics(result)
        metrics["secagg/unmask_failures"] = float(len(requests) - len(responses))
        metrics.update(_bytes_metrics(masked, answers, requests))
        return aggregated, reports, dropouts, metrics


def _bytes_metrics(
    masked: Mapping[str, SiteResult],
    answers: Mapping[str, Any],
    requests: Mapping[str, bytes],
) -> dict[str, float]:
    """What crossed the wire: the masked messages, the unmask responses and requests.

    Up, as sent (on the work pool, the JSON answer with its framing); down, the requests.
    """
    metrics: dict[str, float] = {}
    up = {site: r.bytes_up for site, r in masked.items() if r.masked is not None}
    for site, answer in answers.items():
        if isinstance(answer, SiteResult) and answer.unmask_response is not None:
            sent = answer.bytes_up or len(answer.unmask_response)
            up[site] = up.get(site, 0) + sent
            metrics["bytes/up/unmask"] = metrics.get("bytes/up/unmask", 0.0) + sent
    if all(up.values()):
        metrics["bytes/up"] = float(sum(up.values()))
        metrics.update({f"bytes/up/site/{site}": float(b) for site, b in up.items()})
    # the engine adds the model each survivor downloaded
    metrics.update({f"bytes/down/site/{s}": float(len(r)) for s, r in requests.items()})
    return metrics
