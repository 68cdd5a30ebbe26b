"""The public parameters of one secure-aggregation round.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482): the participant set U, threshold t and vector length are
public. SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS, arXiv:2004.04523) adds a public, per-round random neighbour graph of degree
k, derived here from ``run_id`` and ``round`` so every party computes the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from fl_components.secure_aggregation.protocol.errors import ContextMismatchError
from fl_components.secure_aggregation.protocol.graph import neighbour_graph, ring_degree
from fl_components.secure_aggregation.protocol.quantize import FIELD_BITS, Quantizer


@dataclass(frozen=True)
class RoundContext:
    """Everything every party must agree on for one round.

    Attributes
    ----------
    run_id : str
        The training run (binds seeds and share encryption to it; no cross-run replay).
    round : int
        Round number (binds likewise; no cross-round replay).
    participants : tuple[str, ...]
        The sites selected for the round, sorted; stored sorted whatever order is given.
    threshold : int
        t: the minimum number of survivors and of unmask responses. With ``neighbours``
        set, t applies within each site's neighbourhood (at most k + 1 shares exist).
    dimension : int
        d: length of the update vector.
    clip_range : float
        Updates are clipped to [-clip_range, clip_range] before quantization.
    neighbours : int or None
        k for SecAgg+ (a k-regular neighbour graph); None masks with every other participant
        (full Bonawitz graph).
    bits : int or None
        Fixed-point bits per value; None picks the most that cannot overflow the sum of n
        values in Z_2^field_bits, i.e. ``field_bits - ceil(log2 n)``.
    field_bits : int
        m: masked values live in Z_2^m and travel packed in m bits each. 32 (the default)
        is the uncompressed protocol; compression sets ``bits + ceil(log2 n)``.
    """

    run_id: str
    round: int
    participants: tuple[str, ...]
    threshold: int
    dimension: int
    clip_range: float
    neighbours: int | None = None
    bits: int | None = None
    field_bits: int = FIELD_BITS
    _graph: dict[str, frozenset[str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.participants))
        object.__setattr__(self, "participants", ordered)
        n = len(ordered)
        if len(set(ordered)) != n:
            raise ContextMismatchError(f"participants contain duplicates: {list(ordered)}")
        if n < 2:
            raise ContextMismatchError(
                f"secure aggregation needs at least 2 participants (got {n}); "
                "select more sites or disable secure_aggregation"
            )
        if self.neighbours is not None and self.neighbours < 1:
            raise ContextMismatchError(
                f"secure_aggregation.neighbours must be >= 1 or null (got {self.neighbours})"
            )
        group = self.group_size
        if not 1 <= self.threshold <= group:
            raise ContextMismatchError(
                f"secure_aggregation.threshold must be in [1, {group}] for {n} participants "
                f"and neighbours={self.neighbours} (got {self.threshold})"
            )
        if self.dimension < 1:
            raise ContextMismatchError(f"dimension must be >= 1 (got {self.dimension})")
        if self.round < 0:
            raise ContextMismatchError(f"round must be >= 0 (got {self.round})")
        if not 2 <= self.field_bits <= FIELD_BITS:
            raise ContextMismatchError(
                f"field_bits must be in [2, {FIELD_BITS}] (got {self.field_bits})"
            )
        # Validates clip_range and bits against n with a precise message.
        _ = self.quantizer

    @property
    def n(self) -> int:
        """Number of participants."""
        return len(self.participants)

    @property
    def full_graph(self) -> bool:
        """True when every participant masks with every other (plain Bonawitz)."""
        return self.neighbours is None or ring_degree(self.neighbours) >= self.n - 1

    @property
    def group_size(self) -> int:
        """How many sites hold a share of one participant's self-mask seed (itself included)."""
        if self.full_graph:
            return self.n
        return len(self.neighbours_of(self.participants[0])) + 1

    @cached_property
    def quantizer(self) -> Quantizer:
        """The fixed-point quantizer for this round's n, clip range and bits."""
        return Quantizer.for_sum(
            n=self.n, clip_range=self.clip_range, bits=self.bits, field_bits=self.field_bits
        )

    @property
    def field_mask(self) -> int:
        """``2^field_bits - 1``: reduces a uint32 mod 2^field_bits."""
        return (1 << self.field_bits) - 1

    def neighbours_of(self, site: str) -> frozenset[str]:
        """Return the sites ``site`` exchanges masks and shares with (excluding itself)."""
        if site not in self.participants:
            raise ContextMismatchError(
                f"site {site!r} is not a participant of run {self.run_id!r} round {self.round}"
            )
        if self.full_graph:
            return frozenset(p for p in self.participants if p != site)
        if not self._graph:
            self._graph.update(
                neighbour_graph(
                    self.participants, k=self.neighbours or 0, run_id=self.run_id, round=self.round
                )
            )
        return self._graph[site]

    def share_holders(self, site: str) -> tuple[str, ...]:
        """Sites that receive a Shamir share of ``site``'s self-mask seed, sorted (itself too)."""
        return tuple(sorted(self.neighbours_of(site) | {site}))

    def share_index(self, site: str) -> int:
        """The Shamir x-coordinate of ``site`` (1-based position in ``participants``)."""
        return self.participants.index(site) + 1

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready description (for logging and message headers)."""
        described: dict[str, object] = {
            "run_id": self.run_id,
            "round": self.round,
            "participants": list(self.participants),
            "threshold": self.threshold,
            "dimension": self.dimension,
            "clip_range": self.clip_range,
            "neighbours": self.neighbours,
            "bits": self.bits,
        }
        if self.field_bits != FIELD_BITS:  # the uncompressed description stays as it was
            described["field_bits"] = self.field_bits
        return described


def default_threshold(n: int) -> int:
    """Bonawitz et al.'s usual choice: a strict majority, ``floor(n / 2) + 1``."""
    return math.floor(n / 2) + 1
