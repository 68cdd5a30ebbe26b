"""Compression under secure aggregation: fewer bits in Z_2^m, and only shared coordinates.

Bonawitz et al. 2017 (CCS, arXiv:1611.04482) mask vectors in Z_R^d for any R. Each value is
quantized to b bits (``compression.bits``) and the sum of n of them needs ceil(log2 n) more,
so we mask in Z_2^m with m = b + ceil(log2 n) and send m bits per value
(:mod:`fl_components.secure_aggregation.protocol.packing`): about (b + log2 n) / 8 bytes per
parameter instead of
4. With shared random-k (Konecny et al. 2016, arXiv:1610.05492;
:mod:`fl_components.compression.random_k`) every site of the round picks the same k
coordinates, so the round's vectors have length k: only those are quantized, masked and
sent, and the unmasked sum is scattered back to d. The secure-aggregation protocol itself
is unchanged; this module only says what vector, and in which group, it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fl_components.compression.random_k import round_seed, shared_indices
from fl_components.compression.top_k import kept_count
from fl_components.config import CompressionConfig
from fl_components.secure_aggregation.protocol.quantize import FIELD_BITS, headroom_bits


@dataclass(frozen=True)
class SecureShape:
    """What a round's protocol context is built with.

    (:class:`~fl_components.secure_aggregation.protocol.RoundContext`)

    Attributes
    ----------
    dimension : int
        Length of the masked vectors (k with random-k, else d).
    bits : int or None
        Fixed-point bits per value (None: the protocol's default, most that fit in 32).
    field_bits : int
        m of Z_2^m (32: the uncompressed protocol).
    """

    dimension: int
    bits: int | None
    field_bits: int


def secure_shape(config: CompressionConfig, *, n: int, dimension: int) -> SecureShape:
    """The masked vector length and group for ``n`` participants and a d-value model."""
    if not config.enabled:
        return SecureShape(dimension=dimension, bits=None, field_bits=FIELD_BITS)
    sent = kept_count(dimension, config.fraction) if config.method == "random_k" else dimension
    field_bits = min(FIELD_BITS, config.bits + headroom_bits(n))
    return SecureShape(dimension=sent, bits=config.bits, field_bits=field_bits)


def select_for_secure(
    update: npt.NDArray[np.floating],
    *,
    config: CompressionConfig,
    run_id: str,
    round: int,
    residual: npt.NDArray[np.floating],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The values a site masks this round, and its new error-feedback residual.

    With random-k the round's shared coordinates of ``update + residual`` (error feedback)
    or of ``update``; otherwise the whole update and a zero residual.
    """
    values = np.asarray(update, dtype=np.float32).reshape(-1)
    if config.method != "random_k":
        return values, np.zeros_like(values)
    corrected = values + np.asarray(residual, dtype=np.float32) if config.error_feedback else values
    indices = _indices(config, run_id=run_id, round=round, dimension=values.size)
    left = corrected.copy()
    left[indices] = 0.0
    return corrected[indices], left if config.error_feedback else np.zeros_like(values)


def scatter_secure_sum(
    total: npt.NDArray[np.floating],
    *,
    config: CompressionConfig,
    run_id: str,
    round: int,
    dimension: int,
) -> npt.NDArray[np.float64]:
    """Put the unmasked sum back at its coordinates of the d-value model (zeros elsewhere)."""
    if config.method != "random_k":
        return np.asarray(total, dtype=np.float64)
    dense = np.zeros(dimension)
    dense[_indices(config, run_id=run_id, round=round, dimension=dimension)] = total
    return dense


def _indices(
    config: CompressionConfig, *, run_id: str, round: int, dimension: int
) -> npt.NDArray[np.int64]:
    k = kept_count(dimension, config.fraction)
    return shared_indices(round_seed(run_id=run_id, round=round), dimension=dimension, k=k)
