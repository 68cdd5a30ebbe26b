"""The participant's side of secure aggregation: mask an update, then help unmask the sum.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), Figure 4 (client side), in two stages:

1. :meth:`SecAggParticipant.mask_update` (ShareKeys + MaskedInputCollection):
   y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_{u,v}) - sum_{v < u} PRG(s_{u,v})  (mod 2^32),
   with b_u Shamir-shared t-of-n and each share AES-GCM-encrypted to its holder.
2. :meth:`SecAggParticipant.unmask_response` (Unmasking): shares of b_v for survivors v,
   the seed s_{u,v} for dropped v, never both for the same v ("an honest user never reveals
   both", Section 4).

With ``RoundContext.neighbours`` = k, masks and shares use only the k neighbours of the
SecAgg+ graph (Bell et al. 2020, CCS, arXiv:2004.04523).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fl_components.secure_aggregation.protocol import agreement, shamir
from fl_components.secure_aggregation.protocol.context import RoundContext
from fl_components.secure_aggregation.protocol.errors import (
    ContextMismatchError,
    ShareDecryptionError,
    UnsafeRequestError,
)
from fl_components.secure_aggregation.protocol.keys import Registry, SiteKeys
from fl_components.secure_aggregation.protocol.messages import (
    MaskedUpdate,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_components.secure_aggregation.protocol.prg import MaskExpander

logger = logging.getLogger(__name__)

_SHARE_PLAINTEXT = 4 + shamir.SECRET_BYTES  # x (u32) || y (32 bytes)


@dataclass
class _RoundView:
    """What this participant has been told about a round's dropouts (never forgets)."""

    survivors: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)


