r"""The coordinator's side of secure aggregation: sum masked updates, then unmask the sum.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), Figure 4 (server side). The coordinator only ever holds
masked vectors and their running sum z = sum_u y_u (mod 2^32). After the unmask stage it
rebuilds each survivor's b_u from t Shamir shares and receives s_{u,v} for each dropped v
from u, and computes (Section 4, "Unmasking")

    sum_u x_u = z - sum_{u in U2} PRG(b_u) + sum_{u in U2, v in U1 \\ U2} sign(u, v) PRG(s_{u,v})

with sign(u, v) = -1 if u < v else +1 (removing what u added). Every reconstructed seed is
checked against the commitment its owner signed in stage 1, so a bad share or seed aborts
the round rather than corrupting the sum. SecAgg+ (Bell et al. 2020, CCS,
arXiv:2004.04523) restricts every sum over v to u's neighbours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fl_components.secure_aggregation.protocol import agreement, shamir
from fl_components.secure_aggregation.protocol.context import RoundContext
from fl_components.secure_aggregation.protocol.errors import (
    ContextMismatchError,
    ProtocolError,
    ReconstructionError,
    ThresholdNotMetError,
)
from fl_components.secure_aggregation.protocol.keys import Registry
from fl_components.secure_aggregation.protocol.messages import (
    MaskedUpdate,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_components.secure_aggregation.protocol.prg import MaskExpander

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggStats:
    """What one round of secure aggregation cost, for tracking.

    Attributes
    ----------
    survivors, dropouts_recovered : int
        Updates summed; selected sites that dropped and whose masks were removed.
    responses, rejected_messages : int
        Valid unmask responses used; messages rejected (bad signature, context, ...).
    mask_seconds_max : float
        Slowest participant's reported quantize + mask time.
    receive_seconds, unmask_seconds : float
        Coordinator time verifying and summing; rebuilding seeds and removing masks.
    bytes_up : int
        Bytes of masked updates received (serialized).
    expansion_factor : float
        ``bytes_up`` over the 4-byte-per-parameter plaintext of the same updates.
    """

    survivors: int
    dropouts_recovered: int
    responses: int
    rejected_messages: int
    mask_seconds_max: float
    receive_seconds: float
    unmask_seconds: float
    bytes_up: int
    expansion_factor: float


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The unmasked sum of the survivors' updates.

    Attributes
    ----------
    total : numpy.ndarray of float64, shape (d,)
        Sum of the survivors' (clipped, quantized) updates.
    count : int
        Number of updates summed.
    total_examples : int
        Sum of the survivors' ``num_examples``.
    survivors, dropped : tuple[str, ...]
        Who was summed; who dropped out after selection.
    error_bound : float
        Per-coordinate bound of ``|total - exact float sum of clipped updates|``.
    stats : SecAggStats
        Costs, for tracking.
    """

    total: npt.NDArray[np.float64]
    count: int
    total_examples: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    error_bound: float
    stats: SecAggStats

    def mean(self) -> npt.NDArray[np.float64]:
        """The unweighted mean of the summed updates."""
        return self.total / self.count


