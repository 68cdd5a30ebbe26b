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

import numpy as np

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
    noise_fits_clip_range,
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
        """The round's context from ``config.secure_aggregation`` (warns on a tight range)."""
        ctx = round_context(
            config,
            run_id=run_id,
            round_num=round_num,
            participants=selected,
            dimension=sum(int(p.size) for p in like),
        )
        if not noise_fits_clip_range(config, ctx.threshold):
            log.warning(
                "secure_aggregation.clip_range=%g is small for DP noise of std %g per site: "
                "noise will be clipped; raise clip_range",
                config.secure_aggregation.clip_range,
                config.privacy.client_noise_multiplier * config.privacy.clip_norm,
            )
        return cls(config, ctx, registry)

    def jobs(self, jobs: Sequence[SiteJob]) -> list[SiteJob]:
        """Every training job becomes a ``mask`` job carrying the round context."""
        return [replace(job, kind=JobKind.MASK, secagg=self.ctx) for job in jobs]

    def _receive(
        self, coordinator: SecAggCoordinator, masked: Mapping[str, SiteResult]
    ) -> tuple[list[LocalUpdate], list[Dropout]]:
        reports, dropouts = [], []
        for site, result in masked.items():
            contribution = result.masked
            if not isinstance(contribution, MaskedContribution):
                dropouts.append(Dropout(site, DropoutKind.REJECTED, "no masked update returned"))
                continue
            try:
                coordinator.receive(contribution.payload)
            except ProtocolError as error:  # logged by the coordinator; the round goes on
                kind = f"{type(error).__name__}: {error}"
                dropouts.append(Dropout(site, DropoutKind.REJECTED, kind))
                continue
            reports.append(contribution.report())
        return reports, dropouts

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
        coordinator = SecAggCoordinator(ctx, self.registry)
        reports, dropouts = self._receive(coordinator, masked)
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
        # float64 until divided by the weight (a sum of many updates loses bits in float32)
        bounds = np.cumsum([p.size for p in state.parameters])[:-1]
        flat = scatter_secure_sum(  # random-k: the k unmasked values back at their places
            result.total,
            config=self.config.compression,
            run_id=ctx.run_id,
            round=ctx.round,
            dimension=sum(int(p.size) for p in state.parameters),
        )
        pieces = np.split(flat, bounds)
        total = [piece.reshape(p.shape) for piece, p in zip(pieces, state.parameters, strict=True)]
        aggregated = strategy.aggregate_sum(
            total,
            weight=result.total_examples / weight_scale(self.config),
            participants=len(result.survivors),
            state=state,
        )
        metrics = secagg_metrics(result)
        metrics["secagg/unmask_failures"] = float(len(requests) - len(responses))
        # what crossed the wire up: each masked message and each unmask response, as sent
        # (on the work pool, the JSON answer with its framing)
        up = {site: r.bytes_up for site, r in masked.items() if r.masked is not None}
        for site, answer in answers.items():
            if isinstance(answer, SiteResult) and answer.unmask_response is not None:
                sent = answer.bytes_up or len(answer.unmask_response)
                up[site] = up.get(site, 0) + sent
                metrics["bytes/up/unmask"] = metrics.get("bytes/up/unmask", 0.0) + sent
        if all(up.values()):
            metrics["bytes/up"] = float(sum(up.values()))
            metrics.update({f"bytes/up/site/{site}": float(b) for site, b in up.items()})
        # the unmask requests went down to the survivors (the engine adds their model)
        metrics.update({f"bytes/down/site/{s}": float(len(r)) for s, r in requests.items()})
        return aggregated, reports, dropouts, metrics
