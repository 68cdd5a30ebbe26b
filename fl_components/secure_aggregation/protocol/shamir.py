"""Shamir t-of-n secret sharing over the prime field GF(2^256 - 189).

Shamir 1979, "How to Share a Secret", Communications of the ACM 22(11). Used as in
Bonawitz et al. 2017 (CCS, arXiv:1611.04482), Section 4, to share each participant's
self-mask seed b_u so that t survivors can rebuild it. A secret is the constant term of a
random polynomial of degree t - 1; share i is the polynomial at x_i != 0. Any t shares
rebuild it by Lagrange interpolation at 0; t - 1 shares are independent of it.

Pure Python integers are enough: splitting a seed among 100 sites costs a few thousand
256-bit multiplications (about a millisecond). Reconstruction of many seeds from the same
set of x-coordinates reuses one set of Lagrange coefficients (:func:`lagrange_at_zero`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fl_components.secure_aggregation.protocol.errors import (
    ContextMismatchError,
    ThresholdNotMetError,
)

PRIME = 2**256 - 189  # the largest prime below 2^256
SECRET_BYTES = 32


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial."""

    x: int
    y: int


def random_secret() -> bytes:
    """Return 32 uniformly random bytes whose integer value is a field element (< PRIME)."""
    while True:  # rejects with probability ~2^-248
        raw = secrets.token_bytes(SECRET_BYTES)
        if int.from_bytes(raw, "big") < PRIME:
            return raw


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Split ``secret`` into shares at ``xs``, any ``threshold`` of which rebuild it.

    Parameters
    ----------
    secret : bytes
        32 bytes, big-endian value below :data:`PRIME`.
    threshold : int
        t, 1 <= t <= len(xs).
    xs : sequence of int
        Distinct non-zero x-coordinates, one per share holder.

    Returns
    -------
    list[Share]
        One share per x, in the order of ``xs``.
    """
    value = int.from_bytes(secret, "big")
    if len(secret) != SECRET_BYTES or value >= PRIME:
        raise ContextMismatchError("a Shamir secret must be 32 bytes below the field prime")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ContextMismatchError(f"share x-coordinates must be distinct and non-zero: {xs}")
    if not 1 <= threshold <= len(xs):
        raise ContextMismatchError(f"threshold must be in [1, {len(xs)}] (got {threshold})")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x=x, y=y))
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Lagrange basis coefficients l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod PRIME."""
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return coefficients


def combine(ys: Sequence[int], coefficients: Sequence[int]) -> bytes:
    """Interpolate at 0 with precomputed :func:`lagrange_at_zero` coefficients."""
    value = sum(y * c for y, c in zip(ys, coefficients, strict=True)) % PRIME
    return value.to_bytes(SECRET_BYTES, "big")


def reconstruct(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (the first t by x are used).

    Raises
    ------
    ThresholdNotMetError
        With fewer than ``threshold`` distinct shares.
    """
    distinct = {share.x: share for share in shares}
    if len(distinct) < threshold:
        raise ThresholdNotMetError(
            f"{len(distinct)} distinct shares cannot rebuild a {threshold}-of-n secret; "
            f"at least {threshold} are needed"
        )
    chosen = [distinct[x] for x in sorted(distinct)[:threshold]]
    return combine([s.y for s in chosen], lagrange_at_zero([s.x for s in chosen]))