class SecAggCoordinator:
    """The coordinator for one round.

    Parameters
    ----------
    ctx : RoundContext
        The round.
    registry : Registry
        Public keys used to verify every message.
    """

    def __init__(self, ctx: RoundContext, registry: Registry) -> None:
        self.ctx = ctx
        self._registry = registry
        self._sum: npt.NDArray[np.uint32] = np.zeros(ctx.dimension, dtype=np.uint32)
        self._received: dict[str, MaskedUpdate] = {}
        self._requested: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._rejected = 0
        self._bytes_up = 0
        self._receive_seconds = 0.0

    def _reject(self, error: ProtocolError) -> ProtocolError:
        self._rejected += 1
        logger.warning(
            "secagg run %r round %d: rejected message: %s", self.ctx.run_id, self.ctx.round, error
        )
        return error

    def _check_binding(self, run_id: str, round: int, sender: str, what: str) -> None:
        if (run_id, round) != (self.ctx.run_id, self.ctx.round):
            raise ContextMismatchError(
                f"{what} from {sender!r} is for run {run_id!r} round {round}, not run "
                f"{self.ctx.run_id!r} round {self.ctx.round}; discarded (stale or replayed)"
            )
        if sender not in self.ctx.participants:
            raise ContextMismatchError(
                f"{what} from {sender!r}, which is not selected for round {self.ctx.round}"
            )

    # -- stage 1 ------------------------------------------------------------------------
    def receive(self, message: MaskedUpdate | bytes | bytearray | memoryview) -> None:
        """Verify one masked update and add it to the running sum.

        Raises
        ------
        ProtocolError
            (logged) for malformed bytes, an unknown site, a bad signature, another run or
            round, a duplicate, a wrong vector length or a wrong set of shares. The message
            is not summed; the round goes on.
        """
        started = time.perf_counter()
        try:
            if isinstance(message, bytes | bytearray | memoryview):
                size = len(message)
                message = MaskedUpdate.from_bytes(bytes(message))
            else:
                size = len(message.to_bytes())
            self._validate(message)
        except ProtocolError as error:
            raise self._reject(error) from None
        np.add(self._sum, message.masked, out=self._sum)
        # Keep the metadata (shares, commitments); drop our reference to the vector.
        self._received[message.sender] = _without_vector(message)
        self._bytes_up += size
        self._receive_seconds += time.perf_counter() - started

    def _validate(self, message: MaskedUpdate) -> None:
        ctx = self.ctx
        if self._requested is not None:
            raise ContextMismatchError(
                f"masked update from {message.sender!r} arrived after unmask requests were "
                "sent; too late for this round"
            )
        self._registry[message.sender].verify(
            message.signature, message.signed_digest(), site=message.sender
        )
        self._check_binding(message.run_id, message.round, message.sender, "masked update")
        if message.sender in self._received:
            raise ContextMismatchError(f"second masked update from {message.sender!r}; discarded")
        if message.masked.dtype != np.uint32 or message.masked.shape != (ctx.dimension,):
            raise ContextMismatchError(
                f"masked update from {message.sender!r} has shape {message.masked.shape} "
                f"({message.masked.dtype}); round {ctx.round} expects ({ctx.dimension},) uint32"
            )
        if message.field_bits != ctx.field_bits or (
            ctx.field_bits < 32 and ctx.dimension and int(message.masked.max()) > ctx.field_mask
        ):
            raise ContextMismatchError(
                f"masked update from {message.sender!r} is in Z_2^{message.field_bits}; round "
                f"{ctx.round} works in Z_2^{ctx.field_bits} (site and coordinator disagree on "
                "compression.bits)"
            )
        holders = set(ctx.share_holders(message.sender))
        if set(message.shares) != holders:
            raise ContextMismatchError(
                f"masked update from {message.sender!r} carries shares for "
                f"{sorted(message.shares)}, expected exactly {sorted(holders)}"
            )
        if set(message.pairwise_commitments) != set(ctx.neighbours_of(message.sender)):
            raise ContextMismatchError(
                f"masked update from {message.sender!r} commits to the wrong set of neighbours"
            )

    # -- stage 2 ------------------------------------------------------------------------
    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """Close stage 1 and build one unmask request per survivor.

        Returns
        -------
        dict[str, UnmaskRequest]
            survivor -> its request (survivors, dropped, the ciphertexts addressed to it).

        Raises
        ------
        ThresholdNotMetError
            If fewer than ``threshold`` masked updates arrived; the round must abort.
        """
        survivors = tuple(sorted(self._received))
        dropped = tuple(p for p in self.ctx.participants if p not in self._received)
        if len(survivors) < self.ctx.threshold:
            raise ThresholdNotMetError(
                f"run {self.ctx.run_id!r} round {self.ctx.round}: {len(survivors)} of "
                f"{self.ctx.n} masked updates arrived, below threshold {self.ctx.threshold}; "
                "abort the round (the global model is unchanged) and retry it"
            )
        self._requested = (survivors, dropped)
        return {
            receiver: UnmaskRequest(
                run_id=self.ctx.run_id,
                round=self.ctx.round,
                receiver=receiver,
                survivors=survivors,
                dropped=dropped,
                ciphertexts={
                    sender: self._received[sender].shares[receiver]
                    for sender in survivors
                    if receiver in self._received[sender].shares
                },
            )
            for receiver in survivors
        }

    def finish(self, responses: Iterable[UnmaskResponse | bytes]) -> AggregateResult:
        """Rebuild the masks from the responses, remove them and dequantize the sum.

        Invalid responses are logged and skipped. Nothing is returned unless every mask
        can be removed and checked.

        Raises
        ------
        ThresholdNotMetError
            Fewer than ``threshold`` valid responses, too few shares of some survivor's
            seed, or a survivor that masked with a dropped site did not respond.
        ReconstructionError
            A rebuilt seed does not match its owner's signed commitment.
        """
        if self._requested is None:
            raise ContextMismatchError("call unmask_requests() before finish()")
        started = time.perf_counter()
        survivors, dropped = self._requested
        valid = self._verified_responses(responses, survivors)
        where = f"run {self.ctx.run_id!r} round {self.ctx.round}"
        if len(valid) < self.ctx.threshold:
            raise ThresholdNotMetError(
                f"{where}: {len(valid)} of {len(survivors)} survivors sent a valid unmask "
                f"response, below threshold {self.ctx.threshold}; abort the round (the global "
                "model is unchanged) and retry it"
            )
        self_seeds = self._rebuild_self_seeds(valid, survivors)
        add, subtract = self._dropout_seeds(valid, survivors, dropped)
        total = self._sum.copy()
        MaskExpander().apply(total, add=add, subtract=list(self_seeds) + subtract)
        if self.ctx.field_bits < 32:  # 2^m divides 2^32: reducing now leaves the sum in Z_2^m
            np.bitwise_and(total, np.uint32(self.ctx.field_mask), out=total)
        quantizer = self.ctx.quantizer
        result_total = quantizer.dequantize_sum(total, count=len(survivors))
        unmask_seconds = time.perf_counter() - started
        stats = self._stats(survivors, dropped, responses=len(valid), unmask_seconds=unmask_seconds)
        logger.info(
            "secagg %s: summed %d updates, recovered %d dropouts, unmasked in %.3fs",
            where,
            len(survivors),
            len(dropped),
            unmask_seconds,
        )
        return AggregateResult(
            total=result_total,
            count=len(survivors),
            total_examples=sum(self._received[s].num_examples for s in survivors),
            survivors=survivors,
            dropped=dropped,
            error_bound=quantizer.error_bound(len(survivors)),
            stats=stats,
        )

    def _stats(
        self,
        survivors: tuple[str, ...],
        dropped: tuple[str, ...],
        *,
        responses: int,
        unmask_seconds: float,
    ) -> SecAggStats:
        """The round's costs: timings, bytes received and their expansion over plaintext."""
        plaintext_bytes = 4 * self.ctx.dimension * len(survivors)
        return SecAggStats(
            survivors=len(survivors),
            dropouts_recovered=len(dropped),
            responses=responses,
            rejected_messages=self._rejected,
            mask_seconds_max=max(m.mask_seconds for m in self._received.values()),
            receive_seconds=self._receive_seconds,
            unmask_seconds=unmask_seconds,
            bytes_up=self._bytes_up,
            expansion_factor=self._bytes_up / plaintext_bytes if self._bytes_up else 0.0,
        )

    def _verified_responses(
        self, responses: Iterable[UnmaskResponse | bytes], survivors: tuple[str, ...]
    ) -> dict[str, UnmaskResponse]:
        valid: dict[str, UnmaskResponse] = {}
        for item in responses:
            try:
                response = (
                    UnmaskResponse.from_bytes(bytes(item))
                    if isinstance(item, bytes | bytearray | memoryview)
                    else item
                )
                self._registry[response.sender].verify(
                    response.signature, response.signed_payload(), site=response.sender
                )
                self._check_binding(
                    response.run_id, response.round, response.sender, "unmask response"
                )
                if response.sender not in survivors or response.sender in valid:
                    raise ContextMismatchError(
                        f"unmask response from {response.sender!r}, which is not an "
                        "unanswered survivor; discarded"
                    )
            except ProtocolError as error:
                self._reject(error)
                continue
            valid[response.sender] = response
        return valid

    def _rebuild_self_seeds(
        self, valid: Mapping[str, UnmaskResponse], survivors: tuple[str, ...]
    ) -> list[bytes]:
        t = self.ctx.threshold
        coefficients: dict[tuple[int, ...], list[int]] = {}
        seeds = []
        for owner in survivors:
            holders = [
                h
                for h in self.ctx.share_holders(owner)
                if h in valid and owner in valid[h].self_mask_shares
            ]
            if len(holders) < t:
                raise ThresholdNotMetError(
                    f"only {len(holders)} shares of {owner!r}'s self-mask seed came back, below "
                    f"threshold {t}; abort the round and retry it"
                )
            chosen = holders[:t]
            xs = tuple(self.ctx.share_index(h) for h in chosen)
            if xs not in coefficients:  # one Lagrange basis for every owner with the same xs
                coefficients[xs] = shamir.lagrange_at_zero(xs)
            seed = shamir.combine(
                [valid[h].self_mask_shares[owner] for h in chosen], coefficients[xs]
            )
            expected = self._received[owner].self_mask_commitment
            commit = agreement.commitment(
                seed, run_id=self.ctx.run_id, round=self.ctx.round, owner=owner
            )
            if commit != expected:
                raise ReconstructionError(
                    f"self-mask seed of {owner!r} rebuilt from the shares of {chosen} does not "
                    "match its signed commitment: a share holder sent a wrong share; abort"
                )
            seeds.append(seed)
        return seeds

    def _dropout_seeds(
        self,
        valid: Mapping[str, UnmaskResponse],
        survivors: tuple[str, ...],
        dropped: tuple[str, ...],
    ) -> tuple[list[bytes], list[bytes]]:
        """Seeds to add back (survivor u > dropped v subtracted them) and to subtract."""
        add: list[bytes] = []
        subtract: list[bytes] = []
        survivor_set = set(survivors)
        for gone in dropped:
            for u in sorted(self.ctx.neighbours_of(gone) & survivor_set):
                seed = valid[u].pairwise_seeds.get(gone) if u in valid else None
                if seed is None:
                    raise ThresholdNotMetError(
                        f"survivor {u!r} masked with dropped site {gone!r} but did not return "
                        "their pairwise seed; that mask cannot be removed: abort and retry"
                    )
                commit = agreement.commitment(
                    seed,
                    run_id=self.ctx.run_id,
                    round=self.ctx.round,
                    owner=min(u, gone),
                    peer=max(u, gone),
                )
                if commit != self._received[u].pairwise_commitments[gone]:
                    raise ReconstructionError(
                        f"pairwise seed of ({u!r}, {gone!r}) from {u!r} does not match its "
                        "signed commitment; abort"
                    )
                (subtract if agreement.mask_sign(u, gone) > 0 else add).append(seed)
        return add, subtract


def _without_vector(message: MaskedUpdate) -> MaskedUpdate:
    """The message's metadata with an empty vector (the coordinator keeps only the sum)."""
    return MaskedUpdate(  # no _wire_digest: the metadata copy is never re-verified
        run_id=message.run_id,
        round=message.round,
        sender=message.sender,
        num_examples=message.num_examples,
        masked=np.zeros(0, dtype=np.uint32),
        shares=message.shares,
        self_mask_commitment=message.self_mask_commitment,
        pairwise_commitments=message.pairwise_commitments,
        mask_seconds=message.mask_seconds,
        signature=message.signature,
        field_bits=message.field_bits,
    )