class SecAggParticipant:
    """One site's side of the protocol.

    Parameters
    ----------
    site : str
        This site's name, as in the registry.
    keys : SiteKeys
        This site's long-term private keys.
    registry : Registry
        Public keys of every site.
    rng : numpy.random.Generator or None
        Source of the stochastic-rounding noise only (never of masks or seeds, which come
        from the OS CSPRNG). None draws a generator seeded by ``secrets``.
    state_dir : path or None
        Where to persist what each round's unmask requests said, so that a participant
        answering stage 2 in another process still refuses to reveal both kinds of share.
        None keeps that memory in this object only.
    """

    def __init__(
        self,
        site: str,
        keys: SiteKeys,
        registry: Registry,
        *,
        rng: np.random.Generator | None = None,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if registry[site] != keys.public():
            raise ContextMismatchError(
                f"the registry's public keys for site {site!r} do not match the keys given; "
                "load this site's own keys or update the registry"
            )
        self.site = site
        self._keys = keys
        self._registry = registry
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._views: dict[tuple[str, int], _RoundView] = {}
        self._shared: dict[str, bytes] = {}
        self._expander = MaskExpander()

    # -- key material -------------------------------------------------------------------
    def _shared_secret(self, peer: str) -> bytes:
        if peer not in self._shared:
            self._shared[peer] = self._keys.exchange(self._registry[peer])
        return self._shared[peer]

    def _pairwise_seed(self, ctx: RoundContext, peer: str) -> bytes:
        return agreement.pairwise_seed(
            self._shared_secret(peer), run_id=ctx.run_id, round=ctx.round, u=self.site, v=peer
        )

    def _share_key(self, ctx: RoundContext, peer: str) -> bytes:
        return agreement.share_key(
            self._shared_secret(peer), run_id=ctx.run_id, round=ctx.round, u=self.site, v=peer
        )

    def _check_member(self, ctx: RoundContext) -> None:
        if self.site not in ctx.participants:
            raise ContextMismatchError(
                f"site {self.site!r} is not selected for run {ctx.run_id!r} round {ctx.round}"
            )

    # -- stage 1 ------------------------------------------------------------------------
    def mask_update(
        self, ctx: RoundContext, update: npt.NDArray[np.floating], *, num_examples: int = 1
    ) -> MaskedUpdate:
        """Quantize, mask and sign ``update``; share the self-mask seed.

        Parameters
        ----------
        ctx : RoundContext
            The round.
        update : numpy.ndarray of float, shape (d,)
            The model delta, already clipped / noised by DP upstream.
        num_examples : int
            Sent in the clear for weighting.

        Returns
        -------
        MaskedUpdate
            Signed; send ``.to_bytes()`` to the coordinator.
        """
        self._check_member(ctx)
        started = time.perf_counter()
        values = np.asarray(update).reshape(-1)
        if values.shape[0] != ctx.dimension:
            raise ContextMismatchError(
                f"site {self.site!r}: update has {values.shape[0]} values but round "
                f"{ctx.round} expects dimension {ctx.dimension}; flatten the model delta"
            )
        masked = ctx.quantizer.quantize(values, rng=self._rng)
        self_seed = shamir.random_secret()
        peers = sorted(ctx.neighbours_of(self.site))
        seeds = {peer: self._pairwise_seed(ctx, peer) for peer in peers}
        self._expander.apply(
            masked,
            add=[self_seed] + [seeds[p] for p in peers if agreement.mask_sign(self.site, p) > 0],
            subtract=[seeds[p] for p in peers if agreement.mask_sign(self.site, p) < 0],
        )
        if ctx.field_bits < 32:  # y mod 2^m: the low m bits of a uniform mask are uniform
            np.bitwise_and(masked, np.uint32(ctx.field_mask), out=masked)
        encrypted = self._encrypted_shares(ctx, self_seed)
        message = MaskedUpdate(
            run_id=ctx.run_id,
            round=ctx.round,
            sender=self.site,
            num_examples=int(num_examples),
            masked=masked,
            shares=encrypted,
            self_mask_commitment=agreement.commitment(
                self_seed, run_id=ctx.run_id, round=ctx.round, owner=self.site
            ),
            pairwise_commitments=self._pairwise_commitments(ctx, seeds),
            mask_seconds=time.perf_counter() - started,
            field_bits=ctx.field_bits,
        )
        return message.with_signature(self._keys.sign(message.signed_digest()))

    def _encrypted_shares(self, ctx: RoundContext, self_seed: bytes) -> dict[str, bytes]:
        """Shamir shares of the self-mask seed, each sealed for its holder."""
        holders = ctx.share_holders(self.site)
        shares = shamir.split(
            self_seed, threshold=ctx.threshold, xs=[ctx.share_index(h) for h in holders]
        )
        return {
            holder: agreement.encrypt_share(
                self._share_key(ctx, holder),
                share.x.to_bytes(4, "big") + share.y.to_bytes(shamir.SECRET_BYTES, "big"),
                associated_data=agreement.share_associated_data(
                    run_id=ctx.run_id, round=ctx.round, sender=self.site, receiver=holder
                ),
            )
            for holder, share in zip(holders, shares, strict=True)
        }

    def _pairwise_commitments(self, ctx: RoundContext, seeds: dict[str, bytes]) -> dict[str, bytes]:
        """A commitment to each pairwise seed, named by the pair in sorted order."""
        return {
            peer: agreement.commitment(
                seed,
                run_id=ctx.run_id,
                round=ctx.round,
                owner=min(self.site, peer),
                peer=max(self.site, peer),
            )
            for peer, seed in seeds.items()
        }

    # -- stage 2 ------------------------------------------------------------------------
    def unmask_response(self, ctx: RoundContext, request: UnmaskRequest) -> UnmaskResponse:
        """Answer the coordinator's unmask request, refusing anything unsafe.

        Raises
        ------
        UnsafeRequestError
            If the request lists this site as dropped, lists a site both as survivor and
            dropped, contradicts an earlier request of the same round, names fewer than
            ``threshold`` survivors, or does not partition the round's participants.
        ShareDecryptionError
            If a ciphertext fails authentication (tampered, replayed, misrouted).
        ContextMismatchError
            If the request is for another run, round or site.
        """
        self._check_member(ctx)
        if (request.run_id, request.round, request.receiver) != (ctx.run_id, ctx.round, self.site):
            raise ContextMismatchError(
                f"site {self.site!r} got an unmask request for run {request.run_id!r} round "
                f"{request.round} receiver {request.receiver!r}, but is in run {ctx.run_id!r} "
                f"round {ctx.round}; the coordinator mixed up rounds"
            )
        survivors, dropped = set(request.survivors), set(request.dropped)
        self._check_request(ctx, survivors, dropped)
        self._remember(ctx, survivors, dropped)

        my_x = ctx.share_index(self.site)
        b_shares: dict[str, int] = {}
        for sender, blob in sorted(request.ciphertexts.items()):
            if sender not in survivors or self.site not in ctx.share_holders(sender):
                raise UnsafeRequestError(
                    f"site {self.site!r}: request carries a share from {sender!r}, which is not "
                    "a surviving neighbour; refusing"
                )
            plaintext = agreement.decrypt_share(
                self._share_key(ctx, sender),
                blob,
                associated_data=agreement.share_associated_data(
                    run_id=ctx.run_id, round=ctx.round, sender=sender, receiver=self.site
                ),
                sender=sender,
            )
            if len(plaintext) != _SHARE_PLAINTEXT or int.from_bytes(plaintext[:4]) != my_x:
                raise ShareDecryptionError(
                    f"share from {sender!r} is not addressed to x={my_x}; discarded"
                )
            b_shares[sender] = int.from_bytes(plaintext[4:], "big")
        seeds = {
            peer: self._pairwise_seed(ctx, peer)
            for peer in sorted(dropped & ctx.neighbours_of(self.site))
        }
        response = UnmaskResponse(
            run_id=ctx.run_id,
            round=ctx.round,
            sender=self.site,
            self_mask_shares=b_shares,
            pairwise_seeds=seeds,
        )
        return response.with_signature(self._keys.sign(response.signed_payload()))

    def _check_request(self, ctx: RoundContext, survivors: set[str], dropped: set[str]) -> None:
        where = f"site {self.site!r}, run {ctx.run_id!r} round {ctx.round}"
        if self.site in dropped or self.site not in survivors:
            raise UnsafeRequestError(
                f"{where}: the request lists this site as dropped, but it sent its update; "
                "refusing (a coordinator must not learn both masks of one site)"
            )
        if both := survivors & dropped:
            raise UnsafeRequestError(
                f"{where}: sites {sorted(both)} are listed as both survivor and dropped; refusing"
            )
        if survivors | dropped != set(ctx.participants):
            raise UnsafeRequestError(
                f"{where}: survivors and dropped must partition the round's participants "
                f"(missing {sorted(set(ctx.participants) - survivors - dropped)}, "
                f"unknown {sorted((survivors | dropped) - set(ctx.participants))}); refusing"
            )
        if len(survivors) < ctx.threshold:
            raise UnsafeRequestError(
                f"{where}: only {len(survivors)} survivors listed, below threshold "
                f"{ctx.threshold}; refusing (the round must abort)"
            )
        view = self._load_view(ctx)
        if flipped := (dropped & view.survivors) | (survivors & view.dropped):
            raise UnsafeRequestError(
                f"{where}: this request contradicts an earlier one about {sorted(flipped)} "
                "(survivor vs dropped); refusing to reveal both kinds of share"
            )

    # -- per-round memory ---------------------------------------------------------------
    def _state_file(self, ctx: RoundContext) -> Path | None:
        if self._state_dir is None:
            return None
        key = hashlib.sha256(f"{ctx.run_id}\x00{ctx.round}".encode()).hexdigest()[:32]
        return self._state_dir / f"secagg-round-{key}.json"

    def _load_view(self, ctx: RoundContext) -> _RoundView:
        index = (ctx.run_id, ctx.round)
        if index not in self._views:
            path = self._state_file(ctx)
            view = _RoundView()
            if path is not None and path.is_file():
                data = json.loads(path.read_text())
                view = _RoundView(survivors=set(data["survivors"]), dropped=set(data["dropped"]))
            self._views[index] = view
        return self._views[index]

    def _remember(self, ctx: RoundContext, survivors: set[str], dropped: set[str]) -> None:
        view = self._load_view(ctx)
        view.survivors |= survivors
        view.dropped |= dropped
        path = self._state_file(ctx)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"survivors": sorted(view.survivors), "dropped": sorted(view.dropped)})
            )
            tmp.replace(path)
