"""A small in-memory federation for the secure-aggregation tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from fl_components.secure_aggregation.protocol import (
    AggregateResult,
    Registry,
    RoundContext,
    SecAggCoordinator,
    SecAggParticipant,
    SiteKeys,
)
from fl_components.secure_aggregation.protocol.quantize import FIELD_BITS, headroom_bits


@cache
def site_keys(name: str) -> SiteKeys:
    """Keys are cached by name so hypothesis examples do not pay for key generation."""
    return SiteKeys.generate()


@dataclass
class Federation:
    sites: tuple[str, ...]
    registry: Registry
    participants: dict[str, SecAggParticipant] = field(default_factory=dict)

    @classmethod
    def make(cls, n: int, *, seed: int = 0) -> Federation:
        sites = tuple(f"site-{i:03d}" for i in range(n))
        registry = Registry({s: site_keys(s).public() for s in sites})
        federation = cls(sites=sites, registry=registry)
        for i, s in enumerate(sites):
            federation.participants[s] = SecAggParticipant(
                s, site_keys(s), registry, rng=np.random.default_rng(seed + i)
            )
        return federation

    def context(
        self,
        *,
        dimension: int,
        threshold: int | None = None,
        clip_range: float = 1.0,
        run_id: str = "run-1",
        round: int = 1,
        neighbours: int | None = None,
        bits: int | None = None,
        compressed_bits: int | None = None,
    ) -> RoundContext:
        """``compressed_bits`` = b packs values in Z_2^(b + ceil(log2 n)) (compression on)."""
        if compressed_bits is not None:
            bits = compressed_bits
        field_bits = (
            FIELD_BITS
            if compressed_bits is None
            else min(FIELD_BITS, compressed_bits + headroom_bits(len(self.sites)))
        )
        return RoundContext(
            run_id=run_id,
            round=round,
            participants=self.sites,
            threshold=threshold if threshold is not None else len(self.sites) // 2 + 1,
            dimension=dimension,
            clip_range=clip_range,
            neighbours=neighbours,
            bits=bits,
            field_bits=field_bits,
        )

    def run_round(
        self,
        ctx: RoundContext,
        updates: dict[str, np.ndarray],
        *,
        drop_before_mask: Iterable[str] = (),
        drop_before_unmask: Iterable[str] = (),
        coordinator: SecAggCoordinator | None = None,
        wire: bool = True,
    ) -> AggregateResult:
        """Run both stages; sites in ``drop_before_*`` vanish at that point."""
        coordinator = coordinator or SecAggCoordinator(ctx, self.registry)
        gone = set(drop_before_mask)
        for site in ctx.participants:
            if site in gone:
                continue
            message = self.participants[site].mask_update(ctx, updates[site])
            coordinator.receive(message.to_bytes() if wire else message)
        requests = coordinator.unmask_requests()
        late = set(drop_before_unmask)
        responses = [
            self.participants[site].unmask_response(ctx, request)
            for site, request in requests.items()
            if site not in late
        ]
        return coordinator.finish([r.to_bytes() for r in responses] if wire else responses)


def random_updates(
    sites: Sequence[str], dimension: int, *, seed: int, scale: float = 1.0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.uniform(-scale, scale, dimension) for s in sites}


def clipped_sum(updates: dict[str, np.ndarray], sites: Iterable[str], clip: float) -> np.ndarray:
    return sum(np.clip(updates[s], -clip, clip) for s in sites)
